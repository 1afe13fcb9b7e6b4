"""``ConsulStatusHandler``: ``/status`` answers 503 while Consul says maintenance.

Start a Consul agent (``consul agent -dev``), then::

    CONSUL_HTTP_ADDR=127.0.0.1:8500 python examples/consul_app.py --port 8000
    curl -i http://127.0.0.1:8000/status     # 200 {"status": "ok", ...}
    consul maint -enable -reason "deploying"  # the agent's node enters maintenance
    curl -i http://127.0.0.1:8000/status     # 503 {"reason": "deploying", ...}
    consul maint -disable                     # back to 200

The agent is ``$CONSUL_HTTP_ADDR`` (default ``127.0.0.1:8500``) with the token
in ``$CONSUL_HTTP_TOKEN``, if any; the node followed is that agent's own node.
The port comes from ``--port``, else ``$PORT``, else 8000; the address to
listen on from ``--address``, else ``$ADDRESS``, else every interface.
SIGINT (Ctrl-C) or SIGTERM drains for ``--grace`` seconds (``/status`` answers
503 ``draining``, ``/live`` stays 200), then stops the server and the Consul
watcher cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from tornado import web

from sprockets_status_consul import (
    ConsulStatusHandler,
    LivenessHandler,
    SettingsError,
    log_request,
    serve_until_signalled,
    set_application,
    stop,
    watch,
)

LOGGER = logging.getLogger("consul_app")

APPLICATION_NAME = "sprockets-status-consul"
"""Reported as ``application``; its installed version is reported as ``version``."""


def make_app() -> web.Application:
    return web.Application(
        [(r"/status", ConsulStatusHandler), (r"/live", LivenessHandler)],
        # Every key is optional: address and token default to $CONSUL_HTTP_ADDR
        # and $CONSUL_HTTP_TOKEN. These two values are the defaults, spelled out:
        # a blocking query waits at most ttl seconds, and while Consul cannot
        # be reached "open" keeps serving the last known status ("closed"
        # would report maintenance once that answer is older than the ttl).
        consul_status={"ttl": 10.0, "failure_mode": "open"},
        # Tornado logs every 5xx at ERROR; this logs the 503s of maintenance
        # and draining at INFO, as answers rather than failures.
        log_function=log_request,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A Tornado app whose /status follows Consul maintenance mode."
    )
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT") or "8000",
        help="port to listen on (default: $PORT, else 8000)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("GRACE") or 0),
        help="seconds to answer 503 draining after SIGTERM (default: $GRACE, else 0)",
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
        # Checks the settings and starts following Consul now, so the first
        # answer is in memory before the first request.
        watcher = watch(app)
    except SettingsError as error:
        LOGGER.error("bad Consul settings: %s", error)
        return 2
    try:
        try:
            server = app.listen(port, address=address)
        except OSError as error:
            LOGGER.error("cannot listen on %s:%d: %s", address or "*", port, error)
            return 1
        LOGGER.info(
            "serving http://%s:%d/status, following Consul at %s",
            address or "127.0.0.1",
            port,
            watcher.settings.address,
        )
        # On SIGINT or SIGTERM: /status answers 503 "draining" for --grace
        # seconds (load balancers stop routing), then the server stops.
        await serve_until_signalled(app, server, grace=args.grace)
    finally:
        await stop(app)
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(main()))
