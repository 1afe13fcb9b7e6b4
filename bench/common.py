"""What the benchmarks share: processes, agents, backends, load, tables, results.

Every process a benchmark starts goes through :class:`Processes`, which stops
it at the end, and makes it die with the run (``PR_SET_PDEATHSIG``) if the run
is killed. The Consul agents come from the library's dev-agent launcher
(:mod:`sprockets_status_consul.dev_agent`), imported here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import KeepAliveClient
from sprockets_status_consul.dev_agent import (
    ConsulAgentError,
    ConsulDevAgent,
    find_consul_binary,
)

Agent = ConsulDevAgent
"""A Consul agent that a benchmark started."""

ROOT = Path(__file__).resolve().parent.parent
"""The repository: backends run from here, and results are written under it."""

GET_CONSUL = ROOT / "scripts" / "get-consul"
"""The project's script that fetches Consul into a cache and prints its path."""

STARTUP_TIMEOUT = 30.0
"""Seconds a backend or the proxy may take to say it is ready."""

TTL = 10.0
"""The library's default TTL: a blocking query waits this long."""

KINDS = {
    "plain": ("plain", "plain Tornado handler (the limit)"),
    "plain-again": (
        "plain again",
        "plain handler again, another process (the measurement's own error)",
    ),
    "plain-import": ("plain + import", "plain handler, library imported, no watcher"),
    "seed": ("seed-style", "seed-style: python-consul2 `health.node` in `prepare`"),
    "poll": (
        "TTL polling",
        'ConsulStatusHandler, TTL polling (`"blocking": False`)',
    ),
    "watch": ("defaults", "ConsulStatusHandler, defaults (blocking queries)"),
    "checks": ("3 checks", "ConsulStatusHandler, defaults, 3 checks every 1 s"),
    "slow-check": (
        "5 s check",
        "ConsulStatusHandler, defaults, a check that takes 5 s, always running",
    ),
}
"""Backend kinds (see :mod:`bench.backends`): short name and table label."""
SHORT = {kind: short for kind, (short, _) in KINDS.items()}
LABELS = {kind: label for kind, (_, label) in KINDS.items()}


def consul_binary() -> str:
    """The ``consul`` binary: ``$CONSUL_BINARY``, ``PATH``, else the one
    ``scripts/get-consul`` keeps in its cache (fetched the first time).

    :raises SystemExit: when there is none, saying why.
    """
    try:
        found = find_consul_binary()
    except ConsulAgentError as error:
        raise SystemExit(f"error: {error}") from error
    if found is not None:
        return found
    fetched = subprocess.run(
        [sys.executable, str(GET_CONSUL)], capture_output=True, text=True, check=False
    )
    if fetched.returncode != 0:
        raise SystemExit(f"error: no Consul binary: {fetched.stderr.strip()}")
    return fetched.stdout.strip()


def start_agent(binary: str, host: str, extra_args: Sequence[str] = ()) -> Agent:
    """A Consul dev agent on ``host`` with free ports, started, logging warnings.

    ``$CONSUL_HTTP_ADDR`` is ignored: the benchmarks change the agent's state.

    :raises SystemExit: when the agent does not start, with its log.
    """
    agent = ConsulDevAgent(
        binary, host=host, extra_config={"log_level": "warn"}, extra_args=extra_args
    )
    try:
        return agent.start()
    except ConsulAgentError as error:
        raise SystemExit(f"error: no Consul agent: {error}") from error


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


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: SIGTERM when the run's main thread dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def clean_env(**extra: str) -> dict[str, str]:
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
                env=env or clean_env(),
                cwd=ROOT,
                preexec_fn=die_with_parent,
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


async def first_line(
    process: asyncio.subprocess.Process,
    log: Path,
    what: str,
    timeout: float = STARTUP_TIMEOUT,
) -> str:
    """The first line ``process`` prints; an error with its log if none comes."""
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        line = b""
    if not line:
        await asyncio.sleep(0.1)
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{what} did not start (exit {process.returncode}):\n{tail}")
    return line.decode().strip()


@dataclasses.dataclass
class Backend:
    kind: str
    port: int
    pid: int
    process: asyncio.subprocess.Process


async def start_backends(
    procs: Processes,
    kind: str,
    consul: Sequence[str],
    cpu: int | None = None,
    pinning: Pinning | None = None,
    options: Sequence[str] = (),
    timeout: float = STARTUP_TIMEOUT,
) -> list[Backend]:
    """One backend process of ``kind`` for each Consul address; once all answer.

    ``options`` go to every :mod:`bench.backends` command line.
    """
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
            *options,
        ]
        env = clean_env(CONSUL_HTTP_ADDR=address)
        started.append(await procs.spawn(args, env=env, name=f"backend-{kind}"))
    lines = await asyncio.gather(
        *(first_line(p, log, f"backend {kind}", timeout) for p, log in started)
    )
    backends = []
    for (process, _), line in zip(started, lines, strict=True):
        word, port, pid = line.split()
        if word != "ready":
            raise RuntimeError(f"backend {kind} said {line!r}")
        backends.append(Backend(kind, int(port), int(pid), process))
    return backends


async def consul_api(
    client: KeepAliveClient,
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    body: bytes = b"",
) -> int:
    """One request to Consul's HTTP API over ``client``; its status code."""
    if query:
        path += "?" + urllib.parse.urlencode(query)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return await asyncio.wait_for(client.get(head.encode() + body), 30.0)


def vm_rss_kb(pid: int) -> int:
    """Resident memory of a process, in kB, from ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ns(pid: int) -> int:
    """CPU time of a process so far (user and system, all threads), in ns.

    The scheduler's own count, ``/proc/PID/task/*/schedstat``: exact where
    ``/proc/PID/stat`` counts 10 ms ticks, and a round of the smoke run or a
    change in the fleet costs a few milliseconds. CPU time per request moves
    less than req/s when other processes take turns on the backend's core (it
    still moves with what they do to the caches): on a busy machine it tells
    the handlers' costs apart better.
    """
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        path = f"/proc/{pid}/task/{task}/schedstat"
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            total += int(f.read().split()[0])  # FileNotFoundError: thread ended
    return total


# --------------------------------------------------------------------------
# load


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """One load run: answers, how long it took, anything not 200, and the
    99th percentile of the answers' latencies (None when the load generator
    does not tell it)."""

    requests: int
    seconds: float
    non_200: int
    errors: int
    p99_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class LoadGenerator:
    """wrk, or :mod:`bench.loadgen` as a process of its own, possibly pinned.

    With ``in_process`` (the smoke run) :mod:`bench.loadgen` runs in this
    process instead, which saves starting one for each round. ``connections``
    is the least number of keep-alive connections a load uses.
    """

    def __init__(
        self,
        procs: Processes,
        use_wrk: bool,
        pinning: Pinning,
        connections: int,
        in_process: bool = False,
    ) -> None:
        self.procs = procs
        self.use_wrk = use_wrk
        self.pinning = pinning
        self.connections = connections
        self.in_process = in_process and not use_wrk

    def describe(self) -> str:
        if self.use_wrk:
            version = subprocess.run(
                ["wrk", "-v"], capture_output=True, text=True, check=False
            ).stdout.split()
            name = " ".join(version[:2]) if version else "wrk"
            return f"{name}, 1 thread, {self.connections} keep-alive connections"
        where = ", in the run's own process" if self.in_process else ""
        return (
            f"bench.loadgen (Python asyncio{where}), {self.connections} keep-alive "
            "connections"
        )

    async def run(
        self,
        ports: Sequence[int],
        seconds: float,
        pin: bool = True,
    ) -> LoadResult:
        """Load ``ports`` for ``seconds`` with at least ``connections``."""
        connections = max(self.connections, len(ports))
        cpu = self.pinning.load if pin else None
        prefix = self.pinning.prefix(cpu)
        if self.use_wrk:
            return await self._wrk(prefix, ports, connections, seconds)
        max_requests = int(seconds * 200_000) + 1000
        if self.in_process:
            return _load_result(
                await loadgen.load(ports, connections, seconds, max_requests)
            )
        args = [*prefix, sys.executable, "-m", "bench.loadgen"]
        for port in ports:
            args += ["--port", str(port)]
        args += [
            "--connections",
            str(connections),
            "--duration",
            str(seconds),
            "--max-requests",
            str(max_requests),
        ]
        process, log = await self.procs.spawn(args, name="loadgen")
        line = await first_line(process, log, "bench.loadgen")
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
                "--latency",
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
        data.get("p99_ms"),
    )


WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
"""Seconds in each unit wrk prints durations in."""


def _sum_wrk(outputs: Sequence[str]) -> LoadResult:
    """One :class:`LoadResult` from wrk's outputs (one per port): requests
    and errors add up, the p99 latency is the worst of theirs."""
    requests = non_200 = errors = 0
    seconds = 0.0
    p99s = []
    for out in outputs:
        match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
        if match is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        requests += int(match.group(1))
        seconds = max(seconds, float(match.group(2)) * WRK_UNITS[match.group(3)])
        match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        non_200 += int(match.group(1)) if match else 0
        match = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
            out,
        )
        errors += sum(int(g) for g in match.groups()) if match else 0
        match = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if match:  # in the "Latency Distribution" that --latency prints
            p99s.append(float(match.group(1)) * WRK_UNITS[match.group(2)] * 1000)
    p99 = max(p99s) if len(p99s) == len(outputs) else None
    return LoadResult(requests, seconds, non_200, errors, p99)


# --------------------------------------------------------------------------
# what every benchmark gets


@dataclasses.dataclass
class Bench:
    """What a benchmark's ``measure`` gets from the run."""

    smoke: bool
    binary: str
    """The ``consul`` binary."""
    agent: Agent | None
    """The run's dev agent on 127.0.0.1 (None when no benchmark needs it)."""
    procs: Processes
    load: LoadGenerator
    pinning: Pinning

    @property
    def dev_agent(self) -> Agent:
        if self.agent is None:
            raise RuntimeError("this benchmark needs the run's dev agent")
        return self.agent


Target = tuple[str, str, bool]
"""A target, what was measured, and whether it was met."""


# --------------------------------------------------------------------------
# the report


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table, as lines."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


def progress(message: str) -> None:
    """A line on stderr while the run goes on."""
    print(f"  {message}", file=sys.stderr, flush=True)


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files, or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


NO_MATPLOTLIB = "no plot: matplotlib is not installed (pip install -e '.[bench]')"


def save(plt: Any, fig: Any, path: Path | None) -> str:
    """Write ``fig`` to ``path`` (or only draw it), close it; say what was done."""
    try:
        if path is None:
            fig.savefig(io.BytesIO(), format="png", dpi=50)
            return "plot drawn (not written: a smoke run writes no files)"
        fig.savefig(path, dpi=100)
        return f"plot written to {path}"
    finally:
        plt.close(fig)


def versions(binary: str) -> str:
    """Python, Tornado, python-consul2, the library and Consul, for the header."""
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


def machine() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_results(path: Path, run: dict[str, Any], parts: dict[str, Any]) -> None:
    """Merge this run's results into ``path`` (JSON), one entry per benchmark.

    Each benchmark's entry holds its plan, its figures and the facts of the run
    that made them (``run``: date, machine, versions...), so a run of one
    benchmark replaces its own entry and keeps the others'.
    """
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    if not isinstance(previous, dict) or "run" in previous:
        previous = {}  # an old layout: one run of everything
    for name, result in parts.items():
        previous[name] = {"run": run, **dataclasses.asdict(result)}
    path.write_text(json.dumps(previous, indent=1) + "\n")
