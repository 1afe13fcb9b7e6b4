"""3. Propagation: node maintenance flipped, until every backend answers it.

N backends polled every few milliseconds over keep-alive connections; the
time from ``consul maint -enable``/``-disable`` (the CLI, and ``PUT
/v1/agent/maintenance``) returning until every backend answers the new
status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import (
    Agent,
    Bench,
    Target,
    clean_env,
    consul_api,
    die_with_parent,
    progress,
    start_backends,
    table,
)
from bench.loadgen import KeepAliveClient, percentile
from sprockets_status_consul.watcher import MIN_QUERY_INTERVAL, QUERY_DITHER

TARGET_MS = {4: 25.0, 16: 50.0}


@dataclasses.dataclass(frozen=True)
class Plan:
    counts: tuple[int, ...]
    flips: int
    """Flips per direction, per flip method and backend count."""
    methods: tuple[str, ...]
    poll_interval: float


PAUSE = MIN_QUERY_INTERVAL + QUERY_DITHER
"""Seconds at least between two flips: what the watcher's rate limit takes."""
FULL = Plan(counts=(4, 16), flips=10, methods=("cli", "api"), poll_interval=0.002)
SMOKE = Plan(counts=(2,), flips=1, methods=("cli", "api"), poll_interval=0.002)


@dataclasses.dataclass
class Flip:
    backends: int
    method: str
    direction: str
    ms: float
    """From the command returning until every backend answered the new status."""
    command_ms: float
    """How long the command itself took."""
    early: bool
    """Every backend answered the new status before the command returned."""


@dataclasses.dataclass
class Result:
    plan: Plan
    flips: list[Flip]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--poll-ms",
        type=float,
        help=f"how often the propagation test polls each backend "
        f"(default {FULL.poll_interval * 1000:g} ms)",
    )


def make_plan(smoke: bool, options: argparse.Namespace) -> Plan:
    plan = SMOKE if smoke else FULL
    if options.poll_ms:
        plan = dataclasses.replace(plan, poll_interval=options.poll_ms / 1000)
    return plan


class Poller:
    """Polls one backend's ``/status``; remembers since when it answers what."""

    def __init__(self, port: int, interval: float, on_change: Callable[[], None]):
        self.port = port
        self.interval = interval
        self.on_change = on_change
        self.code = 0
        self.since = 0.0
        self.changes = 0
        self.polls = 0
        self.error: BaseException | None = None

    async def run(self, deadline: float, max_polls: int) -> None:
        client = await KeepAliveClient.connect(self.port)
        try:
            while self.polls < max_polls and time.monotonic() < deadline:
                code = await client.get()
                now = time.monotonic()
                self.polls += 1
                if code != self.code:
                    self.code, self.since = code, now
                    self.changes += 1
                    self.on_change()
                await asyncio.sleep(self.interval)
        except (OSError, ConnectionError) as error:
            self.error = error
            self.on_change()
        finally:
            client.close()


class Pollers:
    """The pollers of N backends; waits until all of them answer a code."""

    def __init__(self, ports: Sequence[int], interval: float) -> None:
        self._event = asyncio.Event()
        self.pollers = [Poller(p, interval, self._event.set) for p in ports]

    def all_answer(self, code: int) -> bool:
        return all(p.code == code for p in self.pollers)

    def errors(self) -> list[BaseException]:
        return [p.error for p in self.pollers if p.error is not None]

    async def wait_for(self, code: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.all_answer(code):
            if self.errors():
                raise RuntimeError(f"a poller failed: {self.errors()[0]!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)
        return True


async def _flip_cli(agent: Agent, enable: bool, reason: str) -> float:
    args = ["maint", "-enable", "-reason", reason] if enable else ["maint", "-disable"]
    process = await asyncio.create_subprocess_exec(
        agent.binary,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(CONSUL_HTTP_ADDR=agent.url),
        preexec_fn=die_with_parent,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30.0)
    returned = time.monotonic()
    if process.returncode != 0:
        raise RuntimeError(f"consul {' '.join(args)} failed: {out!r} {err!r}")
    return returned


async def _flip_api(client: KeepAliveClient, enable: bool, reason: str) -> float:
    query = {"enable": "true", "reason": reason} if enable else {"enable": "false"}
    code = await consul_api(client, "PUT", "/v1/agent/maintenance", query)
    returned = time.monotonic()
    if code != 200:
        raise RuntimeError(f"PUT /v1/agent/maintenance answered {code}")
    return returned


async def measure(plan: Plan, bench: Bench) -> Result:
    agent, procs = bench.dev_agent, bench.procs
    flips: list[Flip] = []
    api = await KeepAliveClient.connect(agent.http_port, agent.host)
    try:
        for count in plan.counts:
            backends = await start_backends(procs, "watch", [agent.http_addr] * count)
            pollers = Pollers([b.port for b in backends], plan.poll_interval)
            budget = 60.0 + 2.0 * plan.flips * len(plan.methods)
            deadline = time.monotonic() + budget
            max_polls = int(budget / plan.poll_interval) + 1
            tasks = [
                asyncio.ensure_future(p.run(deadline, max_polls))
                for p in pollers.pollers
            ]
            try:
                await _flip_api(api, False, "")
                if not await pollers.wait_for(200, 5.0):
                    raise RuntimeError("the backends do not answer 200 to start with")
                for method in plan.methods:
                    for i in range(2 * plan.flips):
                        enable = i % 2 == 0
                        flips.append(
                            await _one_flip(agent, api, pollers, count, method, enable)
                        )
                        # Past the watcher's rate limit (a change less than
                        # MIN_QUERY_INTERVAL after the last one waits for it).
                        await asyncio.sleep(random.uniform(PAUSE, 2 * PAUSE))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await procs.stop(b.process for b in backends)
    finally:
        with contextlib.suppress(Exception):
            await _flip_api(api, False, "")
        api.close()
    return Result(plan, flips)


async def _one_flip(
    agent: Agent,
    api: KeepAliveClient,
    pollers: Pollers,
    count: int,
    method: str,
    enable: bool,
) -> Flip:
    target = 503 if enable else 200
    reason = f"bench {time.time():.3f}"
    started = time.monotonic()
    if method == "cli":
        returned = await _flip_cli(agent, enable, reason)
    else:
        returned = await _flip_api(api, enable, reason)
    if not await pollers.wait_for(target, 5.0):
        late = sum(p.code != target for p in pollers.pollers)
        raise RuntimeError(f"{late} of {count} backends did not answer {target} in 5 s")
    reached = max(p.since for p in pollers.pollers)
    changes = sum(p.changes for p in pollers.pollers)
    await asyncio.sleep(max(0.02, 3 * pollers.pollers[0].interval))
    if (
        not pollers.all_answer(target)
        or sum(p.changes for p in pollers.pollers) != changes
    ):
        raise RuntimeError("a backend went back to the old status after a flip")
    flip = Flip(
        backends=count,
        method=method,
        direction="enable" if enable else "disable",
        ms=max(0.0, reached - returned) * 1000,
        command_ms=(returned - started) * 1000,
        early=reached < returned,
    )
    progress(
        f"propagation x{count} {method} {flip.direction}: {flip.ms:.1f} ms "
        f"(command {flip.command_ms:.1f} ms)"
    )
    return flip


def targets(result: Result) -> list[Target]:
    out = []
    for count in result.plan.counts:
        limit = TARGET_MS.get(count)
        flips = [f.ms for f in result.flips if f.backends == count]
        if limit is None or not flips:
            continue
        out.append(
            (
                f"propagation worst, {count} backends <= {limit:g} ms",
                f"{max(flips):.1f} ms (all flips, both ways, cli and api)",
                max(flips) <= limit,
            )
        )
    return out


def render(result: Result) -> list[str]:
    plan = result.plan
    if not result.flips:
        return []
    lines = [
        "**3. Propagation**: from the maintenance command returning until every "
        f"backend answers the new status; each backend polled every "
        f"{plan.poll_interval * 1000:g} ms over a keep-alive connection; "
        f"{plan.flips} flips each way. `cli`: `consul maint -enable/-disable`, "
        "timed from the process exiting; `api`: `PUT /v1/agent/maintenance`, "
        "timed from its answer. 0 ms: every backend answered the new status "
        "before the command returned (last column). p99 is nearest-rank.",
        "",
    ]
    rows = []
    for count in plan.counts:
        for method in plan.methods:
            for direction in ("enable", "disable", "both"):
                flips = [
                    f
                    for f in result.flips
                    if f.backends == count
                    and f.method == method
                    and direction in (f.direction, "both")
                ]
                if not flips:
                    continue
                ms = [f.ms for f in flips]
                rows.append(
                    [
                        str(count),
                        method,
                        direction,
                        str(len(flips)),
                        f"{statistics.median(ms):.1f}",
                        f"{percentile(ms, 0.99):.1f}",
                        f"{max(ms):.1f}",
                        f"{statistics.median(f.command_ms for f in flips):.1f}",
                        str(sum(f.early for f in flips)),
                    ]
                )
    lines += table(
        [
            "backends",
            "via",
            "flip",
            "flips",
            "median ms",
            "p99 ms",
            "worst ms",
            "command took (median ms)",
            "flips seen before it returned",
        ],
        rows,
    )
    return [*lines, ""]


def plot(ax: Any, result: Result | None) -> None:
    ax.set_title("3. propagation, ms until every backend answers (dashed: targets)")
    if result is None or not result.flips:
        return
    plan = result.plan
    groups = [(count, method) for count in plan.counts for method in plan.methods]
    data = [
        [f.ms for f in result.flips if f.backends == c and f.method == m]
        for c, m in groups
    ]
    ax.boxplot(data, whis=(0, 100))
    ax.set_xticks(range(1, len(groups) + 1))
    ax.set_xticklabels([f"{c} backends\n{m}" for c, m in groups])
    for count in plan.counts:
        limit = TARGET_MS.get(count)
        if limit is not None:
            ax.axhline(limit, linestyle="--", color="grey", linewidth=0.8)
