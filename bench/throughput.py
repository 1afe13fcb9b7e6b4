"""1. Throughput of one backend process serving ``/status``.

A plain Tornado handler (the limit) and, to tell what the measurement and
the imports alone are worth, the same handler in another process and in one
that imports the library; the seed-style handler that asks Consul in
``prepare``, ``ConsulStatusHandler`` polling every TTL,
``ConsulStatusHandler`` with its defaults, and with its defaults and the
application's checks (three quick ones; one that takes 5 s).

Each kind is measured side by side with the plain handler: in each round,
the two backends share one core, each under a load generator of its own
(wrk, or :mod:`bench.loadgen`), at the same moment. The ratio of their
throughputs in that round is the ratio of their costs, and whatever slows
the machine meanwhile slows both; measured one after the other, rounds on a
shared virtual machine differ by more than the few per cent to be told.
Each round starts backends of its own, so that no process's luck (its hash
seed, its memory layout) weighs on every round.
Reported: medians over the rounds of those ratios, of the throughput and of
the 99th percentile of the latency. The backends are pinned to one core and
the load generators to another when ``taskset`` and two cores are there. The
backends must answer alike (status line, headers but ``Date``, body), or
their throughputs would not compare.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

from bench.common import (
    LABELS,
    SHORT,
    Backend,
    Bench,
    LoadResult,
    Target,
    cpu_ns,
    progress,
    start_backends,
    table,
    vm_rss_kb,
)

KINDS = tuple(LABELS)
"""Every kind of :data:`bench.common.KINDS`, in its order."""
TARGET_RATIO = 0.97
LATENCY_TOLERANCE = 1.1
"""The p99 latency with a check always running may exceed that without by
this factor, the rounds' noise on a shared machine, and still be no worse."""


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int
    round_seconds: float
    warmup_seconds: float


FULL = Plan(rounds=14, round_seconds=4.0, warmup_seconds=1.0)
"""14 rounds: each of the 7 other kinds takes each place in a round twice."""
SMOKE = Plan(rounds=2, round_seconds=0.1, warmup_seconds=0.0)


@dataclasses.dataclass
class Row:
    kind: str
    rates: list[float]
    cpu_us: list[float]
    """CPU time the backend process spent per answer, in microseconds."""
    non_200: int
    errors: int
    rss_kb: int
    p99_ms: list[float] = dataclasses.field(default_factory=list)
    """The 99th percentile of the latency in each round the load generator
    told it in."""
    ratios: list[float] = dataclasses.field(default_factory=list)
    """Its throughput over the plain handler's, side by side, each round."""
    cpu_ratios: list[float] = dataclasses.field(default_factory=list)
    """The plain handler's CPU per request over its own, each round."""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_us)

    @property
    def ratio(self) -> float:
        """The median of :attr:`ratios`: 1 for the plain handler, NaN (no
        target met) for another kind with no round measured."""
        return self._median_ratio(self.ratios)

    @property
    def cpu_ratio(self) -> float:
        return self._median_ratio(self.cpu_ratios)

    def _median_ratio(self, ratios: list[float]) -> float:
        if ratios:
            return statistics.median(ratios)
        return 1.0 if self.kind == "plain" else math.nan

    @property
    def p99_median(self) -> float | None:
        return statistics.median(self.p99_ms) if self.p99_ms else None


@dataclasses.dataclass
class Result:
    plan: Plan
    rows: list[Row]
    load_generator: str
    pinning: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, help="throughput rounds")
    parser.add_argument(
        "--round-seconds", type=float, help="seconds of each throughput round"
    )


def make_plan(smoke: bool, options: argparse.Namespace) -> Plan:
    plan = SMOKE if smoke else FULL
    if options.rounds:
        plan = dataclasses.replace(plan, rounds=options.rounds)
    if options.round_seconds:
        plan = dataclasses.replace(plan, round_seconds=options.round_seconds)
    return plan


async def fetch_raw(port: int) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """GET /status once: status line, headers (lower-case names), body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        line, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for header in lines:
            name, _, value = header.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10.0)
    finally:
        writer.close()
    return line, headers, body


async def answers_differ(reference: Backend, others: Sequence[Backend]) -> list[str]:
    """How the answers of ``others`` differ from that of ``reference``.

    Everything but the ``Date`` header must be the same, or the comparison
    of throughputs is not a fair one.
    """
    want_line, want_headers, want_body = await fetch_raw(reference.port)
    want_headers.pop(b"date", None)
    differences = []
    for backend in others:
        line, headers, body = await fetch_raw(backend.port)
        headers.pop(b"date", None)
        if (line, headers, body) != (want_line, want_headers, want_body):
            differences.append(
                f"{backend.kind} answers {line!r} {headers!r} {body!r}, "
                f"{reference.kind} {want_line!r} {want_headers!r} {want_body!r}"
            )
    return differences


async def measure(plan: Plan, bench: Bench) -> Result:
    results = {k: Row(k, [], [], 0, 0, 0) for k in KINDS}
    for round_ in range(plan.rounds):
        await _round(plan, bench, round_, results)
    return Result(
        plan, list(results.values()), bench.load.describe(), bench.pinning.how
    )


async def _round(
    plan: Plan, bench: Bench, round_: int, results: dict[str, Row]
) -> None:
    """One round, on backends of its own: each process has its own luck
    (hash seed, memory layout), which a run that kept its processes would
    count in every round."""
    agent, procs, load, pinning = (
        bench.dev_agent,
        bench.procs,
        bench.load,
        bench.pinning,
    )
    groups = await asyncio.gather(
        *(
            start_backends(procs, kind, [agent.http_addr], pinning.backend, pinning)
            for kind in KINDS
        ),
        return_exceptions=True,
    )
    backends = {group[0].kind: group[0] for group in groups if isinstance(group, list)}
    try:
        for group in groups:  # the others are stopped below, not at the run's end
            if isinstance(group, BaseException):
                raise group
        differences = await answers_differ(
            backends["plain"], [b for k, b in backends.items() if k != "plain"]
        )
        if differences:
            raise RuntimeError(
                "the backends do not answer alike, so their throughputs do not "
                "compare (did the library's handler change its answer?):\n"
                + "\n".join(differences)
            )
        for kind in KINDS:  # warm-up, not counted
            if plan.warmup_seconds > 0:
                await load.run([backends[kind].port], plan.warmup_seconds)
        others = [kind for kind in KINDS if kind != "plain"]
        shift = round_ % len(others)
        for kind in others[shift:] + others[:shift]:
            runs = await _pair(plan, bench, backends["plain"], backends[kind], results)
            progress(
                f"throughput round {round_ + 1} {kind}: {runs[1].rate:,.0f}/s "
                f"beside plain {runs[0].rate:,.0f}/s"
            )
        for kind, backend in backends.items():  # the last round's processes
            results[kind].rss_kb = vm_rss_kb(backend.pid)
    finally:
        await procs.stop(b.process for b in backends.values())


async def _pair(
    plan: Plan, bench: Bench, plain: Backend, other: Backend, results: dict[str, Row]
) -> list[LoadResult]:
    """Load ``plain`` and ``other`` at the same moment; add what each did,
    and the round's ratios of ``other``, to ``results``."""
    pair = (plain, other)
    cpu = [cpu_ns(b.pid) for b in pair]
    runs = await asyncio.gather(
        *(bench.load.run([b.port], plan.round_seconds) for b in pair)
    )
    per_request = []
    for backend, result, before in zip(pair, runs, cpu, strict=True):
        entry = results[backend.kind]
        entry.rates.append(result.rate)
        per_request.append(
            (cpu_ns(backend.pid) - before) / 1000 / max(result.requests, 1)
        )
        entry.cpu_us.append(per_request[-1])
        entry.non_200 += result.non_200
        entry.errors += result.errors
        if result.p99_ms is not None:
            entry.p99_ms.append(result.p99_ms)
    paired = side_by_side(runs[0], runs[1], per_request[0], per_request[1])
    if paired is not None:
        results[other.kind].ratios.append(paired[0])
        results[other.kind].cpu_ratios.append(paired[1])
    return list(runs)


def side_by_side(
    plain: LoadResult, other: LoadResult, plain_cpu_us: float, other_cpu_us: float
) -> tuple[float, float] | None:
    """The ratios of one round, ``other`` beside ``plain``: throughput over
    plain's, and plain's CPU per request over its own. None when either
    answered nothing: a load that failed, not a ratio (plain's 0 req/s would
    make any kind look many times faster)."""
    if plain.rate <= 0 or other.rate <= 0 or other_cpu_us <= 0:
        return None
    return other.rate / plain.rate, plain_cpu_us / other_cpu_us


def targets(result: Result) -> list[Target]:
    by_kind = {t.kind: t for t in result.rows}
    if "plain" not in by_kind:
        return []
    found = []
    for kind in ("watch", "checks"):
        if kind in by_kind:
            ratio = by_kind[kind].ratio
            cpu = by_kind[kind].cpu_ratio
            found.append(
                (
                    f"throughput {SHORT[kind]} / plain >= {TARGET_RATIO}",
                    f"{ratio:.3f} in req/s ({cpu:.3f} in CPU per request)",
                    ratio >= TARGET_RATIO,
                )
            )
    if "watch" in by_kind and "slow-check" in by_kind:
        slow, watch = by_kind["slow-check"].p99_median, by_kind["watch"].p99_median
        name = (
            f"p99 latency {SHORT['slow-check']} / {SHORT['watch']} "
            f"<= {LATENCY_TOLERANCE} (no worse)"
        )
        if slow is None or watch is None:
            found.append((name, "not measured", False))
        else:
            found.append(
                (
                    name,
                    f"{slow / watch:.3f} ({slow:.2f} ms / {watch:.2f} ms)",
                    slow <= watch * LATENCY_TOLERANCE,
                )
            )
    return found


def render(result: Result) -> list[str]:
    plan = result.plan
    by_kind = {t.kind: t for t in result.rows}
    if "plain" not in by_kind:
        return []
    lines = [
        f"**1. Throughput** of one backend process serving `/status`, side by "
        f"side with the plain handler: in each of {plan.rounds} rounds, on "
        "backend processes started for it (a process's own luck, its hash seed "
        "and memory layout, would otherwise weigh on every round), and for "
        f"{plan.round_seconds:g} s (after {plan.warmup_seconds:g} s of warm-up "
        "each, alone), every other kind in turn shares one core with the plain "
        "handler, each under a load of its own at the same moment, so req/s is "
        "half a core's worth and the ratio of the two is that of their costs "
        "whatever the machine does meanwhile. Medians over the rounds. Load: "
        f"{result.load_generator}, one per backend. Pinning: {result.pinning}. "
        "The backends talk to the agent directly (no proxy), and answer alike: "
        "the same status line, headers (but `Date`) and body, checked first. "
        "CPU µs per request: the backend process's CPU time (all threads, "
        "/proc) over its answers. p99: the 99th percentile of the latency of "
        "`/status` under that load (wrk's `--latency`, or one answer in ten of "
        "bench.loadgen's).",
        "",
    ]
    rows = []
    for t in result.rows:
        notes = []
        if t.non_200:
            notes.append(f"{t.non_200} not 200")
        if t.errors:
            notes.append(f"{t.errors} socket errors")
        rows.append(
            [
                LABELS[t.kind],
                f"{t.median:,.0f}",
                f"{min(t.rates):,.0f} to {max(t.rates):,.0f}",
                f"{t.ratio:.3f}",
                f"{t.cpu_median:,.0f}",
                f"{t.cpu_ratio:.3f}",
                "n/a" if t.p99_median is None else f"{t.p99_median:.2f}",
                ", ".join(notes),
            ]
        )
    lines += table(
        [
            "handler",
            "req/s (median)",
            "min to max",
            "ratio to plain (side by side)",
            "CPU µs per request (median)",
            "plain's CPU / this CPU (side by side)",
            "p99 ms (median)",
            "notes",
        ],
        rows,
    )
    return [*lines, ""]


def plot(ax: Any, result: Result | None) -> None:
    ax.set_title("1. throughput of one backend (req/s, ratio to plain)")
    rows = {t.kind: t for t in result.rows} if result else {}
    if "plain" not in rows:
        return
    by_kind = {kind: row.median for kind, row in rows.items()}
    bars = ax.bar([SHORT[k] for k in by_kind], list(by_kind.values()))
    for bar, (kind, value) in zip(bars, by_kind.items(), strict=True):
        ax.annotate(
            f"{value:,.0f}\n({rows[kind].ratio:.2f})",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, max(by_kind.values()) * 1.2)
