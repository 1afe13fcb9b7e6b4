"""The base ``StatusHandler``: ``/status`` reports ``application.status``.

Run it, then flip it by hand::

    python examples/status_app.py --port 8000
    curl -i http://127.0.0.1:8000/status              # 200 {"status": "ok", ...}
    curl -i -X POST http://127.0.0.1:8000/maintenance  # enter maintenance
    curl -i http://127.0.0.1:8000/status              # 503 {"status": "maintenance"}
    curl -i -X DELETE http://127.0.0.1:8000/maintenance  # back to ok

The port comes from ``--port``, else ``$PORT``, else 8000; the address to
listen on from ``--address``, else ``$ADDRESS``, else every interface.
SIGINT (Ctrl-C) or SIGTERM stops the server cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tornado import web

from sprockets_status_consul import MAINTENANCE, OK, StatusHandler, set_application

LOGGER = logging.getLogger("status_app")

APPLICATION_NAME = "sprockets-status-consul"
"""Reported as ``application``; its installed version is reported as ``version``."""


class StatusApplication(web.Application):
    """A Tornado application with the ``status`` attribute the handler reports."""

    status: str = OK


class MaintenanceHandler(web.RequestHandler):
    """``POST /maintenance`` enters maintenance, ``DELETE`` leaves it.

    Both answer 200 with the new status, e.g. ``{"status": "maintenance"}``.
    """

    def post(self) -> None:
        self._set(MAINTENANCE)

    def delete(self) -> None:
        self._set(OK)

    def _set(self, status: str) -> None:
        application = self.application
        assert isinstance(application, StatusApplication)
        if application.status != status:
            LOGGER.info("application status: %s -> %s", application.status, status)
        application.status = status
        self.write({"status": status})


def make_app() -> StatusApplication:
    return StatusApplication(
        [
            (r"/status", StatusHandler),
            (r"/maintenance", MaintenanceHandler),
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A Tornado app whose /status follows application.status."
    )
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT") or "8000",
        help="port to listen on (default: $PORT, else 8000)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("ADDRESS", ""),
        help="address to listen on (default: $ADDRESS, else every interface)",
    )
    return parser.parse_args(argv)


async def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; return the process's exit code."""
    args = parse_args(argv)
    port: int = args.port
    address: str = args.address
    set_application(APPLICATION_NAME)
    app = make_app()
    try:
        server = app.listen(port, address=address)
    except OSError as error:
        LOGGER.error("cannot listen on %s:%d: %s", address or "*", port, error)
        return 1
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    LOGGER.info(
        "serving http://%s:%d/status (POST/DELETE /maintenance flips it)",
        address or "127.0.0.1",
        port,
    )
    await stopping.wait()
    LOGGER.info("stopping")
    server.stop()
    await server.close_all_connections()
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(main()))
