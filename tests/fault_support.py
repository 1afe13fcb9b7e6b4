"""Helpers for the fault, load and security tests (``test_faults.py``,
``test_security.py``): backend processes with their logs, a keep-alive
``/status`` client that times each request, checks of every body, a bounded
asyncio load generator, and a throw-away PKI made with the ``openssl`` CLI.

Everything talks to loopback addresses only, and every loop has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import http.client
import itertools
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .consul_agent import AgentBase, free_port

ROOT = Path(__file__).resolve().parent.parent

CONSUL_STATES = frozenset({"connected", "starting", "unreachable", "stale"})
AWAY = frozenset({"unreachable", "stale"})
"""What the body's ``consul`` field may say while Consul cannot be reached."""

FAST = {"ttl": 1, "timeout": 0.5, "retry_max": 0.5}
"""Settings that make a fault show, and go, within about a second."""

LIBRARY_LOGGER = "sprockets_status_consul"
WARNING_TEXT = " cannot follow "
"""What the watcher's one warning per change of state contains."""


def p99_limit_ms() -> float:
    """The p99 latency of ``/status`` a test accepts, in milliseconds.

    A request reads memory only (about 0.5 ms on a quiet machine). What the
    limit must catch is a request that waits on Consul, which in these tests
    takes at least the 500 ms ``timeout``; 50 ms leaves room for a 2-core
    machine busy with the agents and backends of the test itself, where 10 ms
    was missed by scheduling alone. ``$SSC_P99_LIMIT_MS`` overrides it.
    """
    return float(os.environ.get("SSC_P99_LIMIT_MS", "50"))


def measured(
    record_property: Callable[[str, Any], None], name: str, **values: Any
) -> None:
    """Record a measurement: a junit property, a printed line and, when
    ``$SSC_MEASURE_FILE`` is set, a JSON line appended to that file."""
    for key, value in values.items():
        record_property(f"{name}.{key}", value)
    text = " ".join(f"{k}={v}" for k, v in values.items())
    print(f"\n[measure] {name}: {text}")
    path = os.environ.get("SSC_MEASURE_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, **values}) + "\n")


def set_maintenance(agent: AgentBase, enable: bool, reason: str = "") -> None:
    """Node maintenance on or off, by the agent's HTTP API (``consul maint``)."""
    params = {"enable": "true" if enable else "false"}
    if reason:
        params["reason"] = reason
    response = agent.request("PUT", "/v1/agent/maintenance", params=params)
    assert response.status == 200, response


# --------------------------------------------------------------------------
# /status replies


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer of ``/status``: code, headers, raw body, seconds taken."""

    code: int
    headers: Mapping[str, str]
    raw: bytes
    seconds: float

    @property
    def body(self) -> dict[str, Any]:
        value = json.loads(self.raw)
        assert isinstance(value, dict), self.raw
        return value


def check_status_body(code: int, raw: bytes, where: str = "") -> dict[str, Any]:
    """Assert that a ``/status`` answer is well formed; return its body.

    200 or 503, a JSON object whose ``status`` matches the code, a known
    ``consul`` state, and in maintenance a ``source``.
    """
    context = f"{where} {code} {raw[:300]!r}"
    assert code in (200, 503), f"not 200/503: {context}"
    try:
        body = json.loads(raw)
    except ValueError:
        raise AssertionError(f"not JSON: {context}") from None
    assert isinstance(body, dict), f"not a JSON object: {context}"
    expected = "ok" if code == 200 else "maintenance"
    assert body.get("status") == expected, f"status does not match: {context}"
    assert body.get("consul") in CONSUL_STATES, f"bad consul field: {context}"
    if code == 503:
        assert body.get("source") in ("node", "consul", "application"), context
    return body


class StatusClient:
    """A keep-alive HTTP/1.1 client for one backend's ``/status``."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str = "GET",
        path: str = "/status",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=self.timeout
            )
        conn = self._conn
        started = time.perf_counter()
        try:
            conn.request(method, path, headers=dict(headers or {}))
            response = conn.getresponse()
            raw = response.read()
        except BaseException:
            self.close()
            raise
        seconds = time.perf_counter() - started
        if response.will_close:
            self.close()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            raw,
            seconds,
        )

    def status(self) -> tuple[int, dict[str, Any], float]:
        """GET /status, checked: code, body, seconds."""
        reply = self.request()
        body = check_status_body(reply.code, reply.raw, f"port {self.port}:")
        return reply.code, body, reply.seconds

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass
class Sample:
    """Sequential ``/status`` requests made during a fault."""

    latencies: list[float] = dataclasses.field(default_factory=list)
    codes: collections.Counter[int] = dataclasses.field(
        default_factory=collections.Counter
    )
    consul: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )

    @property
    def count(self) -> int:
        return len(self.latencies)

    def ms(self, q: float) -> float:
        return round(percentile(self.latencies, q) * 1000, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.count,
            "p50_ms": self.ms(50),
            "p99_ms": self.ms(99),
            "max_ms": round(max(self.latencies) * 1000, 3),
            "codes": dict(self.codes),
            "consul": dict(self.consul),
        }


def sample(
    clients: Sequence[StatusClient],
    duration: float,
    expect: Callable[[int, dict[str, Any]], str | None],
    max_requests: int = 20000,
) -> Sample:
    """Ask every backend in turn, one request at a time, for ``duration`` s.

    Every answer is checked (:func:`check_status_body`) and given to
    ``expect``, which returns what is wrong with it, or ``None``.
    """
    result = Sample()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline and result.count < max_requests:
        for client in clients:
            code, body, seconds = client.status()
            problem = expect(code, body)
            assert problem is None, f"port {client.port}: {problem}: {code} {body}"
            result.latencies.append(seconds)
            result.codes[code] += 1
            result.consul[str(body["consul"])] += 1
    return result


def wait_all(
    clients: Sequence[StatusClient],
    predicate: Callable[[int, dict[str, Any]], bool],
    timeout: float,
    what: str,
) -> float:
    """Poll every backend until all satisfy ``predicate``; seconds it took.

    Each answer on the way is checked too (:func:`check_status_body`).
    """
    started = time.monotonic()
    deadline = started + timeout
    last: dict[int, Any] = {}
    while True:
        ok = True
        for client in clients:
            code, body, _ = client.status()
            last[client.port] = (code, body)
            ok = predicate(code, body) and ok
        now = time.monotonic()
        if ok:
            return now - started
        assert now < deadline, f"timed out after {timeout} s waiting for {what}: {last}"
        time.sleep(0.002)


def answers(
    code: int, consul: str | Iterable[str] | None = None, reason: str | None = None
) -> Callable[[int, dict[str, Any]], bool]:
    """A predicate for :func:`wait_all`: this code, consul state and reason."""
    states = {consul} if isinstance(consul, str) else set(consul or ())

    def predicate(got: int, body: dict[str, Any]) -> bool:
        return (
            got == code
            and (not states or body.get("consul") in states)
            and (reason is None or body.get("reason") == reason)
        )

    return predicate


# --------------------------------------------------------------------------
# backend processes


@dataclasses.dataclass
class Backend:
    """A ``python -m tests.backend`` process; its stderr goes to a file."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    settings: dict[str, Any]
    expected_exit: int = 0
    """The exit code :func:`backends` expects; ``-9`` for one a test killed."""

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def mark(self) -> int:
        """A position in the log, for :meth:`log_since`."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", errors="replace")

    def library_lines(self, mark: int = 0) -> list[str]:
        return [
            line
            for line in self.log_since(mark).splitlines()
            if line.startswith(LIBRARY_LOGGER)
        ]

    def warnings(self, mark: int = 0) -> list[str]:
        return [line for line in self.library_lines(mark) if WARNING_TEXT in line]


def backend_env(address: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a backend: no ``CONSUL_*`` but ``CONSUL_HTTP_ADDR``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = address
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def backends(
    address: str,
    settings: Sequence[Mapping[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 20.0,
    grace: float = 0.0,
) -> Iterator[list[Backend]]:
    """One backend per entry of ``settings``, following the agent at ``address``,
    each draining for ``grace`` seconds on SIGTERM.

    On exit every backend gets SIGTERM (SIGKILL after 10 s); when the block
    ended normally, each must have exited 0 without a traceback in its log.
    """
    logdir = Path(tempfile.mkdtemp(prefix="ssc-backends-"))
    started: list[Backend] = []
    clean = False
    try:
        for number, config in enumerate(settings):
            port = free_port()
            log_path = logdir / f"backend-{number}-{port}.log"
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.backend",
                        "--port",
                        str(port),
                        "--settings",
                        json.dumps(dict(config)),
                        "--grace",
                        str(grace),
                    ],
                    cwd=ROOT,
                    env=backend_env(address, env),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                )
            started.append(Backend(port, process, log_path, dict(config)))
        deadline = time.monotonic() + ready_timeout
        for backend in started:
            _wait_ready(backend, deadline)
        yield started
        clean = True
    finally:
        exits = _stop_all(started)
        logs = {b.port: b.log() for b in started}
        shutil.rmtree(logdir, ignore_errors=True)
    if clean:
        for backend in started:
            log = logs[backend.port]
            assert exits[backend.port] == backend.expected_exit, (
                f"backend {backend.port} exit: {log}"
            )
            assert "Traceback" not in log, f"backend {backend.port}: {log}"
            assert "Task was destroyed" not in log, f"backend {backend.port}: {log}"


def _wait_ready(backend: Backend, deadline: float) -> None:
    stdout = backend.process.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            assert left > 0, f"backend {backend.port} not ready: {backend.log()}"
            if selector.select(left):
                chunk = os.read(stdout.fileno(), 4096)
                assert chunk, f"backend {backend.port} exited: {backend.log()}"
                data += chunk
    assert data.split(b"\n")[0].strip() == b"ready", data


def _stop_all(started: Sequence[Backend]) -> dict[int, int | None]:
    for backend in started:
        if backend.process.poll() is None:
            backend.process.terminate()
    exits: dict[int, int | None] = {}
    for backend in started:
        try:
            backend.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            backend.process.kill()
            backend.process.wait(timeout=10)
        if backend.process.stdout is not None:
            backend.process.stdout.close()
        exits[backend.port] = backend.process.returncode
    return exits


@contextlib.contextmanager
def status_clients(ports: Iterable[int]) -> Iterator[list[StatusClient]]:
    clients = [StatusClient(port) for port in ports]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def assert_one_warning_per_change(warnings: Sequence[str], where: str) -> None:
    """No warning repeats the one before it: one line per change of state."""
    for before, after in itertools.pairwise(warnings):
        assert before != after, f"{where}: the same warning twice: {warnings}"


# --------------------------------------------------------------------------
# load


@dataclasses.dataclass
class LoadResult:
    """What :func:`run_load` saw."""

    requests: int = 0
    codes: collections.Counter[int] = dataclasses.field(
        default_factory=collections.Counter
    )
    errors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    bad: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "per_second": round(self.requests / self.seconds) if self.seconds else 0,
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 2),
            "codes": dict(self.codes),
            "socket_errors": sum(self.errors.values()),
            "bad_bodies": len(self.bad),
        }


_REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"


async def _one_connection(
    port: int, deadline: float, result: LoadResult, timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), timeout
    )
    try:
        while loop.time() < deadline:
            started = time.perf_counter()
            writer.write(_REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            lines = head.decode("latin-1").split("\r\n")
            code = int(lines[0].split(" ", 2)[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            raw = await asyncio.wait_for(reader.readexactly(length), timeout)
            result.latencies.append(time.perf_counter() - started)
            result.requests += 1
            result.codes[code] += 1
            try:
                check_status_body(code, raw)
            except AssertionError as error:
                if len(result.bad) < 20:
                    result.bad.append(str(error))
                else:
                    result.bad.append("...")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_load(
    ports: Sequence[int],
    connections: int,
    duration: float,
    timeout: float = 5.0,
) -> LoadResult:
    """``connections`` keep-alive connections spread over ``ports``, each
    sending ``GET /status`` back to back for ``duration`` seconds.

    Every answer is checked; a connect, read or write failure, a timeout or a
    malformed answer is counted, by kind, in ``errors``.
    """
    result = LoadResult()
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + duration

    async def connection(number: int) -> None:
        try:
            await _one_connection(ports[number % len(ports)], deadline, result, timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
            result.errors[type(error).__name__] += 1
        except (ValueError, IndexError, asyncio.LimitOverrunError) as error:
            result.errors[f"malformed answer: {type(error).__name__}"] += 1

    await asyncio.gather(*(connection(n) for n in range(connections)))
    result.seconds = loop.time() - started
    return result


# --------------------------------------------------------------------------
# a throw-away PKI


@dataclasses.dataclass(frozen=True)
class Pki:
    """Files of a test CA, a server and a client certificate, and a stranger CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    subprocess.run(
        [openssl, *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2",
        "-subj", f"/CN=sprockets-status-consul {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-out", cert.name, "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client
    certificate, and another CA that signed neither."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    server = _make_leaf(
        directory,
        "server.dc1.consul",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul\n"
        "extendedKeyUsage=serverAuth,clientAuth\n",
    )
    client = _make_leaf(directory, "status-client", ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca)
