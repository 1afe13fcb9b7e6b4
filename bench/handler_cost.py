"""What one ``/status`` request costs the handler, in-process, side by side.

``python -m bench.handler_cost`` serves requests to several applications in
one process, in turn, one request each per round, with no sockets: each
request is handed to the application as Tornado's HTTP server would hand it,
and answered into a connection that keeps the bytes. A request's cost is the
thread's CPU time from handing it over to its end. Taking turns request by
request, every kind meets the same moment of the machine, so the medians
compare to a microsecond where req/s under wrk, on a shared VM, does not.

The library's kinds follow a Consul dev agent, as in production: the
watcher runs on the loop and a request reads its snapshot. Every kind's
answer is checked to be the plain handler's, byte for byte: status code,
headers but ``Date``, and body (bar the kinds that change it on purpose).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from tornado import httputil, web

import sprockets_status_consul as ssc
from bench.backends import APPLICATION, PlainStatusHandler, _no_log, _passes
from bench.common import consul_binary, start_agent


class Connection(httputil.HTTPConnection):
    """Keeps what the handler writes and says when it has finished."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] | None = None
        self.written: list[bytes] = []

    def write_headers(
        self,
        start_line: Any,
        headers: httputil.HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        self.written = [
            str(start_line.code).encode(),
            *sorted(
                f"{name}: {value}".encode()
                for name, value in headers.get_all()
                if name != "Date"
            ),
            chunk or b"",
        ]
        return self._done_future()

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        self.written.append(chunk)
        return self._done_future()

    def finish(self) -> None:
        assert self.done is not None
        self.done.set_result(None)

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        pass

    @staticmethod
    def _done_future() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _OwnBody(ssc.ConsulStatusHandler):
    """Overrides a hook of the body, so the body is made on every request."""

    def _status_response(self) -> dict[str, Any]:
        return super()._status_response()


KINDS: dict[str, tuple[str, type[web.RequestHandler], dict[str, str]]] = {
    "plain": ("plain Tornado handler (the limit)", PlainStatusHandler, {}),
    "defaults": ("ConsulStatusHandler, defaults", ssc.ConsulStatusHandler, {}),
    "checks": ("ConsulStatusHandler, 3 checks", ssc.ConsulStatusHandler, {}),
    "probe": (
        "ConsulStatusHandler, defaults, `Accept: */*` (as probes send)",
        ssc.ConsulStatusHandler,
        {"Accept": "*/*"},
    ),
    "own-body": ("subclass overriding `_status_response`", _OwnBody, {}),
    "health": (
        "ConsulStatusHandler, health+json asked",
        ssc.ConsulStatusHandler,
        {"Accept": "application/health+json"},
    ),
}


BACKGROUND_SECONDS = 600.0
"""The watcher's TTL: its query waits this long, so no answer comes in while
the requests are measured."""

_START_LINE = httputil.RequestStartLine("GET", "/status", "HTTP/1.1")


async def serve(
    app: web.Application, connection: Connection, headers: httputil.HTTPHeaders
) -> int:
    """Hand one ``GET /status`` to ``app``, as Tornado's HTTP server does; the
    thread's CPU time it took, in ns."""
    connection.done = asyncio.get_running_loop().create_future()
    started = time.thread_time_ns()
    delegate = app.start_request(None, connection)
    delegate.headers_received(_START_LINE, headers)
    delegate.finish()
    await connection.done
    return time.thread_time_ns() - started


async def make_app(kind: str, consul: str, interval: float = 1.0) -> web.Application:
    """The application of ``kind``, its watcher (but the plain handler's)
    following the agent at ``consul`` and answered; checks every ``interval``."""
    _, handler, _ = KINDS[kind]
    app = web.Application(
        [(r"/status", handler)],
        log_function=_no_log,
        consul_status={"address": consul, "ttl": BACKGROUND_SECONDS},
    )
    if kind == "checks":
        for name in ("database", "cache", "queue"):
            ssc.add_check(app, name, _passes, interval=interval)
    if kind != "plain" and not await ssc.watch(app).wait_ready(60.0):
        raise RuntimeError(f"no answer from Consul at {consul}")
    return app


async def measure(rounds: int, consul: str) -> dict[str, list[int]]:
    ssc.set_application(APPLICATION)
    apps = {kind: await make_app(kind, consul) for kind in KINDS}
    costs: dict[str, list[int]] = {kind: [] for kind in KINDS}
    try:
        await _compare_and_measure(apps, rounds, costs)
    finally:
        for app in apps.values():
            await ssc.stop(app)
    return costs


async def _compare_and_measure(
    apps: dict[str, web.Application], rounds: int, costs: dict[str, list[int]]
) -> None:
    connections = {kind: Connection() for kind in KINDS}
    headers = {
        kind: httputil.HTTPHeaders({"Host": "127.0.0.1", **h})
        for kind, (_, _, h) in KINDS.items()
    }
    for kind, app in apps.items():  # warm-up, and the answers compared
        for _ in range(200):
            await serve(app, connections[kind], headers[kind])
    plain = connections["plain"].written
    for kind in ("defaults", "checks", "probe", "own-body"):
        if connections[kind].written != plain:
            raise RuntimeError(
                f"{kind} answers {connections[kind].written!r}, plain {plain!r}"
            )
    order = list(apps)
    for round_ in range(rounds):
        shift = round_ % len(order)  # each kind follows each other in turn
        for kind in order[shift:] + order[:shift]:
            costs[kind].append(
                await serve(apps[kind], connections[kind], headers[kind])
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args(argv)
    agent = start_agent(consul_binary(), "127.0.0.1")
    try:
        costs = asyncio.run(measure(args.rounds, agent.http_addr))
    finally:
        agent.stop()
    plain = statistics.median(costs["plain"])
    print(
        f"| handler ({args.rounds:,} requests each, in turn) | CPU µs per request "
        "(median) | more than plain (µs) | plain's / this |"
    )
    print("|---|---|---|---|")
    for kind, (label, _, _) in KINDS.items():
        median = statistics.median(costs[kind])
        print(
            f"| {label} | {median / 1000:.1f} | {(median - plain) / 1000:+.1f} "
            f"| {plain / median:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
