"""What a change costs a backend: CPU from the socket to the new status in memory.

``python -m bench.change_cost`` starts a Consul dev agent and one backend
process (``python -m tests.backend``) following its node, flips node
maintenance ``--flips`` times, and after each flip waits until the backend has
logged the change (the watcher logs each one): so each flip is one answer to
one blocking query, parsed, judged and stored. It reads the backend's CPU
time (every thread's, from ``/proc/<pid>/task/*/schedstat``, in ns) before
and after, takes away what the backend spends idle over as long, and prints
the CPU per change. The backend serves no request meanwhile. Linux only.

``--profile FILE`` also records the backend with ``py-spy`` (installed
separately) into FILE: a flame graph in SVG, or collapsed stacks when FILE
ends in ``.txt``.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.consul_agent import DevAgent, wait_for
from tests.fault_support import Backend, backends, set_maintenance

CHANGE_LINES = ("node maintenance enabled", "node maintenance disabled")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of process ``pid`` so far, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total


def logged_more_than(backend: Backend, count: int) -> bool:
    """Whether the backend has logged more than ``count`` changes."""
    changes = sum(
        1
        for line in backend.library_lines()
        if any(change in line for change in CHANGE_LINES)
    )
    return changes > count


def flip(agent: DevAgent, backend: Backend, count: int, seen: int) -> int:
    """Flip ``count`` times, each awaited in the backend's log; changes seen."""
    for number in range(seen, seen + count):
        set_maintenance(agent, number % 2 == 0, f"flip {number}")
        wait_for(
            functools.partial(logged_more_than, backend, number),
            10,
            interval=0.0005,
            message=f"flip {number} never reached the backend",
        )
    return seen + count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--profile", help="py-spy flame graph (SVG) to write")
    args = parser.parse_args(argv)

    with DevAgent() as agent, backends(agent.http_addr, [{"ttl": 60}]) as members:
        backend = members[0]
        pid = backend.process.pid
        wait_for(
            lambda: any("following Consul" in x for x in backend.library_lines()),
            10,
            message="the backend never followed the agent",
        )
        seen = flip(agent, backend, 10, 0)  # warm up
        idle_start, idle_cpu = time.monotonic(), cpu_ns(pid)
        time.sleep(1.0)
        idle_rate = (cpu_ns(pid) - idle_cpu) / (time.monotonic() - idle_start)

        spy = None
        if args.profile:
            py_spy = shutil.which("py-spy")
            if py_spy is None:
                print("--profile needs py-spy on PATH", file=sys.stderr)
                return 1
            spy = subprocess.Popen(
                [py_spy, "record", "-p", str(pid), "-r", "1000", "-o", args.profile]
                + (["-f", "raw"] if args.profile.endswith(".txt") else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
        started, cpu_before = time.monotonic(), cpu_ns(pid)
        flip(agent, backend, args.flips, seen)
        elapsed, cpu = time.monotonic() - started, cpu_ns(pid) - cpu_before
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)

    per_change_ms = (cpu - idle_rate * elapsed) / args.flips / 1e6
    print("| changes | backend CPU | idle CPU over as long | CPU per change |")
    print("|---|---|---|---|")
    print(
        f"| {args.flips} | {cpu / 1e6:.1f} ms | {idle_rate * elapsed / 1e6:.1f} ms "
        f"| {per_change_ms:.3f} ms |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
