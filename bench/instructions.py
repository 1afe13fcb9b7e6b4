"""What one ``/status`` request executes, in CPU instructions (callgrind).

``python -m bench.instructions`` serves requests as :mod:`bench.handler_cost`
does (in-process, one application per kind), each kind in a process of its
own under valgrind's callgrind, twice: after the same warm-up, once with no
more requests and once with ``--requests`` more. The difference over the
requests is what one request executes. The count does not depend on what
else the machine does, so a difference of 1 % shows where req/s under wrk, on
a shared virtual machine, cannot tell it from noise; it does not count what
the instructions cost (cache misses, say), which req/s does.

The library's kinds follow a real Consul dev agent, as in production: the
watcher runs on the loop and requests read its snapshot. What runs in the
background and does not grow with requests is kept out of the count: the
watcher's query waits 600 s, and the checks of ``checks`` run every 600 s.
Needs ``valgrind``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tornado import httputil

import sprockets_status_consul as ssc
from bench import handler_cost
from bench.backends import APPLICATION
from bench.common import consul_binary, start_agent, table

KINDS = {kind: label for kind, (label, _, _) in handler_cost.KINDS.items()}
WARM_UP = 300
BACKGROUND_SECONDS = handler_cost.BACKGROUND_SECONDS
"""The watcher's TTL and the checks' interval: nothing runs in the background
while the requests are counted."""


async def serve_counted(kind: str, consul: str, requests: int) -> None:
    """In the child: warm up, then serve ``requests`` more requests."""
    ssc.set_application(APPLICATION)
    app = await handler_cost.make_app(kind, consul, interval=BACKGROUND_SECONDS)
    connection = handler_cost.Connection()
    headers = httputil.HTTPHeaders({"Host": "127.0.0.1", **handler_cost.KINDS[kind][2]})
    for _ in range(WARM_UP + requests):
        await handler_cost.serve(app, connection, headers)
    await ssc.stop(app)


def count(kind: str, consul: str, requests: int) -> int:
    """The instructions a child serving ``requests`` after the warm-up executes."""
    process = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            kind,
            "--consul",
            consul,
            "--requests",
            str(requests),
        ],
        capture_output=True,
        text=True,
        check=False,
        # One hash seed for every child: a seed changes how many
        # instructions a dict lookup takes, and so the difference.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"Collected : (\d+)", process.stderr)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"{kind} under callgrind failed:\n{process.stderr[-2000:]}")
    return int(match.group(1))


def measure(requests: int) -> dict[str, float]:
    """Instructions per request of each kind, two children at a time."""
    agent = start_agent(consul_binary(), "127.0.0.1")
    try:
        per_request = {}
        for kind in KINDS:
            with ThreadPoolExecutor(2) as pool:  # side by side
                with_none, with_requests = pool.map(
                    functools.partial(count, kind, agent.http_addr), (0, requests)
                )
            per_request[kind] = (with_requests - with_none) / requests
        return per_request
    finally:
        agent.stop()


def render(per_request: dict[str, float], requests: int) -> list[str]:
    plain = per_request["plain"]
    return table(
        [
            f"handler ({requests:,} requests, callgrind)",
            "instructions per request",
            "more than plain",
            "plain's / this",
        ],
        (
            [
                KINDS[kind],
                f"{value:,.0f}",
                f"{(value - plain) / plain:+.1%}",
                f"{plain / value:.3f}",
            ]
            for kind, value in per_request.items()
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--consul", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(serve_counted(args.child, args.consul, args.requests))
        return 0
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    print("\n".join(render(measure(args.requests), args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
