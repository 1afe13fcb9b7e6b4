"""What the test suite needs around a real Consul agent (standard library only).

Used as a module by ``tests/conftest.py`` and as a command line tool::

    python -m tests.consul_agent binary   # print the path of a consul binary
    python -m tests.consul_agent agent    # run a dev agent, print its HTTP address

The binary (:func:`find_consul`, :func:`find_or_fetch_consul`): ``$CONSUL_BINARY``,
``consul`` on ``$PATH``, else Consul 1.8.7 from the cache that
``scripts/get-consul`` fills from Debian's archive.

:class:`DevAgent` is the library's own launcher,
:class:`sprockets_status_consul.dev_agent.ConsulDevAgent`, with what only the
tests do to an agent: pause it, kill it, restart it, and the calls of
:class:`AgentBase` (the HTTP API, the ``consul`` CLI, the catalog's checks),
which :class:`ExternalAgent` offers for an agent someone else runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from sprockets_status_consul.dev_agent import (
    ConsulAgentError,
    ConsulDevAgent,
    find_consul_binary,
)

__all__ = [
    "NODE_MAINTENANCE_CHECK",
    "AgentBase",
    "ConsulCommandError",
    "ConsulUnavailable",
    "DevAgent",
    "ExternalAgent",
    "HTTPResponse",
    "fetch_consul",
    "find_consul",
    "find_or_fetch_consul",
    "free_port",
    "main",
    "reset_agent_state",
    "wait_for",
]

T = TypeVar("T")

NODE_MAINTENANCE_CHECK = "_node_maintenance"
DEFAULT_HOST = "127.0.0.1"
GET_CONSUL = Path(__file__).resolve().parent.parent / "scripts" / "get-consul"

ConsulUnavailable = ConsulAgentError
"""No Consul binary or agent can be had; the message says why."""


class ConsulCommandError(subprocess.CalledProcessError):
    """A ``consul`` CLI command failed; ``str()`` includes its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstdout: {out}\nstderr: {err}"


# --------------------------------------------------------------------------
# small utilities


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
    *,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Raises :class:`AssertionError` with ``message`` (a string, or a callable
    evaluated at timeout so it can describe the last state) once ``timeout``
    seconds have passed. Exceptions of the types in ``ignore`` count as a falsy
    result; the last one is mentioned in the error.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_exc = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            if last_exc is not None:
                text = f"{text} (last error: {last_exc!r})"
            raise AssertionError(f"timed out after {timeout:g}s: {text}")
        time.sleep(interval)


def free_port(host: str = DEFAULT_HOST, *, also_udp: bool = False) -> int:
    """A TCP port that is free on ``host`` right now (the kernel's pick).

    With ``also_udp`` the same UDP port is free too (for an agent's DNS).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
            if not also_udp:
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise ConsulUnavailable(f"no port free for both TCP and UDP on {host}")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without CONSUL_* settings that could redirect the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# the binary


def _get_consul(*args: str) -> str | None:
    """``scripts/get-consul``'s path, or ``None`` for "not cached" (exit 3)."""
    proc = subprocess.run(
        [sys.executable, str(GET_CONSUL), *args],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 3 and "--no-fetch" in args:
        return None
    if proc.returncode != 0:
        raise ConsulUnavailable(proc.stderr.strip() or f"exit {proc.returncode}")
    return proc.stdout.strip()


def find_consul() -> str | None:
    """``$CONSUL_BINARY``, ``consul`` on ``$PATH``, or the cached download
    (``None`` if none of them, without fetching)."""
    return find_consul_binary() or _get_consul("--no-fetch")


def fetch_consul() -> str:
    """Consul 1.8.7 in the cache, downloaded by ``scripts/get-consul`` if
    missing; :class:`ConsulUnavailable` with apt-get's complaint otherwise."""
    path = _get_consul()
    assert path is not None
    return path


def find_or_fetch_consul() -> str:
    """:func:`find_consul`, else :func:`fetch_consul`."""
    return find_consul() or fetch_consul()


# --------------------------------------------------------------------------
# talking to an agent


@dataclasses.dataclass(frozen=True)
class HTTPResponse:
    """A response from the agent's HTTP API (any status; never raises)."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def index(self) -> int | None:
        """``X-Consul-Index`` as an int, if present."""
        value = self.headers.get("x-consul-index")
        return int(value) if value is not None else None


class AgentBase:
    """What every agent the tests get offers (dev or external).

    Attributes: ``http_addr`` ("127.0.0.1:8500"), ``url`` ("http://..."),
    ``node_name``, ``token`` (ACL token or ``None``).
    """

    scheme = "http"
    token: str | None = None
    http_addr: str
    node_name: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.http_addr}"

    def _binary_for_cli(self) -> str:
        raise NotImplementedError

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float = 5.0,
    ) -> HTTPResponse:
        """Call the HTTP API, e.g. ``agent.request("GET", "/v1/agent/self")``."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return HTTPResponse(
                    resp.status,
                    {k.lower(): v for k, v in resp.headers.items()},
                    resp.read(),
                )
        except urllib.error.HTTPError as exc:
            with exc:
                return HTTPResponse(
                    exc.code,
                    {k.lower(): v for k, v in exc.headers.items()},
                    exc.read(),
                )

    def get_json(
        self, path: str, params: Mapping[str, str] | None = None, timeout: float = 5.0
    ) -> Any:
        """GET ``path`` and return its JSON; raise on a non-200 answer."""
        resp = self.request("GET", path, params=params, timeout=timeout)
        if resp.status != 200:
            raise AssertionError(f"GET {path} -> {resp.status}: {resp.body[:500]!r}")
        return resp.json()

    def leader(self, timeout: float = 5.0) -> str:
        """``/v1/status/leader`` ("" while there is none)."""
        value = self.get_json("/v1/status/leader", timeout=timeout)
        return value if isinstance(value, str) else ""

    def node_checks(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """``/v1/health/node/<node_name>``: the node's checks in the catalog."""
        checks: list[dict[str, Any]] = self.get_json(
            f"/v1/health/node/{urllib.parse.quote(self.node_name)}", timeout=timeout
        )
        return checks

    def maintenance_check(self) -> dict[str, Any] | None:
        """The catalog's ``_node_maintenance`` check for this node, if any."""
        for check in self.node_checks():
            if check.get("CheckID") == NODE_MAINTENANCE_CHECK:
                return check
        return None

    def is_ready(self, timeout: float = 1.0) -> bool:
        """There is a leader, and the agent answers ``/v1/agent/self``
        (each request given ``timeout`` seconds)."""
        return bool(self.leader(timeout=timeout)) and (
            self.request("GET", "/v1/agent/self", timeout=timeout).status == 200
        )

    def consul(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``consul`` CLI against this agent.

        E.g. ``agent.consul("maint", "-enable", "-reason", "X")``. With ``check``
        a non-zero exit raises :class:`ConsulCommandError` (output included).
        """
        extra = {"CONSUL_HTTP_ADDR": self.url}
        if self.token:
            extra["CONSUL_HTTP_TOKEN"] = self.token
        cmd = [self._binary_for_cli(), *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=_clean_env(**extra),
        )
        if check and proc.returncode != 0:
            raise ConsulCommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc


def reset_agent_state(agent: AgentBase, timeout: float = 10.0) -> None:
    """Take the node and its local services out of maintenance mode.

    Uses the HTTP API (no binary needed), then waits until the catalog no
    longer shows the node maintenance check.
    """
    resp = agent.request("PUT", "/v1/agent/maintenance", params={"enable": "false"})
    if resp.status != 200:
        raise AssertionError(f"disabling node maintenance -> {resp.status}")
    services = agent.request("GET", "/v1/agent/services")
    if services.status == 200:
        for service_id in services.json() or {}:
            agent.request(
                "PUT",
                f"/v1/agent/service/maintenance/{urllib.parse.quote(service_id)}",
                params={"enable": "false"},
            )
    wait_for(
        lambda: agent.maintenance_check() is None,
        timeout=timeout,
        interval=0.02,
        message=f"node {agent.node_name} still in maintenance in the catalog",
    )


class ExternalAgent(AgentBase):
    """An agent someone else runs, e.g. at ``$CONSUL_HTTP_ADDR``.

    ``addr`` may be ``host:port`` or a ``http(s)://host:port`` URL. ``consul()``
    needs a binary: ``binary``, else :func:`find_consul`, else it raises
    :class:`ConsulUnavailable`.
    """

    def __init__(
        self, addr: str, *, token: str | None = None, binary: str | None = None
    ) -> None:
        if "://" in addr:
            parsed = urllib.parse.urlsplit(addr)
            self.scheme = parsed.scheme or "http"
            self._http_addr = parsed.netloc
        else:
            self._http_addr = addr
        if not self._http_addr:
            raise ValueError(f"bad agent address {addr!r}")
        self.token = token
        self._binary = binary
        self._node_name: str | None = None

    def __repr__(self) -> str:
        return f"ExternalAgent({self.url!r})"

    @property
    def http_addr(self) -> str:
        return self._http_addr

    @property
    def node_name(self) -> str:
        if self._node_name is None:
            self._node_name = str(self.get_json("/v1/agent/self")["Config"]["NodeName"])
        return self._node_name

    def wait_ready(self, timeout: float = 10.0) -> None:
        wait_for(
            self.is_ready,
            timeout=timeout,
            interval=0.1,
            message=f"Consul agent at {self.url} has no leader or does not answer",
            ignore=(OSError,),
        )

    def _binary_for_cli(self) -> str:
        self._binary = self._binary or find_consul()
        if self._binary is None:
            raise ConsulUnavailable(
                f"a consul binary is needed to run the CLI against {self.url}: "
                "put consul on PATH or set CONSUL_BINARY"
            )
        return self._binary


# --------------------------------------------------------------------------
# the dev agent


class DevAgent(ConsulDevAgent, AgentBase):
    """The library's dev agent (see :class:`ConsulDevAgent` for the
    arguments), plus the faults the tests make: :meth:`pause`, :meth:`kill`,
    :meth:`restart`."""

    _paused = False

    def _binary_for_cli(self) -> str:
        return self.binary

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """SIGSTOP: the agent stops answering (connections hang, not refused)."""
        if self.pid is None or not self.running:
            raise RuntimeError(f"{self!r} is not running")
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.pid is not None and self.running:
            os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the agent (a crash) and reap it; its directory (log) stays
        until :meth:`stop` or the next :meth:`start`, on the same ports."""
        if self.pid is not None and self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(timeout=10.0)
        self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._paused = False

    def restart(self) -> DevAgent:
        """Stop, then start again on the same ports with an empty data dir
        (so all catalog state and Raft indexes start over)."""
        self.stop()
        return self.start()


# --------------------------------------------------------------------------
# command line


def _cmd_binary(args: argparse.Namespace) -> int:
    try:
        binary = find_consul() if args.no_fetch else find_or_fetch_consul()
    except ConsulUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if binary is None:
        print("error: no consul binary found (and --no-fetch)", file=sys.stderr)
        return 1
    print(binary)
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _cmd_agent(args: argparse.Namespace) -> int:
    extra: str | None = None
    if args.config:
        extra = Path(args.config).read_text()
    try:
        agent = DevAgent(
            args.binary or find_or_fetch_consul(),
            host=args.host,
            node_name=args.node,
            extra_config=extra,
            ports={"http": args.http_port} if args.http_port else None,
            startup_timeout=args.timeout,
        )
    except ConsulUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        agent.start()
        print(agent.http_addr, flush=True)
        print(
            f"consul {agent.node_name} pid {agent.pid} log {agent.log_path}\n"
            f"export CONSUL_HTTP_ADDR={agent.http_addr}  # Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        code = agent.wait()
        print(
            f"consul exited by itself with code {code}:\n{agent.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except ConsulUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        agent.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.consul_agent",
        description="Get a consul binary, or run a dev agent, for the tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_bin = sub.add_parser("binary", help="print the consul binary's path")
    p_bin.add_argument(
        "--no-fetch", action="store_true", help="do not download when not found"
    )
    p_bin.set_defaults(func=_cmd_binary)
    p_agent = sub.add_parser(
        "agent", help="run a dev agent; print its HTTP address; Ctrl-C stops it"
    )
    p_agent.add_argument("--binary", help="consul binary (default: find or fetch)")
    p_agent.add_argument("--host", default=DEFAULT_HOST, help="loopback address")
    p_agent.add_argument("--node", help="node name (default ssc-<random>)")
    p_agent.add_argument("--http-port", type=int, help="HTTP port (default: free)")
    p_agent.add_argument("--config", help="extra agent config file (HCL or JSON)")
    p_agent.add_argument("--timeout", type=float, default=15.0, help="startup")
    p_agent.set_defaults(func=_cmd_agent)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
