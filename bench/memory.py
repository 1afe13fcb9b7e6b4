"""4. Memory: VmRSS of backend processes with and without the watcher.

Measured after warm-up traffic; the table also shows the throughput
backends after their rounds when that benchmark ran.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
from typing import Any

from bench import throughput
from bench.common import (
    LABELS,
    SHORT,
    Backend,
    Bench,
    Target,
    mb,
    start_backends,
    table,
    vm_rss_kb,
)
from bench.loadgen import KeepAliveClient

KINDS = ("plain", "plain-import", "watch")
TARGET_KB = 2048


@dataclasses.dataclass(frozen=True)
class Plan:
    processes: int
    warmup: int
    """Requests each process answers before it is measured."""


FULL = Plan(processes=3, warmup=5000)
SMOKE = Plan(processes=1, warmup=100)


@dataclasses.dataclass
class Row:
    kind: str
    rss_kb: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.rss_kb)


@dataclasses.dataclass
class Result:
    plan: Plan
    rows: list[Row]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own."""


def make_plan(smoke: bool, options: argparse.Namespace) -> Plan:
    return SMOKE if smoke else FULL


async def measure(plan: Plan, bench: Bench) -> Result:
    procs, address = bench.procs, bench.dev_agent.http_addr
    backends: dict[str, list[Backend]] = {}
    try:
        for kind in KINDS:
            backends[kind] = await start_backends(
                procs, kind, [address] * plan.processes
            )

        async def warm_up(backend: Backend) -> None:
            client = await KeepAliveClient.connect(backend.port)
            try:
                for _ in range(plan.warmup):
                    await client.get()
            finally:
                client.close()

        everyone = [b for group in backends.values() for b in group]
        await asyncio.wait_for(asyncio.gather(*(warm_up(b) for b in everyone)), 120)
        await asyncio.sleep(0.3)
        rows = [
            Row(kind, [vm_rss_kb(b.pid) for b in group])
            for kind, group in backends.items()
        ]
        return Result(plan, rows)
    finally:
        await procs.stop(b.process for group in backends.values() for b in group)


def targets(result: Result) -> list[Target]:
    memory = {m.kind: m.median for m in result.rows}
    if "watch" not in memory or "plain" not in memory:
        return []
    overhead = memory["watch"] - memory["plain"]
    watcher = memory["watch"] - memory.get("plain-import", memory["plain"])
    return [
        (
            f"watcher memory overhead <= {TARGET_KB / 1024:g} MiB",
            f"{overhead / 1024:+.1f} MiB ({watcher / 1024:+.1f} MiB of it "
            "after the imports)",
            overhead <= TARGET_KB,
        )
    ]


def render(
    result: Result | None, rounds: throughput.Result | None, smoke: bool
) -> list[str]:
    """The table; with ``rounds``, also the throughput backends after them."""
    memory = {m.kind: m for m in result.rows} if result else {}
    after = {t.kind: t.rss_kb for t in rounds.rows} if rounds else {}
    if not memory and not after:
        return []
    plan = result.plan if result else SMOKE if smoke else FULL
    lines = [
        f"**4. Memory**: VmRSS after {plan.warmup} warm-up requests, "
        f"median of {plan.processes} processes each; and of the "
        "throughput backends after the last throughput round (one round's load; "
        "the plain handler's, one per other kind).",
        "",
    ]
    plain = memory.get("plain")
    rows = []
    for kind in LABELS:
        m = memory.get(kind)
        if m is None and kind not in after:
            continue
        rows.append(
            [
                LABELS[kind],
                mb(m.median) if m else "-",
                f"{(m.median - plain.median) / 1024:+.1f} MiB" if m and plain else "-",
                mb(after[kind]) if kind in after else "-",
            ]
        )
    lines += table(
        ["process", "after warm-up", "vs plain", "after the last throughput round"],
        rows,
    )
    return [*lines, ""]


def plot(ax: Any, result: Result | None) -> None:
    ax.set_title("4. resident memory after warm-up, MiB")
    if result is None or not result.rows:
        return
    ax.bar(
        [SHORT[m.kind] for m in result.rows],
        [m.median / 1024 for m in result.rows],
        color="#55a868",
    )
