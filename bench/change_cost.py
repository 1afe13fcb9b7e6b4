"""What a change costs a backend: CPU from the socket to the new status in memory.

``python -m bench.change_cost`` starts a Consul dev agent and, one after the
other, three processes following its node: :mod:`bench.floor` (the least a
Python process can do per change), and a backend (``python -m bench.backends
--kind watch --report-changes``, whose listener prints each change) with the
library's log at WARNING, then at INFO (one log line per change). It flips
node maintenance ``--flips`` times, and after each flip waits until the
process has reported the change: so each flip is one answer to one blocking
query, parsed, judged and stored. It reads the
backend's CPU time (every thread's, see :func:`bench.common.cpu_ns`) before
and after, takes away what the backend spends idle over as long, and prints
the CPU per change. The backend serves no request meanwhile. Linux only.

``--profile FILE`` also records the backend with ``py-spy`` (installed
separately) into FILE: a flame graph in SVG, or collapsed stacks when FILE
ends in ``.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import (
    Agent,
    Backend,
    Processes,
    cpu_ns,
    first_line,
    start_backends,
)

CHANGE_TIMEOUT = 10.0
"""Seconds a flip may take to reach the backend."""


async def flip(agent: Agent, backend: Backend, count: int, seen: int) -> int:
    """Flip ``count`` times, each awaited in the backend's report; flips made."""
    stdout = backend.process.stdout
    assert stdout is not None
    for number in range(seen, seen + count):
        agent.set_maintenance(number % 2 == 0, f"flip {number}")
        line = await asyncio.wait_for(stdout.readline(), CHANGE_TIMEOUT)
        if not line.startswith(b"status "):
            raise RuntimeError(f"flip {number}: the backend said {line!r}")
    return seen + count


CLIENTS = {
    "floor (bench.floor)": None,
    "library": ["--report-changes"],
    "library, INFO log line": ["--report-changes", "--log-info"],
}
"""What follows the node: the floor, and the library's backend (ttl 60 s),
with the library's log at WARNING and at INFO."""


async def start(procs: Processes, agent: Agent, options: list[str] | None) -> Backend:
    if options is not None:
        [backend] = await start_backends(
            procs, "watch", [agent.http_addr], options=["--ttl", "60", *options]
        )
        return backend
    args = [sys.executable, "-m", "bench.floor", "--consul", agent.http_addr]
    process, log = await procs.spawn(args, name="floor")
    word, _, pid = (await first_line(process, log, "bench.floor")).split()
    if word != "ready":
        raise RuntimeError(f"bench.floor said {word!r}")
    return Backend("floor", 0, int(pid), process)


async def measure(
    agent: Agent, options: list[str] | None, flips: int, profile: str | None
) -> tuple[int, float]:
    """A client's CPU over ``flips`` changes and its idle CPU over as long, in ns."""
    with tempfile.TemporaryDirectory(prefix="ssc-change-cost-") as logdir:
        procs = Processes(Path(logdir))
        try:
            backend = await start(procs, agent, options)
            pid = backend.pid
            seen = await flip(agent, backend, 10, 0)  # warm up
            idle_start, idle_cpu = time.monotonic(), cpu_ns(pid)
            await asyncio.sleep(1.0)
            idle_rate = (cpu_ns(pid) - idle_cpu) / (time.monotonic() - idle_start)

            spy = None
            if profile is not None:
                spy = subprocess.Popen(
                    ["py-spy", "record", "-p", str(pid), "-r", "1000", "-o", profile]
                    + (["-f", "raw"] if profile.endswith(".txt") else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await asyncio.sleep(1.0)  # py-spy attaches
            started, cpu_before = time.monotonic(), cpu_ns(pid)
            await flip(agent, backend, flips, seen)
            elapsed, cpu = time.monotonic() - started, cpu_ns(pid) - cpu_before
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
        finally:
            await procs.stop_all()
    return cpu, idle_rate * elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--profile", help="py-spy flame graph (SVG) to write")
    args = parser.parse_args(argv)
    if args.profile and shutil.which("py-spy") is None:
        print("--profile needs py-spy on PATH", file=sys.stderr)
        return 1

    agent = common.start_agent(common.consul_binary(), "127.0.0.1")
    print("| client | changes | CPU | idle CPU over as long | CPU per change |")
    print("|---|---|---|---|---|")
    try:
        for name, options in CLIENTS.items():
            profile = args.profile if name == "library" else None
            cpu, idle = asyncio.run(measure(agent, options, args.flips, profile))
            per_change_ms = (cpu - idle) / args.flips / 1e6
            print(
                f"| {name} | {args.flips} | {cpu / 1e6:.1f} ms "
                f"| {idle / 1e6:.1f} ms | {per_change_ms:.3f} ms |",
                flush=True,
            )
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
