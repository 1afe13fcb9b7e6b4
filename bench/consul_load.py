"""2. Consul load: what N backends under load ask of Consul.

1, 4 and 16 backend processes under load, each talking to Consul through its
own listener of the counting proxy (:mod:`bench.proxy`): Consul requests, and
how many stand (wait in Consul) at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import (
    SHORT,
    TTL,
    Backend,
    Bench,
    LoadGenerator,
    Processes,
    Target,
    first_line,
    progress,
    start_backends,
    table,
)

TARGET_STANDING = 1
PARALLEL_START = 8
"""Backends of several kinds that may start at once."""


@dataclasses.dataclass(frozen=True)
class Plan:
    counts: tuple[int, ...]
    kinds: tuple[str, ...]
    seconds: float


FULL = Plan(counts=(1, 4, 16), kinds=("seed", "poll", "watch"), seconds=4.0)
SMOKE = Plan(counts=(1,), kinds=("seed", "poll", "watch"), seconds=0.1)


@dataclasses.dataclass
class Row:
    kind: str
    backends: int
    seconds: float
    status_requests: int
    consul_requests: int
    blocking_requests: int
    max_standing: int
    """The most requests standing at once for one backend."""
    per_backend: list[int]
    startup: int
    """Requests of all the backends from their start until they answered."""


@dataclasses.dataclass
class Result:
    plan: Plan
    connections: int
    rows: list[Row]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


def make_plan(smoke: bool, options: argparse.Namespace) -> Plan:
    return SMOKE if smoke else FULL


class Proxy:
    """The counting proxy process, driven through its stdin."""

    def __init__(self, process: asyncio.subprocess.Process, ports: list[int]) -> None:
        self.process = process
        self.ports = ports

    @classmethod
    async def start(cls, procs: Processes, upstream: str, listeners: int) -> Proxy:
        args = [
            sys.executable,
            "-m",
            "bench.proxy",
            "--upstream",
            upstream,
            "--listeners",
            str(listeners),
        ]
        process, log = await procs.spawn(args, stdin=True, name="proxy")
        line = await first_line(process, log, "bench.proxy")
        ports: list[int] = json.loads(line)["ports"]
        return cls(process, ports)

    async def command(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 10.0)
        return json.loads(line)


async def measure(plan: Plan, bench: Bench) -> Result:
    """Each kind and count in turn: N backends under load, through the proxy.

    Small configurations (at most :data:`PARALLEL_START` processes for all
    kinds) start at once, each kind behind its own listeners, and are then
    loaded one kind after the other.
    """
    procs = bench.procs
    kinds = plan.kinds
    batches: list[tuple[int, tuple[str, ...]]] = []
    for count in plan.counts:
        if count * len(kinds) <= PARALLEL_START:
            batches.append((count, kinds))
        else:
            batches += [(count, (kind,)) for kind in kinds]
    listeners = max(count * len(group) for count, group in batches)
    proxy = await Proxy.start(procs, bench.dev_agent.http_addr, listeners)
    rows = []
    try:
        for count, group in batches:
            await proxy.command("reset")
            started = await asyncio.gather(
                *(
                    start_backends(
                        procs,
                        kind,
                        [
                            f"127.0.0.1:{port}"
                            for port in proxy.ports[i * count : (i + 1) * count]
                        ],
                    )
                    for i, kind in enumerate(group)
                )
            )
            try:
                await asyncio.sleep(0.3)  # the watchers' first queries are over
                startup: list[dict[str, int]] = await proxy.command("counts")
                for i, backends in enumerate(started):
                    first = i * count
                    before = sum(c["requests"] for c in startup[first : first + count])
                    rows.append(
                        await _load(plan, proxy, bench.load, backends, first, before)
                    )
            finally:
                await procs.stop(b.process for group_ in started for b in group_)
    finally:
        await procs.stop([proxy.process])
    order = {kind: i for i, kind in enumerate(kinds)}
    rows.sort(key=lambda r: (order[r.kind], r.backends))
    return Result(plan, bench.load.connections, rows)


async def _load(
    plan: Plan,
    proxy: Proxy,
    load: LoadGenerator,
    backends: Sequence[Backend],
    first: int,
    startup: int,
) -> Row:
    count = len(backends)
    await proxy.command("reset")
    result = await load.run([b.port for b in backends], plan.seconds, pin=False)
    counts: list[dict[str, int]] = (await proxy.command("counts"))[
        first : first + count
    ]
    row = Row(
        kind=backends[0].kind,
        backends=count,
        seconds=result.seconds,
        status_requests=result.requests,
        consul_requests=sum(c["requests"] for c in counts),
        blocking_requests=sum(c["blocking"] for c in counts),
        max_standing=max(c["max_standing"] for c in counts),
        per_backend=[c["requests"] for c in counts],
        startup=startup,
    )
    progress(
        f"consul load {row.kind} x{count}: {row.status_requests} /status, "
        f"{row.consul_requests} to Consul, max standing {row.max_standing}"
    )
    return row


def targets(result: Result) -> list[Target]:
    watch = [r for r in result.rows if r.kind == "watch"]
    if not watch:
        return []
    standing = max(r.max_standing for r in watch)
    allowed = 1 + int(result.plan.seconds // TTL)
    most = max(max(r.per_backend) for r in watch)
    return [
        (
            f"defaults: <= {TARGET_STANDING} standing Consul request per "
            "backend, whatever the request rate",
            f"at most {standing} standing, at most {most} request(s) per "
            f"backend in {result.plan.seconds:g} s of load",
            standing <= TARGET_STANDING and most <= allowed,
        )
    ]


def render(result: Result) -> list[str]:
    plan = result.plan
    if not result.rows:
        return []
    lines = [
        f"**2. Consul load**: N backend processes under load for "
        f"{plan.seconds:g} s (at least {result.connections} keep-alive "
        "connections spread over them, nothing pinned), each talking to "
        "Consul through its own listener of the counting proxy. *Standing*: "
        "sent and not yet answered (a blocking query Consul holds). With "
        f"nothing changing in Consul, a backend with the library's handler "
        f"asks once per TTL ({TTL:g} s: a blocking query that ends, or a poll) "
        "whatever its /status rate, so a window this short sees 0 or 1 such "
        "request per backend; the seed-style handler asks once per /status.",
        "",
    ]
    rows = []
    for r in result.rows:
        per_1000 = (
            1000 * r.consul_requests / r.status_requests if r.status_requests else 0
        )
        rate = r.consul_requests / r.seconds if r.seconds else 0.0
        rows.append(
            [
                SHORT[r.kind],
                str(r.backends),
                f"{r.startup / r.backends:,.1f}",
                f"{r.status_requests / r.seconds:,.0f}" if r.seconds else "-",
                f"{r.consul_requests:,}",
                f"{rate:,.1f}",
                f"{r.consul_requests / r.backends:,.1f}",
                str(r.max_standing),
                f"{per_1000:,.1f}",
            ]
        )
    lines += table(
        [
            "handler",
            "backends",
            "Consul requests per backend to start",
            "/status req/s (all)",
            "Consul requests",
            "Consul req/s",
            "per backend",
            "most standing per backend",
            "Consul req per 1000 /status",
        ],
        rows,
    )
    return [*lines, ""]


def plot(ax: Any, result: Result | None) -> None:
    ax.set_title("2. Consul requests/s under load (0 drawn as 0.01)")
    if result is None or not result.rows:
        return
    for kind in result.plan.kinds:
        rows = [r for r in result.rows if r.kind == kind]
        ax.plot(
            [r.backends for r in rows],
            [
                max(r.consul_requests / r.seconds, 0.01) if r.seconds else 0.01
                for r in rows
            ],
            marker="o",
            label=SHORT[kind],
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(result.plan.counts))
    ax.set_xticklabels([str(n) for n in result.plan.counts])
    ax.set_yscale("log")
    ax.set_xlabel("backend processes under load")
    ax.legend()
