"""A backend process for the multi-process tests: ``/status`` and nothing else.

``python -m tests.backend --port 8001`` serves :class:`ConsulStatusHandler` at
``/status`` and :class:`LivenessHandler` at ``/live``, following the agent
named by ``CONSUL_HTTP_ADDR``, and prints ``ready`` once it listens. SIGTERM
drains it for ``--grace`` seconds and stops it cleanly (exit code 0). A
``register`` setting without a ``port`` registers the ``--port`` it serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any

from tornado import web

import sprockets_status_consul as ssc


async def serve(
    port: int, settings: dict[str, Any], grace: float, address: str = "127.0.0.1"
) -> None:
    register = settings.get("register")
    if isinstance(register, dict):
        settings = {**settings, "register": {"port": port, **register}}
    app = web.Application(
        [
            (r"/status", ssc.ConsulStatusHandler),
            (r"/live", ssc.LivenessHandler),
        ],
        consul_status=settings,
    )
    ssc.set_application("sprockets-status-consul")
    ssc.watch(app)
    server = app.listen(port, address=address)
    print("ready", flush=True)
    await ssc.serve_until_signalled(app, server, grace=grace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--settings", default="{}", help="the consul_status setting, as JSON"
    )
    parser.add_argument(
        "--grace", type=float, default=0.0, help="seconds to drain on SIGTERM"
    )
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="address to listen on (in a container: 0.0.0.0)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    asyncio.run(serve(args.port, json.loads(args.settings), args.grace, args.address))


if __name__ == "__main__":
    main()
