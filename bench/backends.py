"""One backend process of the benchmark: ``/status`` and nothing else.

::

    python -m bench.backends --kind watch --consul 127.0.0.1:8500

Kinds, all answering the same JSON body with the same headers (the run checks
that they do, see ``answers_differ`` in :mod:`bench.throughput`):

``plain``
    a plain Tornado handler writing the JSON, no Consul: the limit. The
    process imports neither the library nor python-consul2.
``plain-again``
    the same as ``plain``: a second process of it, to tell the measurement's
    own error when the two are compared.
``plain-import``
    the same handler in a process that also imports the library (and so
    python-consul2): tells the cost of the imports from that of the watcher.
``seed``
    what users wrote from the old docs: python-consul2's Tornado client asks
    ``health.node(...)`` in ``prepare`` on every request, 503 while the
    ``_node_maintenance`` check is critical.
``poll``
    :class:`~sprockets_status_consul.ConsulStatusHandler` with TTL-only polling,
    ``consul_status={"blocking": False}``.
``watch``
    :class:`~sprockets_status_consul.ConsulStatusHandler` with its defaults.
``checks``
    ``watch`` with three checks (:func:`~sprockets_status_consul.add_check`)
    that pass at once, every second: what checks cost a request, which only
    reads their last results.
``slow-check``
    ``watch`` with one check that takes 5 s to answer, started again 0.1 s
    after it does (timeout 10 s): one run is always under way, and a request
    must not wait on it.

For ``poll`` and ``watch``, ``--key`` makes the watcher follow a KV key too
(the fleet-wide switch) and ``--ttl`` sets its TTL; ``--report-changes``
makes the process print ``status MONOTONIC STATUS`` (``time.monotonic()``,
the same clock in every process of the machine) as soon as the watcher's
answer changes, so the fleet benchmark learns when each backend took a change
without polling ``/status``.

The process listens on a free loopback port and prints ``ready PORT PID`` once
it can answer (for ``poll`` and ``watch``, once the watcher has Consul's first
answer). SIGTERM or SIGINT stops it cleanly, exit code 0. Requests are not
logged (``log_function`` is a no-op for every kind alike).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from tornado import httpserver, netutil, web

APPLICATION = "sprockets-status-consul"
"""The application name every kind reports, and whose version it reports."""

KINDS = (
    "plain",
    "plain-again",
    "plain-import",
    "seed",
    "poll",
    "watch",
    "checks",
    "slow-check",
)

SLOW_CHECK_SECONDS = 5.0
"""How long the ``slow-check`` kind's check takes to answer."""

NODE_MAINTENANCE_CHECK = "_node_maintenance"


def _version() -> str:
    try:
        return importlib.metadata.version(APPLICATION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


def _no_log(handler: web.RequestHandler) -> None:
    """Tornado's ``log_function``: no access log, for every kind alike."""


class PlainStatusHandler(web.RequestHandler):
    """Writes what ``ConsulStatusHandler`` writes when all is well, headers too."""

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Vary", "Accept")

    def compute_etag(self) -> None:
        return None  # as the library's handler: no ETag

    def get(self) -> None:
        self.write(
            {
                "application": APPLICATION,
                "status": "ok",
                "version": VERSION,
                "consul": "connected",
            }
        )


class SeedStatusHandler(web.RequestHandler):
    """The handler users wrote from the old docs: ask Consul on every request.

    The application settings hold ``seed_consul``, a python-consul2 Tornado
    client made once per process, and ``seed_node``, the node to ask about.
    An error from Consul is a 500, as it was.
    """

    reason: str | None = None

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Vary", "Accept")

    def compute_etag(self) -> None:
        return None  # as the library's handler: no ETag

    async def prepare(self) -> None:
        client: Any = self.settings["seed_consul"]
        _, checks = await client.health.node(self.settings["seed_node"])
        for check in checks or ():
            if (
                check.get("CheckID") == NODE_MAINTENANCE_CHECK
                and check.get("Status") == "critical"
            ):
                self.reason = check.get("Notes") or "node maintenance"

    def get(self) -> None:
        body: dict[str, Any] = {
            "application": APPLICATION,
            "status": "ok",
            "version": VERSION,
            "consul": "connected",
        }
        if self.reason is not None:
            self.set_status(503)
            body.update(status="maintenance", source="node", reason=self.reason)
        self.write(body)


async def _passes() -> None:
    """A check that passes at once."""


async def _slow() -> None:
    """A check that passes after :data:`SLOW_CHECK_SECONDS`."""
    await asyncio.sleep(SLOW_CHECK_SECONDS)


def add_checks(kind: str, app: web.Application) -> None:
    """Register the checks of ``kind`` (none but for ``checks`` and ``slow-check``)."""
    import sprockets_status_consul as ssc

    if kind == "checks":
        for name in ("database", "cache", "queue"):
            ssc.add_check(app, name, _passes, interval=1)
    elif kind == "slow-check":
        ssc.add_check(app, "slow", _slow, interval=0.1, timeout=10)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _node_name(client: Any) -> str:
    answer = await client.agent.self()
    return str(answer["Config"]["NodeName"])


async def make_app(
    kind: str, address: str, follow: dict[str, Any] | None = None
) -> tuple[web.Application, Any]:
    """The application of ``kind``, ready to answer; and what to stop with it.

    ``follow``: more ``consul_status`` settings (``poll`` and ``watch`` only).
    """
    if kind in ("plain", "plain-again", "plain-import"):
        if kind == "plain-import":  # the handler's module imports the rest
            import sprockets_status_consul.handler
        return web.Application(
            [(r"/status", PlainStatusHandler)], log_function=_no_log
        ), None
    if kind == "seed":
        import consul.tornado

        host, port = _split_address(address)
        client = consul.tornado.Consul(host=host, port=port)
        app = web.Application(
            [(r"/status", SeedStatusHandler)],
            log_function=_no_log,
            seed_consul=client,
            seed_node=await _node_name(client),
        )
        return app, None
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    import sprockets_status_consul as ssc

    settings: dict[str, Any] = {"address": address, **(follow or {})}
    if kind == "poll":
        settings["blocking"] = False
    app = web.Application(
        [(r"/status", ssc.ConsulStatusHandler)],
        log_function=_no_log,
        consul_status=settings,
    )
    ssc.set_application(APPLICATION)
    add_checks(kind, app)
    watcher = ssc.watch(app)
    if not await watcher.wait_ready(10.0):
        raise RuntimeError(f"no answer from Consul at {address} in 10 s")
    return app, ssc.stop


def report_changes(app: web.Application) -> None:
    """Print ``status MONOTONIC STATUS`` each time ``/status``'s answer changes.

    A listener (:func:`~sprockets_status_consul.on_change`): what an
    application that acts on changes does, and what it costs it, a line on
    stdout per change and nothing while nothing changes. The library's log
    stays at WARNING, as the root logger is set: an INFO line per change is
    the application's choice, and its cost is measured apart
    (``python -m bench.change_cost --log-info``).
    """
    import sprockets_status_consul as ssc

    def report(old: Any, new: Any) -> None:
        if new.status != old.status:
            print(f"status {time.monotonic():.6f} {new.status}", flush=True)

    ssc.on_change(app, report)


async def serve(kind: str, consul: str, follow: dict[str, Any], changes: bool) -> None:
    app, stop = await make_app(kind, consul, follow)
    if changes:
        report_changes(app)
    sockets = netutil.bind_sockets(0, "127.0.0.1")
    server = httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    print(f"ready {sockets[0].getsockname()[1]} {os.getpid()}", flush=True)
    await stopping.wait()
    server.stop()
    await server.close_all_connections()
    if stop is not None:
        await stop(app)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backends",
        description="A benchmark backend process serving /status.",
    )
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument(
        "--consul", required=True, help="the Consul agent (or proxy), host:port"
    )
    parser.add_argument("--key", help="a KV key to follow too (poll, watch)")
    parser.add_argument("--ttl", type=float, help="the watcher's TTL (poll, watch)")
    parser.add_argument(
        "--report-changes",
        action="store_true",
        help="print 'status MONOTONIC STATUS' when the answer changes",
    )
    parser.add_argument(
        "--log-info",
        action="store_true",
        help="log the library's INFO lines (one per maintenance change) to stderr",
    )
    args = parser.parse_args(argv)
    following = args.key or args.ttl or args.report_changes
    if following and args.kind not in ("poll", "watch"):
        parser.error("--key, --ttl and --report-changes need --kind poll or watch")
    follow: dict[str, Any] = {}
    if args.key:
        follow["key"] = args.key
    if args.ttl:
        follow["ttl"] = args.ttl
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    if args.log_info:
        logging.getLogger("sprockets_status_consul").setLevel(logging.INFO)
    asyncio.run(serve(args.kind, args.consul, follow, args.report_changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
