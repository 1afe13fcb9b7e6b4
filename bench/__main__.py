"""``python -m bench [NAME...]``: run the benchmarks, print the report, plot.

::

    python -m bench                  # all of them (the fleet takes the longest)
    python -m bench throughput       # one (or several) by name
    python -m bench --smoke          # a tiny run that checks the tables come out
    python -m bench --help           # options

The four single-host benchmarks share one Consul dev agent on 127.0.0.1,
started here; the fleet starts its own cluster. Each benchmark's module
measures, renders its table and states its targets; this module runs the
chosen ones, prints one report, merges their figures into ``results.json``
and draws ``results.png`` (and the fleet its ``fleet.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common, consul_load, fleet, memory, propagation, throughput
from bench.common import (
    Bench,
    LoadGenerator,
    Pinning,
    Processes,
    progress,
    table,
)

BENCHMARKS: dict[str, Any] = {
    "throughput": throughput,
    "consul_load": consul_load,
    "propagation": propagation,
    "memory": memory,
    "fleet": fleet,
}
"""Every benchmark, in the order they run and report."""
SINGLE_HOST = ("throughput", "consul_load", "propagation", "memory")
"""The benchmarks that share the run's dev agent, and ``results.png``."""
CONNECTIONS = {False: 16, True: 4}
"""Keep-alive connections of the load generator, full run and smoke run."""


@dataclasses.dataclass(frozen=True)
class Run:
    """The facts of a run, in the report's header and beside each result."""

    smoke: bool
    date: str
    machine: str
    cores: int
    versions: str
    load_average: tuple[str, str]
    seconds: float


async def measure(
    names: Sequence[str],
    plans: dict[str, Any],
    bench: Bench,
) -> dict[str, Any]:
    """Run the benchmarks ``names``; their results by name.

    A smoke run's figures mean nothing, so it runs the single-host ones side
    by side (propagation, which flips the node's maintenance, only after the
    throughput rounds, whose backends must answer 200), then the fleet.
    """

    async def run(name: str) -> tuple[str, Any]:
        if not bench.smoke:
            number = list(BENCHMARKS).index(name) + 1
            progress(f"{number}. {name.replace('_', ' ')}")
        return name, await BENCHMARKS[name].measure(plans[name], bench)

    async def in_turn(group: Sequence[str]) -> list[tuple[str, Any]]:
        return [await run(name) for name in group]

    if not bench.smoke:
        return dict(await in_turn(names))
    single = [n for n in SINGLE_HOST if n in names]
    groups: list[list[str]] = [
        [n for n in ("throughput", "propagation") if n in single]
    ]
    groups += [[n] for n in single if n not in groups[0]]
    results = await asyncio.gather(*(in_turn(group) for group in groups if group))
    done = dict(pair for group in results for pair in group)
    if "fleet" in names:
        done.update(await in_turn(["fleet"]))
    return done


def render(run: Run, results: dict[str, Any]) -> str:
    """The report: a markdown table per benchmark, then the targets."""
    lines = [
        "## /status benchmark"
        + (" (SMOKE RUN: its figures mean nothing)" if run.smoke else ""),
        "",
        f"{run.date} · {run.cores} cores ({run.machine}) · "
        f"{run.versions} · load average {run.load_average[0]} at the "
        f"start, {run.load_average[1]} at the end · the run took "
        f"{run.seconds:.0f} s",
        "",
    ]
    for name, module in BENCHMARKS.items():
        if name == "memory":
            lines += memory.render(
                results.get("memory"), results.get("throughput"), run.smoke
            )
        elif name in results:
            lines += module.render(results[name])
    lines += ["**Targets**", ""]
    lines += table(
        ["target", "measured", "met"],
        [
            [
                name,
                measured,
                "n/a (smoke)" if run.smoke else ("yes" if met else "**NO**"),
            ]
            for key, module in BENCHMARKS.items()
            if key in results
            for name, measured, met in module.targets(results[key])
        ],
    )
    return "\n".join(lines) + "\n"


def plot(run: Run, results: dict[str, Any], path: Path | None) -> str:
    """``results.png``: one panel per single-host benchmark; say what was done."""
    plt = common.pyplot()
    if plt is None:
        return common.NO_MATPLOTLIB
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, name in zip([*axes[0], *axes[1]], SINGLE_HOST, strict=True):
        BENCHMARKS[name].plot(ax, results.get(name))
    fig.suptitle(
        f"sprockets-status-consul /status benchmark, {run.date}, "
        f"{run.cores} cores" + (" (SMOKE)" if run.smoke else "")
    )
    fig.tight_layout()
    return common.save(plt, fig, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark /status: throughput, Consul load, propagation, "
        "memory, and a fleet of backends on a Consul cluster. Prints markdown "
        "tables; writes results.json, results.png and fleet.png.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"the benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a run of a few seconds that checks the tables are produced "
        "(writes no files unless --out is given)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where results.json and the plots go (default: bench/; "
        "with --smoke: nowhere)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk if installed (auto; not in a smoke run), or bench.loadgen",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    for module in BENCHMARKS.values():
        module.add_arguments(parser)
    options = parser.parse_args(argv)
    unknown = sorted(set(options.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}: {', '.join(BENCHMARKS)}")
    return options


async def _run(
    names: Sequence[str], plans: dict[str, Any], bench: Bench
) -> tuple[Run, dict[str, Any]]:
    started = time.monotonic()
    load_average = common.load_average()
    try:
        results = await measure(names, plans, bench)
    finally:
        await bench.procs.stop_all()
    run = Run(
        smoke=bench.smoke,
        date=datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        machine=common.machine(),
        cores=os.cpu_count() or 0,
        versions=common.versions(bench.binary),
        load_average=(load_average, common.load_average()),
        seconds=time.monotonic() - started,
    )
    return run, results


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    smoke: bool = options.smoke
    names = [n for n in BENCHMARKS if n in options.names] or list(BENCHMARKS)
    plans = {n: BENCHMARKS[n].make_plan(smoke, options) for n in names}
    out: Path | None = options.out
    if out is None and not smoke:
        out = common.ROOT / "bench"
    use_wrk = {
        "wrk": True,
        "python": False,
        "auto": shutil.which("wrk") is not None and not smoke,
    }[options.loadgen]
    if use_wrk and shutil.which("wrk") is None:
        raise SystemExit("--loadgen wrk: wrk is not installed")
    binary = common.consul_binary()
    needs_agent = any(n in SINGLE_HOST for n in names)
    agent = common.start_agent(binary, "127.0.0.1") if needs_agent else None
    try:
        with tempfile.TemporaryDirectory(prefix="ssc-bench-") as logdir:
            procs = Processes(Path(logdir))
            pinning = Pinning.choose(not options.no_pin)
            load = LoadGenerator(
                procs, use_wrk, pinning, CONNECTIONS[smoke], in_process=smoke
            )
            bench = Bench(smoke, binary, agent, procs, load, pinning)
            run, results = asyncio.run(_run(names, plans, bench))
    finally:
        if agent is not None:
            agent.stop()
    print(render(run, results), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        common.write_results(out / "results.json", dataclasses.asdict(run), results)
    if any(n in results for n in SINGLE_HOST):
        print(plot(run, results, None if out is None else out / "results.png"))
    if "fleet" in results:
        print(fleet.plot(results["fleet"], None if out is None else out / "fleet.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
