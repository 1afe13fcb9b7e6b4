"""The benchmark run: start everything, measure, print the table, plot.

::

    python -m bench                 # the full run (a few minutes)
    python -m bench --smoke         # a couple of seconds: checks it makes its table
    python -m bench --help          # options

Everything runs on loopback against a Consul dev agent of its own, started
with :class:`tests.consul_agent.DevAgent` (binary: ``$CONSUL_BINARY``, else
``consul`` on the ``PATH``, else the tests' cache, else fetched into it);
``$CONSUL_HTTP_ADDR`` is ignored, since the run flips the node's maintenance
mode. Every process it starts is stopped at the end, and dies with the run
(``PR_SET_PDEATHSIG``) if the run is killed.

The four measurements, every figure from the same run:

1. **throughput** of one backend process serving ``/status``, for a plain
   Tornado handler (the limit), the seed-style handler that asks Consul in
   ``prepare``, ``ConsulStatusHandler`` polling every TTL, and
   ``ConsulStatusHandler`` with its defaults: several alternating rounds under
   wrk (or :mod:`bench.loadgen`), medians. The backend is pinned to one core
   and the load generator to another when ``taskset`` and two cores are there.
2. **Consul load**: 1, 4 and 16 backend processes under load, each talking to
   Consul through its own listener of the counting proxy (:mod:`bench.proxy`):
   Consul requests, and how many stand (wait in Consul) at once.
3. **propagation**: N backends polled every few milliseconds over keep-alive
   connections; the time from ``consul maint -enable``/``-disable`` (the CLI,
   and ``PUT /v1/agent/maintenance``) returning until every backend answers
   the new status.
4. **memory**: VmRSS of backend processes with and without the watcher, after
   warm-up traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # for ``tests.consul_agent`` when run as a file
    sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402
from bench.loadgen import KeepAliveClient  # noqa: E402
from tests.consul_agent import (  # noqa: E402
    ConsulUnavailable,
    DevAgent,
    find_or_fetch_consul,
)

THROUGHPUT_KINDS = ("plain", "seed", "poll", "watch")
LABELS = {
    "plain": "plain Tornado handler (the limit)",
    "plain-import": "plain handler, library imported, no watcher",
    "seed": "seed-style: python-consul2 `health.node` in `prepare`",
    "poll": 'ConsulStatusHandler, TTL polling (`"blocking": False`)',
    "watch": "ConsulStatusHandler, defaults (blocking queries)",
}
SHORT = {
    "plain": "plain",
    "plain-import": "plain + import",
    "seed": "seed-style",
    "poll": "TTL polling",
    "watch": "defaults",
}
TTL = 10.0
"""The library's default TTL: a blocking query waits this long."""

TARGET_RATIO = 0.97
TARGET_STANDING = 1
TARGET_PROPAGATION_MS = {4: 25.0, 16: 50.0}
TARGET_MEMORY_KB = 2048

STARTUP_TIMEOUT = 30.0
"""Seconds a backend or the proxy may take to say it is ready."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to do."""

    smoke: bool
    rounds: int
    round_seconds: float
    warmup_seconds: float
    connections: int
    load_counts: tuple[int, ...]
    load_kinds: tuple[str, ...]
    load_seconds: float
    propagation_counts: tuple[int, ...]
    flips: int
    """Flips per direction, per flip method and backend count."""
    flip_methods: tuple[str, ...]
    poll_interval: float
    memory_processes: int
    memory_warmup: int


FULL = Plan(
    smoke=False,
    rounds=5,
    round_seconds=5.0,
    warmup_seconds=1.0,
    connections=16,
    load_counts=(1, 4, 16),
    load_kinds=("seed", "poll", "watch"),
    load_seconds=4.0,
    propagation_counts=(4, 16),
    flips=10,
    flip_methods=("cli", "api"),
    poll_interval=0.002,
    memory_processes=3,
    memory_warmup=5000,
)

SMOKE = Plan(
    smoke=True,
    rounds=1,
    round_seconds=0.1,
    warmup_seconds=0.0,
    connections=4,
    load_counts=(1,),
    load_kinds=("seed", "poll", "watch"),
    load_seconds=0.1,
    propagation_counts=(2,),
    flips=1,
    flip_methods=("cli", "api"),
    poll_interval=0.002,
    memory_processes=1,
    memory_warmup=100,
)


# --------------------------------------------------------------------------
# processes


def _prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: SIGTERM when the run's main thread dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without ``CONSUL_*``, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    env.update(extra)
    return env


@dataclasses.dataclass
class Pinning:
    """Which CPU the backend and the load generator run on, if pinned."""

    backend: int | None = None
    load: int | None = None
    how: str = "not pinned"

    def prefix(self, cpu: int | None) -> list[str]:
        return [] if cpu is None else ["taskset", "-c", str(cpu)]

    @classmethod
    def choose(cls, wanted: bool) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not wanted:
            return cls(how="not pinned (--no-pin)")
        if len(cpus) < 2:
            return cls(how=f"not pinned (only {len(cpus)} CPU available)")
        if shutil.which("taskset") is None:
            return cls(how="not pinned (no taskset)")
        backend, load = cpus[-1], cpus[-2]
        return cls(
            backend,
            load,
            f"taskset: backend on CPU {backend}, load generator on CPU {load}, "
            "Consul agent and proxy unpinned",
        )


@dataclasses.dataclass
class Backend:
    kind: str
    port: int
    pid: int
    process: asyncio.subprocess.Process


class Processes:
    """Every process the run starts; :meth:`stop_all` ends those still running."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._running: list[asyncio.subprocess.Process] = []
        self._count = 0

    async def spawn(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        name: str = "process",
    ) -> tuple[asyncio.subprocess.Process, Path]:
        """Start ``args`` with stdout piped and stderr to a log file."""
        self._count += 1
        log = self.logdir / f"{self._count:03d}-{name}.log"
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env or _clean_env(),
                cwd=ROOT,
                preexec_fn=_die_with_parent,
            )
        self._running.append(process)
        return process, log

    async def stop(
        self, processes: Iterable[asyncio.subprocess.Process], timeout: float = 5.0
    ) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        processes = list(processes)
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

        async def reap(process: asyncio.subprocess.Process) -> None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            if process.stdin is not None:
                process.stdin.close()

        await asyncio.gather(*(reap(p) for p in processes))
        for process in processes:
            with contextlib.suppress(ValueError):
                self._running.remove(process)

    async def stop_all(self) -> None:
        await self.stop(list(self._running))


async def _first_line(process: asyncio.subprocess.Process, log: Path, what: str) -> str:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
    except asyncio.TimeoutError:
        line = b""
    if not line:
        await asyncio.sleep(0.1)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} did not start (exit {process.returncode}):\n{tail}")
    return line.decode().strip()


async def start_backends(
    procs: Processes,
    kind: str,
    consul: Sequence[str],
    cpu: int | None = None,
    pinning: Pinning | None = None,
) -> list[Backend]:
    """One backend process of ``kind`` for each Consul address; once all answer."""
    prefix = pinning.prefix(cpu) if pinning is not None else []
    started = []
    for address in consul:
        args = [
            *prefix,
            sys.executable,
            "-m",
            "bench.backends",
            "--kind",
            kind,
            "--consul",
            address,
        ]
        env = _clean_env(CONSUL_HTTP_ADDR=address)
        started.append(await procs.spawn(args, env=env, name=f"backend-{kind}"))
    lines = await asyncio.gather(
        *(_first_line(p, log, f"backend {kind}") for p, log in started)
    )
    backends = []
    for (process, _), line in zip(started, lines, strict=True):
        word, port, pid = line.split()
        if word != "ready":
            raise RuntimeError(f"backend {kind} said {line!r}")
        backends.append(Backend(kind, int(port), int(pid), process))
    return backends


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


def vm_rss_kb(pid: int) -> int:
    """Resident memory of a process, in kB, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, all threads) of a process so far, in seconds.

    CPU time per request moves less than req/s when other processes take
    turns on the backend's core (it still moves with what they do to the
    caches): on a busy machine it tells the handlers' costs apart better.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# load


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """One load run: answers, how long it took, and anything not 200."""

    requests: int
    seconds: float
    non_200: int
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class LoadGenerator:
    """wrk, or :mod:`bench.loadgen` as a process of its own, possibly pinned.

    With ``in_process`` (the smoke run) :mod:`bench.loadgen` runs in this
    process instead, which saves starting one for each round.
    """

    def __init__(
        self,
        procs: Processes,
        use_wrk: bool,
        pinning: Pinning,
        in_process: bool = False,
    ) -> None:
        self.procs = procs
        self.use_wrk = use_wrk
        self.pinning = pinning
        self.in_process = in_process and not use_wrk

    def describe(self, connections: int) -> str:
        if self.use_wrk:
            version = subprocess.run(
                ["wrk", "-v"], capture_output=True, text=True, check=False
            ).stdout.split()
            name = " ".join(version[:2]) if version else "wrk"
            return f"{name}, 1 thread, {connections} keep-alive connections"
        where = ", in the run's own process" if self.in_process else ""
        return (
            f"bench.loadgen (Python asyncio{where}), {connections} keep-alive "
            "connections"
        )

    async def run(
        self,
        ports: Sequence[int],
        connections: int,
        seconds: float,
        pin: bool = True,
    ) -> LoadResult:
        cpu = self.pinning.load if pin else None
        prefix = self.pinning.prefix(cpu)
        if self.use_wrk:
            return await self._wrk(prefix, ports, connections, seconds)
        max_requests = int(seconds * 200_000) + 1000
        if self.in_process:
            return _load_result(
                await loadgen.load(
                    ports, max(connections, len(ports)), seconds, max_requests
                )
            )
        args = [*prefix, sys.executable, "-m", "bench.loadgen"]
        for port in ports:
            args += ["--port", str(port)]
        args += [
            "--connections",
            str(max(connections, len(ports))),
            "--duration",
            str(seconds),
            "--max-requests",
            str(max_requests),
        ]
        process, log = await self.procs.spawn(args, name="loadgen")
        line = await _first_line(process, log, "bench.loadgen")
        await self.procs.stop([process])
        return _load_result(json.loads(line))

    async def _wrk(
        self,
        prefix: list[str],
        ports: Sequence[int],
        connections: int,
        seconds: float,
    ) -> LoadResult:
        each = max(1, connections // len(ports))
        duration = f"{max(1, round(seconds))}s"
        started = []
        for port in ports:
            args = [
                *prefix,
                "wrk",
                "-t1",
                f"-c{each}",
                f"-d{duration}",
                "--timeout",
                "5s",
                f"http://127.0.0.1:{port}/status",
            ]
            started.append(await self.procs.spawn(args, name="wrk"))
        outputs = []
        for process, log in started:
            assert process.stdout is not None
            out = await asyncio.wait_for(process.stdout.read(), seconds + 30.0)
            await process.wait()
            if process.returncode != 0:
                raise RuntimeError(f"wrk failed: {log.read_text(errors='replace')}")
            outputs.append(out.decode())
        await self.procs.stop([p for p, _ in started])
        return _sum_wrk(outputs)


def _load_result(data: dict[str, Any]) -> LoadResult:
    """A :class:`LoadResult` from what :func:`bench.loadgen.load` returns."""
    codes: dict[str, int] = data["codes"]
    return LoadResult(
        int(data["requests"]),
        float(data["seconds"]),
        sum(n for code, n in codes.items() if code != "200"),
        int(data["errors"]),
    )


def _sum_wrk(outputs: Sequence[str]) -> LoadResult:
    requests = non_200 = errors = 0
    seconds = 0.0
    for out in outputs:
        match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
        if match is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        requests += int(match.group(1))
        scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(3)]
        seconds = max(seconds, float(match.group(2)) * scale)
        match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        non_200 += int(match.group(1)) if match else 0
        match = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
            out,
        )
        errors += sum(int(g) for g in match.groups()) if match else 0
    return LoadResult(requests, seconds, non_200, errors)


# --------------------------------------------------------------------------
# 1. throughput


@dataclasses.dataclass
class Throughput:
    kind: str
    rates: list[float]
    cpu_us: list[float]
    """CPU time the backend process spent per answer, in microseconds."""
    non_200: int
    errors: int
    rss_kb: int

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_us)


async def measure_throughput(
    plan: Plan,
    agent: DevAgent,
    procs: Processes,
    load: LoadGenerator,
    pinning: Pinning,
) -> list[Throughput]:
    groups = await asyncio.gather(
        *(
            start_backends(procs, kind, [agent.http_addr], pinning.backend, pinning)
            for kind in THROUGHPUT_KINDS
        )
    )
    backends = {group[0].kind: group[0] for group in groups}
    results = {k: Throughput(k, [], [], 0, 0, 0) for k in THROUGHPUT_KINDS}
    try:
        differences = await answers_differ(
            backends["plain"], [b for k, b in backends.items() if k != "plain"]
        )
        if differences:
            raise RuntimeError(
                "the backends do not answer alike, so their throughputs do not "
                "compare (did the library's handler change its answer?):\n"
                + "\n".join(differences)
            )
        for kind in THROUGHPUT_KINDS:  # warm-up, not counted
            if plan.warmup_seconds > 0:
                await load.run(
                    [backends[kind].port], plan.connections, plan.warmup_seconds
                )
        for round_ in range(plan.rounds):
            shift = round_ % len(THROUGHPUT_KINDS)
            order = THROUGHPUT_KINDS[shift:] + THROUGHPUT_KINDS[:shift]
            for kind in order:
                cpu = cpu_seconds(backends[kind].pid)
                result = await load.run(
                    [backends[kind].port], plan.connections, plan.round_seconds
                )
                cpu = cpu_seconds(backends[kind].pid) - cpu
                entry = results[kind]
                entry.rates.append(result.rate)
                entry.cpu_us.append(1e6 * cpu / max(result.requests, 1))
                entry.non_200 += result.non_200
                entry.errors += result.errors
                _progress(f"throughput round {round_ + 1} {kind}: {result.rate:,.0f}/s")
        for kind, backend in backends.items():
            results[kind].rss_kb = vm_rss_kb(backend.pid)
    finally:
        await procs.stop(b.process for b in backends.values())
    return list(results.values())


# --------------------------------------------------------------------------
# 2. Consul load


@dataclasses.dataclass
class ConsulLoad:
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
        line = await _first_line(process, log, "bench.proxy")
        ports: list[int] = json.loads(line)["ports"]
        return cls(process, ports)

    async def command(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 10.0)
        return json.loads(line)


PARALLEL_START = 8
"""Backends of several kinds that may start at once in the Consul load test."""


async def measure_consul_load(
    plan: Plan, agent: DevAgent, procs: Processes, load: LoadGenerator
) -> list[ConsulLoad]:
    """Each kind and count in turn: N backends under load, through the proxy.

    Small configurations (at most :data:`PARALLEL_START` processes for all
    kinds) start at once, each kind behind its own listeners, and are then
    loaded one kind after the other.
    """
    kinds = plan.load_kinds
    batches: list[tuple[int, tuple[str, ...]]] = []
    for count in plan.load_counts:
        if count * len(kinds) <= PARALLEL_START:
            batches.append((count, kinds))
        else:
            batches += [(count, (kind,)) for kind in kinds]
    listeners = max(count * len(group) for count, group in batches)
    proxy = await Proxy.start(procs, agent.http_addr, listeners)
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
                        await _consul_load(plan, proxy, load, backends, first, before)
                    )
            finally:
                await procs.stop(b.process for group_ in started for b in group_)
    finally:
        await procs.stop([proxy.process])
    order = {kind: i for i, kind in enumerate(kinds)}
    rows.sort(key=lambda r: (order[r.kind], r.backends))
    return rows


async def _consul_load(
    plan: Plan,
    proxy: Proxy,
    load: LoadGenerator,
    backends: Sequence[Backend],
    first: int,
    startup: int,
) -> ConsulLoad:
    count = len(backends)
    await proxy.command("reset")
    result = await load.run(
        [b.port for b in backends],
        max(plan.connections, count),
        plan.load_seconds,
        pin=False,
    )
    counts: list[dict[str, int]] = (await proxy.command("counts"))[
        first : first + count
    ]
    row = ConsulLoad(
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
    _progress(
        f"consul load {row.kind} x{count}: {row.status_requests} /status, "
        f"{row.consul_requests} to Consul, max standing {row.max_standing}"
    )
    return row


# --------------------------------------------------------------------------
# 3. propagation


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


class Fleet:
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


async def _flip_cli(agent: DevAgent, enable: bool, reason: str) -> float:
    args = ["maint", "-enable", "-reason", reason] if enable else ["maint", "-disable"]
    process = await asyncio.create_subprocess_exec(
        agent.binary,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_clean_env(CONSUL_HTTP_ADDR=agent.url),
        preexec_fn=_die_with_parent,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30.0)
    returned = time.monotonic()
    if process.returncode != 0:
        raise RuntimeError(f"consul {' '.join(args)} failed: {out!r} {err!r}")
    return returned


async def _flip_api(client: KeepAliveClient, enable: bool, reason: str) -> float:
    query = {"enable": "true", "reason": reason} if enable else {"enable": "false"}
    request = (
        f"PUT /v1/agent/maintenance?{urllib.parse.urlencode(query)} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    code = await asyncio.wait_for(client.get(request), 30.0)
    returned = time.monotonic()
    if code != 200:
        raise RuntimeError(f"PUT /v1/agent/maintenance answered {code}")
    return returned


async def measure_propagation(
    plan: Plan, agent: DevAgent, procs: Processes
) -> list[Flip]:
    flips: list[Flip] = []
    api = await KeepAliveClient.connect(agent.http_port, agent.host)
    try:
        for count in plan.propagation_counts:
            backends = await start_backends(procs, "watch", [agent.http_addr] * count)
            fleet = Fleet([b.port for b in backends], plan.poll_interval)
            budget = 60.0 + 2.0 * plan.flips * len(plan.flip_methods)
            deadline = time.monotonic() + budget
            max_polls = int(budget / plan.poll_interval) + 1
            tasks = [
                asyncio.ensure_future(p.run(deadline, max_polls)) for p in fleet.pollers
            ]
            try:
                await _flip_api(api, False, "")
                if not await fleet.wait_for(200, 5.0):
                    raise RuntimeError("the backends do not answer 200 to start with")
                for method in plan.flip_methods:
                    for i in range(2 * plan.flips):
                        enable = i % 2 == 0
                        flips.append(
                            await _one_flip(agent, api, fleet, count, method, enable)
                        )
                        await asyncio.sleep(random.uniform(0.05, 0.1))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await procs.stop(b.process for b in backends)
    finally:
        with contextlib.suppress(Exception):
            await _flip_api(api, False, "")
        api.close()
    return flips


async def _one_flip(
    agent: DevAgent,
    api: KeepAliveClient,
    fleet: Fleet,
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
    if not await fleet.wait_for(target, 5.0):
        late = sum(p.code != target for p in fleet.pollers)
        raise RuntimeError(f"{late} of {count} backends did not answer {target} in 5 s")
    reached = max(p.since for p in fleet.pollers)
    changes = sum(p.changes for p in fleet.pollers)
    await asyncio.sleep(max(0.02, 3 * fleet.pollers[0].interval))
    if not fleet.all_answer(target) or sum(p.changes for p in fleet.pollers) != changes:
        raise RuntimeError("a backend went back to the old status after a flip")
    flip = Flip(
        backends=count,
        method=method,
        direction="enable" if enable else "disable",
        ms=max(0.0, reached - returned) * 1000,
        command_ms=(returned - started) * 1000,
        early=reached < returned,
    )
    _progress(
        f"propagation x{count} {method} {flip.direction}: {flip.ms:.1f} ms "
        f"(command {flip.command_ms:.1f} ms)"
    )
    return flip


# --------------------------------------------------------------------------
# 4. memory


@dataclasses.dataclass
class Memory:
    kind: str
    rss_kb: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.rss_kb)


async def measure_memory(plan: Plan, agent: DevAgent, procs: Processes) -> list[Memory]:
    kinds = ("plain", "plain-import", "watch")
    backends: dict[str, list[Backend]] = {}
    try:
        for kind in kinds:
            backends[kind] = await start_backends(
                procs, kind, [agent.http_addr] * plan.memory_processes
            )

        async def warm_up(backend: Backend) -> None:
            client = await KeepAliveClient.connect(backend.port)
            try:
                for _ in range(plan.memory_warmup):
                    await client.get()
            finally:
                client.close()

        everyone = [b for group in backends.values() for b in group]
        await asyncio.wait_for(asyncio.gather(*(warm_up(b) for b in everyone)), 120)
        await asyncio.sleep(0.3)
        return [
            Memory(kind, [vm_rss_kb(b.pid) for b in group])
            for kind, group in backends.items()
        ]
    finally:
        await procs.stop(b.process for group in backends.values() for b in group)


# --------------------------------------------------------------------------
# the report


@dataclasses.dataclass
class Results:
    plan: Plan
    date: str
    machine: str
    cores: int
    versions: str
    load_generator: str
    pinning: str
    load_average: tuple[str, str]
    seconds: float
    throughput: list[Throughput]
    consul_load: list[ConsulLoad]
    flips: list[Flip]
    memory: list[Memory]


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def targets(results: Results) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for each target the run measured."""
    out: list[tuple[str, str, bool]] = []
    by_kind = {t.kind: t for t in results.throughput}
    if "watch" in by_kind and "plain" in by_kind:
        ratio = by_kind["watch"].median / by_kind["plain"].median
        cpu = by_kind["plain"].cpu_median / by_kind["watch"].cpu_median
        out.append(
            (
                f"throughput defaults / plain >= {TARGET_RATIO}",
                f"{ratio:.3f} in req/s ({cpu:.3f} in CPU per request)",
                ratio >= TARGET_RATIO,
            )
        )
    watch = [r for r in results.consul_load if r.kind == "watch"]
    if watch:
        standing = max(r.max_standing for r in watch)
        allowed = 1 + int(results.plan.load_seconds // TTL)
        most = max(max(r.per_backend) for r in watch)
        out.append(
            (
                f"defaults: <= {TARGET_STANDING} standing Consul request per "
                "backend, whatever the request rate",
                f"at most {standing} standing, at most {most} request(s) per "
                f"backend in {results.plan.load_seconds:g} s of load",
                standing <= TARGET_STANDING and most <= allowed,
            )
        )
    for count in results.plan.propagation_counts:
        limit = TARGET_PROPAGATION_MS.get(count)
        flips = [f.ms for f in results.flips if f.backends == count]
        if limit is None or not flips:
            continue
        out.append(
            (
                f"propagation worst, {count} backends <= {limit:g} ms",
                f"{max(flips):.1f} ms (all flips, both ways, cli and api)",
                max(flips) <= limit,
            )
        )
    memory = {m.kind: m.median for m in results.memory}
    if "watch" in memory and "plain" in memory:
        overhead = memory["watch"] - memory["plain"]
        watcher = memory["watch"] - memory.get("plain-import", memory["plain"])
        out.append(
            (
                f"watcher memory overhead <= {TARGET_MEMORY_KB / 1024:g} MiB",
                f"{overhead / 1024:+.1f} MiB ({watcher / 1024:+.1f} MiB of it "
                "after the imports)",
                overhead <= TARGET_MEMORY_KB,
            )
        )
    return out


def _render_throughput(results: Results) -> list[str]:
    plan = results.plan
    by_kind = {t.kind: t for t in results.throughput}
    if "plain" not in by_kind:
        return []
    plain = by_kind["plain"].median
    plain_cpu = by_kind["plain"].cpu_median
    lines = [
        f"**1. Throughput** of one backend process serving `/status`: "
        f"{plan.rounds} alternating rounds of {plan.round_seconds:g} s each "
        f"(after {plan.warmup_seconds:g} s of warm-up), medians. Load: "
        f"{results.load_generator}. Pinning: {results.pinning}. The backends "
        "talk to the agent directly (no proxy), and answer alike: the same "
        "status line, headers (but `Date`) and body, checked first. CPU µs "
        "per request: the backend process's CPU time (all threads, /proc) "
        "over its answers: its ratio is the capacity ratio, less moved by "
        "other processes on the machine than req/s is.",
        "",
    ]
    rows = []
    for t in results.throughput:
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
                f"{t.median / plain:.3f}",
                f"{t.cpu_median:,.0f}",
                f"{plain_cpu / t.cpu_median:.3f}",
                ", ".join(notes),
            ]
        )
    lines += _table(
        [
            "handler",
            "req/s (median)",
            "min to max",
            "ratio to plain",
            "CPU µs per request (median)",
            "plain's CPU / this CPU",
            "notes",
        ],
        rows,
    )
    return [*lines, ""]


def _render_consul_load(results: Results) -> list[str]:
    plan = results.plan
    if not results.consul_load:
        return []
    lines = [
        f"**2. Consul load**: N backend processes under load for "
        f"{plan.load_seconds:g} s (at least {plan.connections} keep-alive "
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
    for r in results.consul_load:
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
    lines += _table(
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


def _render_propagation(results: Results) -> list[str]:
    plan = results.plan
    if not results.flips:
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
    for count in plan.propagation_counts:
        for method in plan.flip_methods:
            for direction in ("enable", "disable", "both"):
                flips = [
                    f
                    for f in results.flips
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
                        f"{_percentile(ms, 0.99):.1f}",
                        f"{max(ms):.1f}",
                        f"{statistics.median(f.command_ms for f in flips):.1f}",
                        str(sum(f.early for f in flips)),
                    ]
                )
    lines += _table(
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


def _render_memory(results: Results) -> list[str]:
    plan = results.plan
    memory = {m.kind: m for m in results.memory}
    after = {t.kind: t.rss_kb for t in results.throughput}
    if not memory and not after:
        return []
    lines = [
        f"**4. Memory**: VmRSS after {plan.memory_warmup} warm-up requests, "
        f"median of {plan.memory_processes} processes each; and of the "
        "throughput backends after their rounds.",
        "",
    ]
    plain = memory.get("plain")
    rows = []
    for kind in ("plain", "plain-import", "seed", "poll", "watch"):
        m = memory.get(kind)
        if m is None and kind not in after:
            continue
        rows.append(
            [
                LABELS[kind],
                _mb(m.median) if m else "-",
                f"{(m.median - plain.median) / 1024:+.1f} MiB" if m and plain else "-",
                _mb(after[kind]) if kind in after else "-",
            ]
        )
    lines += _table(
        ["process", "after warm-up", "vs plain", "after the throughput rounds"], rows
    )
    return [*lines, ""]


def render(results: Results) -> str:
    """The report: a markdown table per part, then the targets."""
    plan = results.plan
    lines = [
        "## /status benchmark"
        + (" (SMOKE RUN: its figures mean nothing)" if plan.smoke else ""),
        "",
        f"{results.date} · {results.cores} cores ({results.machine}) · "
        f"{results.versions} · load average {results.load_average[0]} at the "
        f"start, {results.load_average[1]} at the end · the run took "
        f"{results.seconds:.0f} s",
        "",
    ]
    lines += _render_throughput(results)
    lines += _render_consul_load(results)
    lines += _render_propagation(results)
    lines += _render_memory(results)
    lines += ["**Targets**", ""]
    lines += _table(
        ["target", "measured", "met"],
        [
            [
                name,
                measured,
                "n/a (smoke)" if plan.smoke else ("yes" if met else "**NO**"),
            ]
            for name, measured, met in targets(results)
        ],
    )
    return "\n".join(lines) + "\n"


def plot(results: Results, path: Path | None) -> str:
    """Draw the figures into ``path`` (or only in memory); say what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    ax.set_title("1. throughput of one backend (req/s, ratio to plain)")
    by_kind = {t.kind: t.median for t in results.throughput}
    if "plain" in by_kind:
        plain = by_kind["plain"]
        bars = ax.bar([SHORT[k] for k in by_kind], list(by_kind.values()))
        for bar, value in zip(bars, by_kind.values(), strict=True):
            ax.annotate(
                f"{value:,.0f}\n({value / plain:.2f})",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, max(by_kind.values()) * 1.2)

    ax = axes[0][1]
    ax.set_title("2. Consul requests/s under load (0 drawn as 0.01)")
    if results.consul_load:
        for kind in results.plan.load_kinds:
            rows = [r for r in results.consul_load if r.kind == kind]
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
        ax.set_xticks(list(results.plan.load_counts))
        ax.set_xticklabels([str(n) for n in results.plan.load_counts])
        ax.set_yscale("log")
        ax.set_xlabel("backend processes under load")
        ax.legend()

    ax = axes[1][0]
    ax.set_title("3. propagation, ms until every backend answers (dashed: targets)")
    groups = [
        (count, method)
        for count in results.plan.propagation_counts
        for method in results.plan.flip_methods
    ]
    data = [
        [f.ms for f in results.flips if f.backends == c and f.method == m]
        for c, m in groups
    ]
    if results.flips:
        ax.boxplot(data, whis=(0, 100))
        ax.set_xticks(range(1, len(groups) + 1))
        ax.set_xticklabels([f"{c} backends\n{m}" for c, m in groups])
        for count in results.plan.propagation_counts:
            limit = TARGET_PROPAGATION_MS.get(count)
            if limit is not None:
                ax.axhline(limit, linestyle="--", color="grey", linewidth=0.8)

    ax = axes[1][1]
    ax.set_title("4. resident memory after warm-up, MiB")
    if results.memory:
        ax.bar(
            [SHORT[m.kind] for m in results.memory],
            [m.median / 1024 for m in results.memory],
            color="#55a868",
        )

    fig.suptitle(
        f"sprockets-status-consul /status benchmark, {results.date}, "
        f"{results.cores} cores" + (" (SMOKE)" if results.plan.smoke else "")
    )
    fig.tight_layout()
    try:
        if path is None:
            fig.savefig(io.BytesIO(), format="png", dpi=50)
            return "plot drawn (not written: a smoke run writes no files)"
        fig.savefig(path, dpi=100)
        return f"plot written to {path}"
    finally:
        plt.close(fig)


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _versions(binary: str) -> str:
    import importlib.metadata

    import tornado

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    consul = subprocess.run(
        [binary, "version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return (
        f"Python {platform.python_version()}, Tornado {tornado.version}, "
        f"python-consul2 {version('python-consul2')}, "
        f"sprockets-status-consul {version('sprockets-status-consul')}, "
        f"Consul {consul[1] if len(consul) > 1 else '?'} dev agent on loopback"
    )


def _machine() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def _run(plan: Plan, agent: DevAgent, options: argparse.Namespace) -> Results:
    started = time.monotonic()
    load_average = _load_average()
    pinning = Pinning.choose(not options.no_pin)
    use_wrk = {
        "wrk": True,
        "python": False,
        "auto": shutil.which("wrk") is not None and not plan.smoke,
    }[options.loadgen]
    if use_wrk and shutil.which("wrk") is None:
        raise SystemExit("--loadgen wrk: wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="ssc-bench-") as logdir:
        procs = Processes(Path(logdir))
        load = LoadGenerator(procs, use_wrk, pinning, in_process=plan.smoke)
        try:
            parts: set[int] = options.parts
            throughput: list[Throughput] = []
            consul_load: list[ConsulLoad] = []
            flips: list[Flip] = []
            memory: list[Memory] = []
            if plan.smoke:
                # Figures of a smoke run mean nothing: run the parts side by
                # side (maintenance flips only after the throughput rounds).
                async def first_and_third() -> tuple[list[Throughput], list[Flip]]:
                    throughput = await measure_throughput(
                        plan, agent, procs, load, pinning
                    )
                    return throughput, await measure_propagation(plan, agent, procs)

                (throughput, flips), consul_load, memory = await asyncio.gather(
                    first_and_third(),
                    measure_consul_load(plan, agent, procs, load),
                    measure_memory(plan, agent, procs),
                )
            else:
                if 1 in parts:
                    _progress("1. throughput")
                    throughput = await measure_throughput(
                        plan, agent, procs, load, pinning
                    )
                if 2 in parts:
                    _progress("2. Consul load")
                    consul_load = await measure_consul_load(plan, agent, procs, load)
                if 3 in parts:
                    _progress("3. propagation")
                    flips = await measure_propagation(plan, agent, procs)
                if 4 in parts:
                    _progress("4. memory")
                    memory = await measure_memory(plan, agent, procs)
        finally:
            await procs.stop_all()
    return Results(
        plan=plan,
        date=datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        machine=_machine(),
        cores=os.cpu_count() or 0,
        versions=_versions(agent.binary),
        load_generator=load.describe(plan.connections),
        pinning=pinning.how,
        load_average=(load_average, _load_average()),
        seconds=time.monotonic() - started,
        throughput=throughput,
        consul_load=consul_load,
        flips=flips,
        memory=memory,
    )


def _parts(text: str) -> set[int]:
    try:
        parts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        parts = set()
    if not parts or not parts <= {1, 2, 3, 4}:
        raise argparse.ArgumentTypeError("a comma-separated list of 1, 2, 3 and 4")
    return parts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark /status: throughput, Consul load, propagation, "
        "memory. Prints a markdown table; writes results.png and results.json.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a run of a couple of seconds that checks the table is produced "
        "(writes no files unless --out is given)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where results.png and results.json go (default: bench/; "
        "with --smoke: nowhere)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk if installed (auto; not in a smoke run), or bench.loadgen",
    )
    parser.add_argument(
        "--parts",
        type=_parts,
        default={1, 2, 3, 4},
        help="which parts to run, e.g. 1,4 (default: all; "
        "1 throughput, 2 Consul load, 3 propagation, 4 memory)",
    )
    parser.add_argument("--rounds", type=int, help="throughput rounds")
    parser.add_argument(
        "--round-seconds", type=float, help="seconds of each throughput round"
    )
    parser.add_argument(
        "--poll-ms",
        type=float,
        help=f"how often the propagation test polls each backend "
        f"(default {FULL.poll_interval * 1000:g} ms)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    plan = SMOKE if options.smoke else FULL
    if options.rounds:
        plan = dataclasses.replace(plan, rounds=options.rounds)
    if options.round_seconds:
        plan = dataclasses.replace(plan, round_seconds=options.round_seconds)
    if options.poll_ms:
        plan = dataclasses.replace(plan, poll_interval=options.poll_ms / 1000)
    out: Path | None = options.out
    if out is None and not plan.smoke:
        out = ROOT / "bench"
    try:
        binary = find_or_fetch_consul()
        agent = DevAgent(binary, extra_config={"log_level": "warn"})
        agent.start()
    except ConsulUnavailable as error:
        print(f"error: no Consul agent: {error}", file=sys.stderr)
        return 1
    try:
        results = asyncio.run(_run(plan, agent, options))
    finally:
        agent.stop()
    print(render(results), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            json.dumps(dataclasses.asdict(results), indent=1) + "\n"
        )
    print(plot(results, None if out is None else out / "results.png"))
    return 0
