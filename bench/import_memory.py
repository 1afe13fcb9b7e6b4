"""What importing the ``consul`` package costs a process in resident memory.

``python -m bench.import_memory`` starts a fresh interpreter per row, imports
Tornado's modules that the library uses, reads ``VmRSS`` from
``/proc/self/status``, imports the row's module and reads it again. The
``consul`` package's ``__init__`` imports its ``requests`` client, which this
library does not use; that is most of the difference. The package itself
imports its modules when one of its names is first used, so the last row is
what an application that uses the handler pays. Linux only.
"""

from __future__ import annotations

import subprocess
import sys

BASE = "import asyncio, tornado.web"

ROWS = [
    ("import consul.base", "consul.base"),
    ("import requests", "requests"),
    ("import sprockets_status_consul", "sprockets_status_consul"),
    ("import sprockets_status_consul.handler", "sprockets_status_consul.handler"),
]

PROBE = """
import importlib, sys
{base}

def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

before = rss()
importlib.import_module(sys.argv[1])
print(before, rss())
"""


def measure(module: str, runs: int = 5) -> tuple[float, float]:
    """Median RSS before and after importing ``module``, in KiB."""
    samples = []
    for _ in range(runs):
        output = subprocess.run(
            [sys.executable, "-c", PROBE.format(base=BASE), module],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        before, after = map(int, output.split())
        samples.append((before, after))
    samples.sort(key=lambda pair: pair[1] - pair[0])
    before, after = samples[len(samples) // 2]
    return before, after


def main() -> int:
    print(f"| after `{BASE}` | RSS before | RSS after | cost |")
    print("|---|---|---|---|")
    for name, module in ROWS:
        before, after = measure(module)
        print(
            f"| `{name}` | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB "
            f"| +{(after - before) / 1024:.1f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
