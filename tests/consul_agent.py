"""A real Consul agent for the test suite (standard library only).

Used as a module by ``tests/conftest.py`` and as a command line tool::

    python -m tests.consul_agent binary   # print the path of a consul binary
    python -m tests.consul_agent agent    # run a dev agent, print its HTTP address

Where the binary comes from (see :func:`find_consul` and :func:`fetch_consul`):

1. ``$CONSUL_BINARY`` if set;
2. ``consul`` on ``$PATH``;
3. the cache, ``$SSC_CACHE_DIR`` (default
   ``${XDG_CACHE_HOME:-~/.cache}/sprockets-status-consul``), under
   ``consul-1.8.7/root/usr/bin/consul``;
4. otherwise :func:`fetch_consul` downloads Debian bullseye's ``consul`` package
   (Consul 1.8.7) with ``apt-get download`` into that cache, using a private apt
   configuration derived from the machine's own Debian sources at run time (the
   system's apt state is never touched), and unpacks it with ``dpkg -x``.

:class:`DevAgent` runs ``consul agent -dev`` on loopback with free ports, a
private temporary data directory and a log file, and cleans up after itself
(``stop()``, context manager, ``atexit``, and the agent gets SIGTERM if the
Python process that started it dies).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import fcntl
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

__all__ = [
    "CONSUL_VERSION",
    "NODE_MAINTENANCE_CHECK",
    "AgentBase",
    "ConsulCommandError",
    "ConsulUnavailable",
    "DevAgent",
    "ExternalAgent",
    "HTTPResponse",
    "cache_dir",
    "cached_binary_path",
    "fetch_consul",
    "find_consul",
    "find_or_fetch_consul",
    "free_port",
    "main",
    "reset_agent_state",
    "wait_for",
]

T = TypeVar("T")

CONSUL_VERSION = "1.8.7"
"""The version :func:`fetch_consul` installs (Debian bullseye's package)."""

NODE_MAINTENANCE_CHECK = "_node_maintenance"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 15.0
PORT_NAMES = ("http", "serf_lan", "serf_wan", "server", "grpc")
"""Ports a dev agent gets (``dns`` is disabled with ``-1``)."""

_DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
_DEBIAN_SOURCES_LIST = Path("/etc/apt/sources.list")
_FETCH_SUITE = "bullseye"
_APT_TIMEOUT = 300.0


class ConsulUnavailable(RuntimeError):
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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_free(host: str, also_udp: bool) -> tuple[int, list[socket.socket]]:
    family = _family(host)
    for _ in range(50):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.bind((host, 0))
        port: int = tcp.getsockname()[1]
        held = [tcp]
        if also_udp:
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            held.append(udp)
        return port, held
    raise OSError(f"could not find a free port on {host}")


def free_port(host: str = DEFAULT_HOST, *, also_udp: bool = False) -> int:
    """A port that is free on ``host`` right now (the kernel's pick for port 0).

    With ``also_udp`` the port is free for both TCP and UDP (Serf uses both).
    """
    port, held = _bind_free(host, also_udp)
    for sock in held:
        sock.close()
    return port


def _free_ports(host: str, names: Sequence[str]) -> dict[str, int]:
    """Distinct free ports, all held open until every one is chosen."""
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name in names:
            port, socks = _bind_free(host, also_udp=name.startswith("serf"))
            ports[name] = port
            held.extend(socks)
    finally:
        for sock in held:
            sock.close()
    return ports


def _tail(path: Path, max_lines: int = 40, max_bytes: int = 16384) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError as exc:
        return f"<no log: {exc}>"
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-max_lines:])


def _text_tail(text: str | bytes | None, max_lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = (text or "").strip().splitlines()
    return "\n".join(lines[-max_lines:]) or "<empty>"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without CONSUL_* settings that could redirect the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(extra)
    return env


# --------------------------------------------------------------------------
# finding and fetching the binary


def cache_dir() -> Path:
    """The download cache.

    ``$SSC_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/sprockets-status-consul``.
    """
    explicit = os.environ.get("SSC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "sprockets-status-consul"


def cached_binary_path() -> Path:
    """Where :func:`fetch_consul` puts the binary (it may not exist yet)."""
    return cache_dir() / f"consul-{CONSUL_VERSION}" / "root" / "usr" / "bin" / "consul"


def _is_executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_consul() -> str | None:
    """The consul binary to use, or ``None`` if there is none without fetching.

    ``$CONSUL_BINARY`` (which must then be an executable file, else
    :class:`ConsulUnavailable`), else ``consul`` on ``$PATH``, else the cache.
    """
    explicit = os.environ.get("CONSUL_BINARY")
    if explicit:
        if not _is_executable(explicit):
            raise ConsulUnavailable(
                f"CONSUL_BINARY={explicit!r} is not an executable file"
            )
        return explicit
    on_path = shutil.which("consul")
    if on_path:
        return on_path
    cached = cached_binary_path()
    if _is_executable(cached):
        return str(cached)
    return None


def _first_deb822_stanza(text: str) -> str | None:
    stanza: list[str] = []
    for line in text.splitlines():
        if line.strip():
            stanza.append(line)
        elif any(not s.lstrip().startswith("#") for s in stanza):
            break
        else:
            stanza = []
    if not any(not s.lstrip().startswith("#") for s in stanza):
        return None
    return "\n".join(stanza)


def _bullseye_sources() -> tuple[str, str]:
    """(file name, contents) of an apt source for Debian bullseye.

    Derived from the machine's own Debian sources, so whatever mirror this
    machine is set up to use is used, and no host name is written down here.
    """
    if _DEBIAN_SOURCES.is_file():
        stanza = _first_deb822_stanza(_DEBIAN_SOURCES.read_text())
        if stanza is None:
            raise ConsulUnavailable(f"no apt source stanza in {_DEBIAN_SOURCES}")
        lines = [ln for ln in stanza.splitlines() if not ln.startswith("Suites:")]
        if not any(ln.startswith("URIs:") for ln in lines):
            raise ConsulUnavailable(f"first stanza of {_DEBIAN_SOURCES} has no URIs")
        lines.append(f"Suites: {_FETCH_SUITE}")
        return f"{_FETCH_SUITE}.sources", "\n".join(lines) + "\n"
    if _DEBIAN_SOURCES_LIST.is_file():
        for line in _DEBIAN_SOURCES_LIST.read_text().splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] == "deb":
                # deb [options] URI suite components...
                idx = 2 if words[1].startswith("[") else 1
                if len(words) > idx + 2:
                    words[idx + 1] = _FETCH_SUITE
                    return f"{_FETCH_SUITE}.list", " ".join(words) + "\n"
    raise ConsulUnavailable(
        f"no Debian apt sources found ({_DEBIAN_SOURCES} or {_DEBIAN_SOURCES_LIST})"
    )


def _run_apt(apt: Sequence[str], command: Sequence[str], cwd: Path) -> None:
    what = f"apt-get {' '.join(command)}"
    try:
        proc = subprocess.run(
            [*apt, *command],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=_clean_env(DEBIAN_FRONTEND="noninteractive", LC_ALL="C"),
        )
    except subprocess.TimeoutExpired as exc:
        raise ConsulUnavailable(
            f"`{what}` timed out after {_APT_TIMEOUT:g}s:\n{_text_tail(exc.stderr)}"
        ) from exc
    if proc.returncode != 0:
        raise ConsulUnavailable(
            f"`{what}` (private apt config, Debian {_FETCH_SUITE}) failed with "
            f"exit code {proc.returncode}:\n{_text_tail(proc.stderr)}"
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_consul() -> str:
    """Download Consul 1.8.7 into the cache (if not there yet); return its path.

    Runs ``apt-get update`` and ``apt-get download consul`` against Debian
    bullseye with a private apt configuration (source file, lists and cache in
    a temporary folder), then ``dpkg -x``. The result is moved into place with
    a single rename, so the cache never holds a half-made install; concurrent
    callers are serialised with a lock file. Raises :class:`ConsulUnavailable`
    with the tail of apt-get's error output when anything fails.
    """
    final_binary = cached_binary_path()
    if _is_executable(final_binary):
        return str(final_binary)
    apt_get = shutil.which("apt-get")
    dpkg = shutil.which("dpkg")
    if apt_get is None or dpkg is None:
        raise ConsulUnavailable(
            "cannot fetch consul: apt-get/dpkg not found; install Consul or set "
            "CONSUL_BINARY (or CONSUL_HTTP_ADDR for an agent that is running)"
        )
    root = cache_dir()
    final_dir = root / f"consul-{CONSUL_VERSION}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConsulUnavailable(f"cannot create cache dir {root}: {exc}") from exc

    with _file_lock(root / ".fetch.lock"):
        if _is_executable(final_binary):  # someone else fetched it meanwhile
            return str(final_binary)
        tmp = Path(tempfile.mkdtemp(prefix=f".consul-{CONSUL_VERSION}.", dir=root))
        try:
            work = tmp / "apt"
            stage = tmp / "stage"
            for sub in ("sources", "lists/partial", "cache/archives/partial"):
                (work / sub).mkdir(parents=True)
            (work / "preferences.d").mkdir()
            name, contents = _bullseye_sources()
            (work / "sources" / name).write_text(contents)
            apt = [
                apt_get,
                "-q",
                "-o",
                "Dir::Etc::SourceList=/dev/null",
                "-o",
                f"Dir::Etc::SourceParts={work / 'sources'}",
                "-o",
                f"Dir::State::Lists={work / 'lists'}",
                "-o",
                f"Dir::Cache={work / 'cache'}",
                "-o",
                "Dir::Etc::Preferences=/dev/null",
                "-o",
                f"Dir::Etc::PreferencesParts={work / 'preferences.d'}",
            ]
            if os.geteuid() == 0:
                # the private folders are not readable by the _apt sandbox user
                apt += ["-o", "APT::Sandbox::User=root"]
            _run_apt(apt, ["update"], cwd=work)
            _run_apt(apt, ["download", "consul"], cwd=work)
            debs = sorted(work.glob("consul_*.deb"))
            if not debs:
                raise ConsulUnavailable("apt-get download consul produced no .deb")
            deb = debs[-1]
            if not deb.name.startswith(f"consul_{CONSUL_VERSION}"):
                raise ConsulUnavailable(
                    f"expected consul {CONSUL_VERSION} from {_FETCH_SUITE}, "
                    f"got {deb.name}"
                )
            stage.mkdir()
            unpack = subprocess.run(
                [dpkg, "-x", str(deb), str(stage / "root")],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if unpack.returncode != 0:
                raise ConsulUnavailable(
                    f"dpkg -x {deb.name} failed:\n{_text_tail(unpack.stderr)}"
                )
            staged_binary = stage / "root" / "usr" / "bin" / "consul"
            if not _is_executable(staged_binary):
                raise ConsulUnavailable(f"{deb.name} has no usr/bin/consul")
            version = subprocess.run(
                [str(staged_binary), "version"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if f"Consul v{CONSUL_VERSION}" not in version.stdout:
                raise ConsulUnavailable(
                    f"unpacked consul does not run as v{CONSUL_VERSION}: "
                    f"{_text_tail(version.stdout + version.stderr)}"
                )
            (stage / "SOURCE").write_text(
                f"{deb.name} from Debian {_FETCH_SUITE}\n{version.stdout}"
            )
            if final_dir.exists():  # a broken leftover without the binary
                shutil.rmtree(final_dir)
            os.rename(stage, final_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final_binary)


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

    @property
    def http_addr(self) -> str:
        raise NotImplementedError

    @property
    def node_name(self) -> str:
        raise NotImplementedError

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
        binary = self._binary or find_consul()
        if binary is None:
            raise ConsulUnavailable(
                f"a consul binary is needed to run the CLI against {self.url}: "
                "put consul on PATH or set CONSUL_BINARY"
            )
        return binary


# --------------------------------------------------------------------------
# the dev agent

_LIVE_AGENTS: set[DevAgent] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_agents() -> None:
    with _LIVE_LOCK:
        agents = list(_LIVE_AGENTS)
    for agent in agents:
        with contextlib.suppress(Exception):
            agent.stop(timeout=5.0)


def _prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _prctl() if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: get SIGTERM when the parent thread dies."""
    parent = os.getppid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)


class DevAgent(AgentBase):
    """``consul agent -dev`` on loopback with its own free ports.

    ``host``: the loopback address to bind (default ``127.0.0.1``).
    ``node_name``: default ``ssc-<random>``.
    ``extra_config``: more agent configuration: a mapping (written as JSON) or
    a string (HCL, or JSON, which HCL accepts), e.g. to enable ACLs or TLS.
    ``ports``: fixed ports to use instead of free ones, merged over the
    defaults (names as in Consul's ``ports`` block, e.g. ``{"https": 8501}``).
    ``token``: the ACL token the readiness checks, :meth:`request` and
    :meth:`consul` use.
    ``die_with_parent``: on Linux the agent gets SIGTERM when the *thread* that
    started it ends (so a killed test run leaves no agent behind); pass
    ``False`` when starting agents from short-lived threads.

    ``start()`` returns once there is a leader, ``/v1/agent/self`` answers and
    the node is registered in the catalog with a passing ``serfHealth``.
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        host: str = DEFAULT_HOST,
        node_name: str | None = None,
        extra_config: str | Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        ports: Mapping[str, int] | None = None,
        token: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        die_with_parent: bool = True,
    ) -> None:
        self.binary = binary or find_or_fetch_consul()
        self.die_with_parent = die_with_parent and _PRCTL is not None
        self.host = host
        self._node_name = node_name or f"ssc-{secrets.token_hex(4)}"
        self.extra_config = extra_config
        self.extra_args = list(extra_args)
        self._fixed_ports = dict(ports or {})
        self._ports: dict[str, int] | None = None
        self.token = token
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._paused = False
        self.last_log = ""
        """Tail of the log of the last agent process that was stopped."""

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.http_addr if self._ports else self.host
        return f"DevAgent({self._node_name!r}, {where}, {state})"

    # -- properties

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def ports(self) -> dict[str, int]:
        if self._ports is None:
            raise RuntimeError("the agent has not been started yet")
        return dict(self._ports)

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def http_addr(self) -> str:
        return _hostport(self.host, self.http_port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def tmpdir(self) -> Path | None:
        return self._tmpdir

    @property
    def log_path(self) -> Path | None:
        return self._tmpdir / "consul.log" if self._tmpdir else None

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        return _tail(path, lines) if path else self.last_log

    def _binary_for_cli(self) -> str:
        return self.binary

    # -- lifecycle

    def start(self) -> DevAgent:
        """Start the agent and wait until it is ready (see the class doc)."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        attempts = 1 if (self._ports is not None or self._fixed_ports) else 3
        for attempt in range(attempts):
            if self._ports is None or attempt:
                self._ports = _free_ports(self.host, PORT_NAMES)
                self._ports.update(self._fixed_ports)
            try:
                self._spawn()
                self._wait_ready()
                return self
            except ConsulUnavailable as exc:
                log = self.log_tail()
                self._terminate(timeout=5.0)
                self._cleanup_tmpdir()
                retry = "address already in use" in log and attempt + 1 < attempts
                if not retry:
                    raise ConsulUnavailable(
                        f"{exc}\n--- consul log ---\n{log}"
                    ) from exc
            except BaseException:  # e.g. KeyboardInterrupt: leave nothing behind
                self._terminate(timeout=5.0)
                self._cleanup_tmpdir()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _config(self) -> dict[str, Any]:
        assert self._ports is not None
        return {
            "ports": {"dns": -1, **self._ports},
            "disable_update_check": True,
            "disable_anonymous_signature": True,
            "log_level": "DEBUG",
        }

    def _spawn(self) -> None:
        self._cleanup_tmpdir()
        tmp = Path(tempfile.mkdtemp(prefix="ssc-consul-"))
        self._tmpdir = tmp
        (tmp / "base.json").write_text(json.dumps(self._config(), indent=2))
        args = [
            self.binary,
            "agent",
            "-dev",
            "-node",
            self._node_name,
            "-bind",
            self.host,
            "-client",
            self.host,
            "-advertise",
            self.host,
            "-data-dir",
            str(tmp / "data"),
            "-config-file",
            str(tmp / "base.json"),
        ]
        if self.extra_config is not None:
            if isinstance(self.extra_config, str):
                extra = tmp / "extra.hcl"
                extra.write_text(self.extra_config)
            else:
                extra = tmp / "extra.json"
                extra.write_text(json.dumps(self.extra_config, indent=2))
            args += ["-config-file", str(extra)]
        args += self.extra_args
        (tmp / "command").write_text(" ".join(args) + "\n")
        with (tmp / "consul.log").open("wb") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=tmp,
                start_new_session=True,  # Ctrl-C in a terminal goes to us only
                # dies with the thread that started it, even on SIGKILL (Linux)
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self._paused = False
        with _LIVE_LOCK:
            _LIVE_AGENTS.add(self)

    def _ready(self) -> bool:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise ConsulUnavailable(f"consul agent exited with code {code}")
        if not self.is_ready():
            return False
        return any(
            c.get("CheckID") == "serfHealth" and c.get("Status") == "passing"
            for c in self.node_checks(timeout=1.0)
        )

    def _wait_ready(self) -> None:
        try:
            wait_for(
                self._ready,
                timeout=self.startup_timeout,
                interval=0.02,
                message=f"consul agent {self._node_name} at {self.http_addr} "
                "did not become ready",
                ignore=(OSError, AssertionError, ValueError),
            )
        except AssertionError as exc:
            raise ConsulUnavailable(str(exc)) from exc

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a paused agent must run to exit
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._reap(proc)
        self._forget()

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` and wait for it."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10.0)

    def _forget(self) -> None:
        """No longer running: not paused, not among the agents to clean up."""
        self._paused = False
        with _LIVE_LOCK:
            _LIVE_AGENTS.discard(self)

    def _cleanup_tmpdir(self) -> None:
        if self._tmpdir is not None:
            self.last_log = _tail(self._tmpdir / "consul.log")
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, SIGKILL; remove the temp dir.

        Safe to call more than once. ``last_log`` keeps the log's tail.
        """
        self._terminate(timeout)
        self._cleanup_tmpdir()

    def kill(self) -> None:
        """SIGKILL the agent (a crash) and reap it; the temp dir (log) stays
        until :meth:`stop` or the next :meth:`start`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._reap(proc)
        self._forget()

    def pause(self) -> None:
        """SIGSTOP: the agent stops answering (connections hang, not refused)."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def restart(self) -> DevAgent:
        """Stop, then start again on the same ports with an empty data dir
        (so all catalog state and Raft indexes start over)."""
        self.stop()
        return self.start()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the agent process to exit; return its exit code."""
        if self._proc is None:
            raise RuntimeError("the agent has not been started")
        return self._proc.wait(timeout=timeout)

    def __enter__(self) -> DevAgent:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
            args.binary,
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
    p_agent.add_argument(
        "--timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT, help="startup"
    )
    p_agent.set_defaults(func=_cmd_agent)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
