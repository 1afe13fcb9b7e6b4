"""A throwaway Consul dev agent for integration tests.

:class:`ConsulDevAgent` runs ``consul agent -dev`` on loopback with free ports
and a private temporary data directory, waits until the agent can serve, and
stops it and removes its directory afterwards::

    with ConsulDevAgent() as agent:
        app = web.Application(
            [(r"/status", ConsulStatusHandler)],
            consul_status={"address": agent.http_addr},
        )
        ...
        agent.set_maintenance(True, "deploy 42")

The binary is the one given, else ``$CONSUL_BINARY``, else ``consul`` on
``$PATH`` (:func:`find_consul_binary`); nothing is ever downloaded. With
pytest, the ``consul_dev_agent`` fixture of :mod:`sprockets_status_consul.pytest_plugin`
gives a test one agent per session. This module uses the standard library
only, and importing it imports no pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["ConsulAgentError", "ConsulDevAgent", "find_consul_binary"]

PORT_NAMES = ("http", "serf_lan", "serf_wan", "server", "grpc")
"""Ports a dev agent gets (``dns`` is turned off)."""

_Agent = TypeVar("_Agent", bound="ConsulDevAgent")


class ConsulAgentError(RuntimeError):
    """No Consul binary, or the agent did not start; the message says why
    (for an agent that did not start, with the tail of its log)."""


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Talks to the agent on loopback directly, whatever ``$http_proxy`` says."""


def _executable(path: str, what: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConsulAgentError(f"{what}={path!r} is not an executable file")
    return path


def find_consul_binary() -> str | None:
    """``$CONSUL_BINARY`` (which must be an executable file), else ``consul``
    on ``$PATH``, else ``None``."""
    explicit = os.environ.get("CONSUL_BINARY")
    if explicit:
        return _executable(explicit, "CONSUL_BINARY")
    return shutil.which("consul")


class ConsulDevAgent:
    """``consul agent -dev`` on loopback, on ports free when it starts.

    ``binary``: the consul executable (default: :func:`find_consul_binary`,
    :class:`ConsulAgentError` if there is none). ``host``: the loopback
    address to bind. ``node_name``: default ``ssc-<random>``.
    ``extra_config``: more agent configuration, a mapping (written as JSON)
    or a string (HCL), e.g. to turn ACLs on. ``extra_args``: more command
    line arguments, e.g. ``-retry-join`` to join another agent. ``ports``:
    fixed ports instead of free ones, by the names of Consul's ``ports``
    block. ``token``: the ACL token the readiness checks and
    :meth:`set_maintenance` send.
    ``die_with_parent``: on Linux, the agent gets SIGTERM when the thread that
    started it ends, so a killed test run leaves no agent behind (pass
    ``False`` when starting agents from short-lived threads).

    :meth:`start` returns once there is a leader and the node is registered
    with a passing ``serfHealth`` check. Agents still running when Python
    exits are stopped then.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        host: str = "127.0.0.1",
        node_name: str | None = None,
        extra_config: str | Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        ports: Mapping[str, int] | None = None,
        token: str | None = None,
        startup_timeout: float = 15.0,
        die_with_parent: bool = True,
    ) -> None:
        found = _executable(binary, "binary") if binary else find_consul_binary()
        if found is None:
            raise ConsulAgentError(
                "no consul binary: set CONSUL_BINARY or put consul on PATH"
            )
        self.binary = found
        self.host = host
        self.node_name = node_name or f"ssc-{secrets.token_hex(4)}"
        self.extra_config = extra_config
        self.extra_args = list(extra_args)
        self.token = token
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent and _PRCTL is not None
        self._fixed_ports = dict(ports or {})
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._last_log = ""

    def __repr__(self) -> str:
        where = self.http_addr if self._ports else self.host
        state = "running" if self.running else "stopped"
        return f"{type(self).__name__}({self.node_name!r}, {where}, {state})"

    @property
    def ports(self) -> dict[str, int]:
        """The agent's ports by name (``http``, ``serf_lan``, ...)."""
        if self._ports is None:
            raise RuntimeError("the agent has not been started yet")
        return dict(self._ports)

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def http_addr(self) -> str:
        """``host:port`` of the HTTP API: the ``address`` setting to use."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The agent's log file while its directory exists."""
        return self._tmpdir / "consul.log" if self._tmpdir else None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log (after :meth:`stop`: of the last run)."""
        path = self.log_path
        return _tail(path, lines) if path else self._last_log

    # -- lifecycle

    def start(self: _Agent) -> _Agent:
        """Start the agent (on the ports of the last run, if there was one)
        and wait until it is ready; :class:`ConsulAgentError` if it is not."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        fresh_ports = self._ports is None and not self._fixed_ports
        attempts = 3 if fresh_ports else 1  # a free port may be taken meanwhile
        for attempt in range(attempts):
            if self._ports is None or attempt:
                self._ports = {**_free_ports(self.host), **self._fixed_ports}
            try:
                self._spawn()
                self._wait_ready()
                return self
            except ConsulAgentError as exc:
                log = self.log_tail()
                self.stop(timeout=5.0)
                if "address already in use" not in log or attempt + 1 == attempts:
                    raise ConsulAgentError(f"{exc}\n--- consul log ---\n{log}") from exc
            except BaseException:  # e.g. KeyboardInterrupt: leave nothing behind
                self.stop(timeout=5.0)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, SIGKILL; remove the
        agent's directory (:meth:`log_tail` keeps the log's end). Safe to call
        more than once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a stopped agent must run to exit
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10.0)
        with _LIVE_LOCK:
            _LIVE_AGENTS.discard(self)
        if self._tmpdir is not None:
            self._last_log = _tail(self._tmpdir / "consul.log")
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the agent process to exit; return its exit code."""
        if self._proc is None:
            raise RuntimeError("the agent has not been started")
        return self._proc.wait(timeout=timeout)

    def __enter__(self: _Agent) -> _Agent:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the agent's API

    def set_maintenance(self, enable: bool, reason: str = "") -> None:
        """Node maintenance on or off, as ``consul maint`` does it."""
        params = {"enable": "true" if enable else "false"}
        if reason:
            params["reason"] = reason
        status, body = self._call("PUT", "/v1/agent/maintenance", params)
        if status != 200:
            raise ConsulAgentError(f"maintenance {enable}: {status} {body[:200]!r}")

    def _call(
        self, method: str, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, method=method)
        if self.token:
            request.add_header("X-Consul-Token", self.token)
        try:
            with _DIRECT.open(request, timeout=2.0) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read()

    # -- starting

    def _spawn(self) -> None:
        assert self._ports is not None
        tmp = Path(tempfile.mkdtemp(prefix="ssc-consul-"))
        self._tmpdir = tmp
        config = {
            "ports": {"dns": -1, **self._ports},
            "disable_update_check": True,
            "disable_anonymous_signature": True,
            "log_level": "DEBUG",
        }
        (tmp / "base.json").write_text(json.dumps(config, indent=2))
        args = [
            self.binary, "agent", "-dev",
            "-node", self.node_name,
            "-bind", self.host, "-client", self.host, "-advertise", self.host,
            "-data-dir", str(tmp / "data"),
            "-config-file", str(tmp / "base.json"),
        ]  # fmt: skip
        if self.extra_config is not None:
            if isinstance(self.extra_config, str):
                extra, text = tmp / "extra.hcl", self.extra_config
            else:
                extra, text = tmp / "extra.json", json.dumps(self.extra_config)
            extra.write_text(text)
            args += ["-config-file", str(extra)]
        args += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        with (tmp / "consul.log").open("wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
                start_new_session=True,  # Ctrl-C in a terminal goes to us only
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        with _LIVE_LOCK:
            _LIVE_AGENTS.add(self)

    def _ready(self) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise ConsulAgentError(f"consul agent exited with code {code}")
        status, leader = self._call("GET", "/v1/status/leader")
        if status != 200 or not json.loads(leader):
            return False
        node = urllib.parse.quote(self.node_name)
        status, checks = self._call("GET", f"/v1/health/node/{node}")
        return status == 200 and any(
            c.get("CheckID") == "serfHealth" and c.get("Status") == "passing"
            for c in json.loads(checks)
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self._ready():
                    return
            except (OSError, ValueError) as exc:  # not listening yet, half-started
                last_error = exc
            time.sleep(0.02)
        raise ConsulAgentError(
            f"consul agent {self.node_name} at {self.http_addr} was not ready "
            f"after {self.startup_timeout:g}s (last error: {last_error!r})"
        )


def _tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - max_bytes))
            data = fh.read()
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _free_ports(host: str) -> dict[str, int]:
    """A distinct free port for each of :data:`PORT_NAMES`, for TCP and (for
    Serf) UDP, all held open until every one is chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name in PORT_NAMES:
            for _ in range(50):
                tcp = socket.socket(family, socket.SOCK_STREAM)
                held.append(tcp)
                tcp.bind((host, 0))
                port: int = tcp.getsockname()[1]
                if not name.startswith("serf"):
                    break
                udp = socket.socket(family, socket.SOCK_DGRAM)
                held.append(udp)
                with contextlib.suppress(OSError):
                    udp.bind((host, port))
                    break
            else:
                raise OSError(f"no free TCP+UDP port on {host}")
            ports[name] = port
    finally:
        for sock in held:
            sock.close()
    return ports


_LIVE_AGENTS: set[ConsulDevAgent] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_agents() -> None:
    with _LIVE_LOCK:
        agents = list(_LIVE_AGENTS)
    for agent in agents:
        with contextlib.suppress(Exception):
            agent.stop(timeout=5.0)


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
    """In the child, before exec: get SIGTERM when the parent thread ends."""
    parent = os.getppid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
