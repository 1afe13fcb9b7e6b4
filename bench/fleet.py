"""5. Fleet: B backends on K Consul client agents, all following one key.

One Consul server (127.0.0.2) and K client agents (127.0.0.3, ...) on
loopback, and B backend processes spread over the clients, each following
its node and a fleet-wide KV key, first with the defaults (blocking queries),
then with ``"blocking": False`` (TTL polling). For each B and mode:

* **idle**: for ``idle_seconds`` (by default longer than TCP's 60 s of
  TIME-WAIT, so what is counted at the end is what an idle fleet holds):
  the backends' CPU, the server's CPU, and at the end the sockets on the
  agents' HTTP ports in ``ss -tan``, every state, TIME-WAIT included;
* **flips**: the key written (``PUT``) and deleted in turn through the
  server's HTTP API; each backend prints the moment its answer changes
  (:class:`bench.backends.ChangeReporter`), so nothing polls ``/status``
  while a change spreads. A flip's figure for a backend is the time from the
  write being sent until it took the change. After each flip every backend's
  ``/status`` must answer the new status. The backends' CPU over each flip,
  less what they spend idle in as long, divided by the changes, is the CPU a
  change costs a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common
from bench.common import TTL, Backend, Bench, Target, cpu_ns, progress
from bench.loadgen import KeepAliveClient, percentile

TARGET_WORST_MS = {64: 25.0}
TARGET_CPU_MS = 0.3
MODES = {"blocking": "watch", "polling": "poll", "floor": "floor"}
"""The library's two ways to follow Consul, and the backend kind of each; and
the floor, :mod:`bench.floor` following the key and doing nothing else: what
Consul and the machine allow any client."""
STATUS_CODE = {"maintenance": 503, "ok": 200}
SETTLE = 0.1
"""Seconds after the last backend took a change before its CPU is read."""
QUICK_STOP = ("-hcl", "leave_on_terminate = false")
"""Client agents exit on SIGTERM at once, not after leaving the cluster (4 s)."""
START_BATCH = 16
"""Backends that start at once (imports take CPU: 2 cores, 128 processes)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    counts: tuple[int, ...]
    """B: backend processes."""
    agents: int
    """K: client agents, besides the server."""
    flips: int
    idle_seconds: float
    ttl: float | None
    """The backends' TTL; None for the library's default."""


FULL = Plan(counts=(16, 64, 128), agents=4, flips=10, idle_seconds=70.0, ttl=None)
SMOKE = Plan(counts=(4,), agents=2, flips=2, idle_seconds=1.0, ttl=1.0)


@dataclasses.dataclass
class Flip:
    direction: str
    """``enable`` (the key written) or ``disable`` (deleted)."""
    write_ms: float
    """How long Consul took to answer the write."""
    ms: list[float]
    """For each backend, from the write being sent until it took the change."""


@dataclasses.dataclass
class Row:
    mode: str
    backends: int
    agents: int
    flips: list[Flip]
    cpu_change_ms: float
    """Backends' CPU per change per backend, idle CPU taken off."""
    backend_idle_ms_per_min: float
    """One backend's CPU per minute while nothing changes (the mean)."""
    server_idle_s_per_min: float
    server_flipping_s_per_min: float
    sockets: dict[str, dict[str, dict[str, int]]]
    """By agent HTTP address: by side (``agent``: the socket's local address
    is the agent's port; ``client``: its peer is) and state (``ss`` names),
    at the end of the idle time."""

    def latencies(self) -> list[float]:
        return [ms for flip in self.flips for ms in flip.ms]

    def held(self) -> list[int]:
        """Per agent, the sockets on its HTTP port, each connection once.

        The agent's end of each connection (and its listener), and the
        backend's end of a closed one still lingering (TIME-WAIT): whichever
        side closes first, a connection that churns shows.
        """
        return [
            sum(s["agent"].values())
            + sum(n for state, n in s["client"].items() if state != "ESTAB")
            for s in self.sockets.values()
        ]

    def state(self, state: str) -> int:
        """Sockets in ``state`` on the agents' HTTP ports, both ends."""
        return sum(
            side.get(state, 0) for s in self.sockets.values() for side in s.values()
        )


@dataclasses.dataclass
class Result:
    plan: Plan
    rows: list[Row]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fleet")
    group.add_argument(
        "--backends",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        help=f"fleet sizes B, e.g. 16,64 (default {','.join(map(str, FULL.counts))})",
    )
    group.add_argument("--agents", type=int, help=f"K (default {FULL.agents})")
    group.add_argument("--flips", type=int, help=f"flips (default {FULL.flips})")
    group.add_argument(
        "--idle-seconds",
        type=float,
        help=f"seconds of idle before the flips (default {FULL.idle_seconds:g})",
    )


def make_plan(smoke: bool, options: argparse.Namespace) -> Plan:
    plan = SMOKE if smoke else FULL
    changes = {
        "counts": options.backends,
        "agents": options.agents,
        "flips": options.flips,
        "idle_seconds": options.idle_seconds,
    }
    return dataclasses.replace(
        plan, **{k: v for k, v in changes.items() if v is not None}
    )


class Cluster:
    """One Consul server on 127.0.0.2, K client agents on 127.0.0.3 on, joined.

    Starting agents blocks the event loop for a few seconds: the fleet runs
    alone (see :func:`bench.__main__.measure`).
    """

    def __init__(self, binary: str, clients: int) -> None:
        self.server = common.start_agent(binary, "127.0.0.2")
        self.clients: list[common.Agent] = []
        try:
            join = f"-retry-join={self.server.host}:{self.server.ports['serf_lan']}"
            for i in range(clients):
                self.clients.append(
                    common.start_agent(
                        binary,
                        f"127.0.0.{3 + i}",
                        ["-server=false", "-bootstrap=false", join, *QUICK_STOP],
                    )
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for agent in [*self.clients, self.server]:
            agent.stop()


class Changes:
    """Reads the backends' ``status MONOTONIC STATUS`` lines as they come."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.last: list[tuple[float, str]] = [(0.0, "ok") for _ in backends]
        self._event = asyncio.Event()
        self._tasks = [
            asyncio.ensure_future(self._read(i, b)) for i, b in enumerate(backends)
        ]

    async def _read(self, i: int, backend: Backend) -> None:
        stdout = backend.process.stdout
        assert stdout is not None
        while line := await stdout.readline():
            word, at, status = line.decode().split()
            if word == "status":
                self.last[i] = (float(at), status)
                self._event.set()

    async def wait(self, status: str, since: float, timeout: float) -> list[float]:
        """When each backend took ``status`` after ``since``; [] on timeout."""
        deadline = time.monotonic() + timeout
        while not all(s == status and at >= since for at, s in self.last):
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except asyncio.TimeoutError:
                return []
        return [at for at, _ in self.last]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def count_sockets(addresses: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """Sockets of ``ss -tan`` on each address, by side and state."""
    out = subprocess.run(
        ["ss", "-tan"], capture_output=True, text=True, check=True
    ).stdout
    counts = {
        a: {"agent": collections.Counter[str](), "client": collections.Counter[str]()}
        for a in addresses
    }
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        state, local, peer = fields[0], fields[3], fields[4]
        if local in counts:
            counts[local]["agent"][state] += 1
        if peer in counts:
            counts[peer]["client"][state] += 1
    return {
        a: {side: dict(c) for side, c in sides.items()} for a, sides in counts.items()
    }


async def measure(plan: Plan, bench: Bench) -> Result:
    started = time.monotonic()
    cluster = Cluster(bench.binary, plan.agents)
    progress(
        f"fleet: Consul server and {plan.agents} client agents up in "
        f"{time.monotonic() - started:.1f} s"
    )
    api = await KeepAliveClient.connect(cluster.server.http_port, cluster.server.host)
    key = f"sprockets-status-consul/bench/fleet-{secrets.token_hex(4)}"
    try:
        rows = []
        for count in plan.counts:
            for mode in MODES:
                rows.append(await _fleet(plan, bench, cluster, api, key, count, mode))
        return Result(plan, rows)
    finally:
        api.close()
        cluster.stop()


async def _start(
    plan: Plan, bench: Bench, cluster: Cluster, key: str, count: int, kind: str
) -> list[Backend]:
    addresses = [cluster.clients[i % plan.agents].http_addr for i in range(count)]
    if kind == "floor":
        return await _start_floor(bench, addresses, key)
    options = ["--key", key, "--report-changes"]
    if plan.ttl is not None:
        options += ["--ttl", f"{plan.ttl:g}"]
    backends: list[Backend] = []
    for first in range(0, count, START_BATCH):
        batch = addresses[first : first + START_BATCH]
        backends += await common.start_backends(
            bench.procs, kind, batch, options=options, timeout=120.0
        )
    return backends


async def _start_floor(bench: Bench, addresses: list[str], key: str) -> list[Backend]:
    started = []
    for address in addresses:
        args = [sys.executable, "-m", "bench.floor", "--consul", address, "--key", key]
        started.append(await bench.procs.spawn(args, name="floor"))
    backends = []
    for process, log in started:
        word, _, pid = (await common.first_line(process, log, "bench.floor")).split()
        if word != "ready":
            raise RuntimeError(f"bench.floor said {word!r}")
        backends.append(Backend("floor", 0, int(pid), process))
    return backends


async def _fleet(
    plan: Plan,
    bench: Bench,
    cluster: Cluster,
    api: KeepAliveClient,
    key: str,
    count: int,
    mode: str,
) -> Row:
    if await common.consul_api(api, "DELETE", f"/v1/kv/{key}") != 200:
        raise RuntimeError(f"cannot delete the key {key}")
    progress(f"fleet {mode} x{count}: starting the backends")
    backends = await _start(plan, bench, cluster, key, count, MODES[mode])
    changes = Changes(backends)
    # The floor serves no /status: its reports are all there is to check.
    clients = [await KeepAliveClient.connect(b.port) for b in backends if b.port]
    pids = [b.pid for b in backends]
    server = cluster.server.pid
    assert server is not None
    try:
        await _check(clients, "ok")
        progress(f"fleet {mode} x{count}: {plan.idle_seconds:g} s idle")
        started, idle_cpu, server_cpu = time.monotonic(), _cpu(pids), cpu_ns(server)
        await asyncio.sleep(plan.idle_seconds)
        sockets = count_sockets([a.http_addr for a in cluster.clients])
        idle = time.monotonic() - started
        idle_rate = (_cpu(pids) - idle_cpu) / idle  # ns per s, all backends
        server_idle = (cpu_ns(server) - server_cpu) / idle

        flips: list[Flip] = []
        flip_cpu, flip_seconds = 0, 0.0
        started, server_cpu = time.monotonic(), cpu_ns(server)
        for i in range(plan.flips):
            # Polling backends see a change at their next poll: flip at any
            # point of their TTL, not just after they all took the last one.
            ttl = (plan.ttl or TTL) if mode == "polling" else 0.4
            await asyncio.sleep(random.uniform(0.2, ttl))
            before, cpu = time.monotonic(), _cpu(pids)
            flips.append(await _flip(plan, api, key, changes, i % 2 == 0))
            await asyncio.sleep(SETTLE)
            flip_cpu += _cpu(pids) - cpu
            flip_seconds += time.monotonic() - before
            await _check(clients, "maintenance" if i % 2 == 0 else "ok")
            progress(
                f"fleet {mode} x{count} {flips[-1].direction}: worst "
                f"{max(flips[-1].ms):.1f} ms"
            )
        flipping = time.monotonic() - started
        server_flipping = (cpu_ns(server) - server_cpu) / flipping
    finally:
        for client in clients:
            client.close()
        await changes.close()
        await bench.procs.stop(b.process for b in backends)
    return Row(
        mode=mode,
        backends=count,
        agents=plan.agents,
        flips=flips,
        cpu_change_ms=(flip_cpu - idle_rate * flip_seconds)
        / (count * plan.flips)
        / 1e6,
        backend_idle_ms_per_min=idle_rate * 60 / count / 1e6,
        server_idle_s_per_min=server_idle * 60 / 1e9,
        server_flipping_s_per_min=server_flipping * 60 / 1e9,
        sockets=sockets,
    )


def _cpu(pids: Sequence[int]) -> int:
    return sum(cpu_ns(pid) for pid in pids)


async def _flip(
    plan: Plan, api: KeepAliveClient, key: str, changes: Changes, enable: bool
) -> Flip:
    """Write or delete the key; wait until every backend took it."""
    status = "maintenance" if enable else "ok"
    method, body = ("PUT", b"bench flip") if enable else ("DELETE", b"")
    sent = time.monotonic()
    code = await common.consul_api(api, method, f"/v1/kv/{key}", body=body)
    write_ms = (time.monotonic() - sent) * 1000
    if code != 200:
        raise RuntimeError(f"{method} /v1/kv/{key} answered {code}")
    timeout = (plan.ttl or TTL) + 10.0
    times = await changes.wait(status, sent, timeout)
    if not times:
        late = sum(s != status or at < sent for at, s in changes.last)
        raise RuntimeError(
            f"{late} of {len(changes.last)} backends did not report {status!r} "
            f"within {timeout:g} s of the key's change (a backend reports what "
            "its watcher answers on each of the library's log lines)"
        )
    return Flip(
        "enable" if enable else "disable",
        write_ms,
        [(at - sent) * 1000 for at in times],
    )


async def _check(clients: Sequence[KeepAliveClient], status: str) -> None:
    """Every backend's ``/status`` answers ``status``."""
    codes = await asyncio.gather(*(c.get() for c in clients))
    wrong = sum(code != STATUS_CODE[status] for code in codes)
    if wrong:
        raise RuntimeError(f"{wrong} backends do not answer {status!r}: {codes}")


def targets(result: Result) -> list[Target]:
    out: list[Target] = []
    for row in result.rows:
        if row.mode != "blocking":
            continue
        b, k = row.backends, row.agents
        limit = TARGET_WORST_MS.get(b)
        if limit is not None:
            worst = max(row.latencies())
            out.append(
                (
                    f"fleet, {b} backends: key flip to every backend <= {limit:g} ms",
                    f"worst {worst:.1f} ms of {len(row.flips)} flips",
                    worst <= limit,
                )
            )
        sockets = sum(row.held())
        out.append(
            (
                f"fleet, {b} backends on {k} agents: sockets on the agents' "
                f"HTTP ports while idle <= B + K = {b + k}",
                f"{sockets} ({row.state('TIME-WAIT')} in TIME-WAIT)",
                sockets <= b + k,
            )
        )
        out.append(
            (
                f"fleet, {b} backends: CPU per change per backend "
                f"<= {TARGET_CPU_MS:g} ms",
                f"{row.cpu_change_ms:.2f} ms",
                row.cpu_change_ms <= TARGET_CPU_MS,
            )
        )
    return out


def render(result: Result) -> list[str]:
    plan = result.plan
    if not result.rows:
        return []
    ttl = f"{plan.ttl:g} s" if plan.ttl is not None else f"the default {TTL:g} s"
    lines = [
        f"**5. Fleet**: one Consul server and {plan.agents} client agents on "
        f"loopback, B backend processes spread over the clients, each "
        f"following its node and one KV key (TTL {ttl}); blocking: the "
        'defaults; polling: `"blocking": False`; floor: `bench.floor`, a bare '
        "asyncio client following the key with one blocking query and doing "
        "nothing else (the least any Python client costs). Flip: the key written or "
        f"deleted, {plan.flips} flips in turn, after a pause of 0.2 to 0.4 s "
        "(polling: 0.2 s to a TTL, so that flips land anywhere in the polls' "
        "cycle); ms from the write being sent "
        "until a backend took the change, reported by the backend itself "
        "(median and nearest-rank p99 of every backend in every flip; worst: "
        "the last backend of the slowest flip). CPU per change: the "
        "backends' CPU over the flips, less their idle CPU in as long, per "
        "change per backend (when polling, changes come with polls made "
        "anyway: noise around 0). Server CPU: seconds of CPU per minute, over "
        f"{plan.idle_seconds:g} s idle and over the flips. Sockets: `ss -tan` "
        f"after {plan.idle_seconds:g} s idle, on the agents' HTTP ports, each "
        "connection once: the agent's end (listeners included), and the "
        "backend's end of a closed connection (TIME-WAIT, whichever side "
        "closed first). Targets in the headers.",
        "",
    ]
    rows = []
    for row in result.rows:
        ms = row.latencies()
        b, k = row.backends, row.agents
        worst = TARGET_WORST_MS.get(b)
        rows.append(
            [
                row.mode,
                str(b),
                f"{statistics.median(ms):.1f}",
                f"{percentile(ms, 0.99):.1f}",
                f"{max(ms):.1f}" + (f" (≤ {worst:g})" if worst else ""),
                f"{statistics.median(f.write_ms for f in row.flips):.1f}",
                f"{row.cpu_change_ms:.2f}",
                f"{row.backend_idle_ms_per_min:.1f}",
                f"{row.server_idle_s_per_min:.2f}",
                f"{row.server_flipping_s_per_min:.2f}",
                f"{sum(row.held())} (≤ {b + k})",
                " / ".join(map(str, row.held())),
                str(sum(s["agent"].get("ESTAB", 0) for s in row.sockets.values())),
                str(row.state("TIME-WAIT")),
            ]
        )
    lines += common.table(
        [
            "mode",
            "B",
            "median ms",
            "p99 ms",
            "worst ms (≤ 25 at B = 64)",
            "write took (median ms)",
            f"CPU ms per change per backend (≤ {TARGET_CPU_MS:g})",
            "backend idle CPU (ms/min each)",
            "server CPU s/min idle",
            "server CPU s/min flipping",
            "sockets on agent ports, idle (≤ B + K)",
            "per agent",
            "established",
            "TIME-WAIT",
        ],
        rows,
    )
    return [*lines, ""]


def plot(result: Result, path: Path | None) -> str:
    """``fleet.png``: latency, CPU, sockets and the server's CPU against B."""
    plt = common.pyplot()
    if plt is None:
        return common.NO_MATPLOTLIB
    plan = result.plan
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (latency, cpu), (sockets, server) = axes
    counts = list(plan.counts)
    for mode, style in (("blocking", "-o"), ("polling", "--s"), ("floor", ":^")):
        rows = [r for r in result.rows if r.mode == mode]
        x = [r.backends for r in rows]
        for name, color, figure in (
            ("median", "C0", lambda r: statistics.median(r.latencies())),
            ("p99", "C1", lambda r: percentile(r.latencies(), 0.99)),
            ("worst", "C3", lambda r: max(r.latencies())),
        ):
            latency.plot(
                x,
                [figure(r) for r in rows],
                style,
                color=color,
                fillstyle="none" if mode == "polling" else "full",
                label=f"{mode} {name}",
            )
        cpu.plot(
            x,
            [r.cpu_change_ms for r in rows],
            style,
            fillstyle="none" if mode == "polling" else "full",
            label=mode,
        )
        sockets.plot(
            x,
            [sum(r.held()) for r in rows],
            style,
            fillstyle="none" if mode == "polling" else "full",
            label=mode,
        )
        for when, color, figure in (
            ("idle", "C2", lambda r: r.server_idle_s_per_min),
            ("flipping", "C4", lambda r: r.server_flipping_s_per_min),
        ):
            server.plot(
                x,
                [figure(r) for r in rows],
                style,
                color=color,
                fillstyle="none" if mode == "polling" else "full",
                label=f"{mode}, {when}",
            )
    for b, limit in TARGET_WORST_MS.items():
        if b in counts:
            latency.plot([b], [limit], "k*", markersize=12, label=f"target, B = {b}")
    cpu.axhline(TARGET_CPU_MS, linestyle=":", color="grey", label="target")
    sockets.plot(
        counts,
        [b + plan.agents for b in counts],
        "k:",
        marker="_",
        label="target B + K",
    )
    latency.set_yscale("log")
    for ax, title in (
        (latency, "key flip to every backend, ms (log)"),
        (cpu, "CPU per change per backend, ms"),
        (sockets, "sockets on the agents' HTTP ports, idle"),
        (server, "Consul server CPU, s per minute"),
    ):
        ax.set_title(title)
        ax.set_xticks(counts)
        ax.set_xlabel("backends (B)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"sprockets-status-consul fleet: 1 server, {plan.agents} client agents"
        + (" (SMOKE)" if plan == SMOKE else "")
    )
    fig.tight_layout()
    return common.save(plt, fig, path)
