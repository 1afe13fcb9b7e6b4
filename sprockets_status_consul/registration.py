"""Registering the service with Consul, and keeping it registered.

With a ``register`` key in the ``consul_status`` setting the watcher
registers the service on the agent it talks to, with an HTTP check of the
backend's own ``/status``::

    Application(routes, consul_status={"register": {"name": "web", "port": 8000}})

Consul then routes by what ``/status`` says: node maintenance, service
maintenance, the fleet key and the application's own status all take the
instance out of ``?passing`` queries and DNS. The registration is kept true
from the node's checks the watcher already follows: Consul names the check of
a service ``service:<ID>``, so when that check leaves the node's checks (the
agent restarted with empty state, or someone deregistered the service) the
service is registered again, without a query of its own.

The default ID is ``<name>-<host name>-<port>-<pid>-<6 random hex digits>``:
the host name tells containers apart, the port and the process ID the
processes of one host, and the random part, drawn once per interpreter, two
containers that share a host name and a PID namespace's numbers
(``--network host``), or a PID reused after a restart. Within one process the
ID stays the same, so a watcher made again registers the same instance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import random
import re
import secrets
import socket
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .settings import SETTING, SettingsError, is_host
from .transport import Check, ConsulClient, ConsulError, ConsulTimeout

LOGGER = logging.getLogger(__name__)

CHECK_PREFIX = "service:"
"""Consul's ID of the one check registered with a service: ``service:<ID>``."""

MIN_CHECK_INTERVAL = 1.0
"""Consul runs a check at most once a second (shorter intervals are raised)."""

MIN_DEREGISTER_AFTER = 60.0
"""Consul reaps critical services once a minute at the soonest."""

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_HOST_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_PROCESS_TOKEN = secrets.token_hex(3)
_KEYS = frozenset(
    {
        "name",
        "port",
        "id",
        "address",
        "tags",
        "meta",
        "check_path",
        "check_interval",
        "check_timeout",
        "deregister_critical_after",
        "enable_tag_override",
    }
)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What the watcher registers: the ``register`` key of the setting, checked.

    Durations are in seconds. ``address`` is both the service's address in
    the catalog and the host of its check; without it the catalog shows the
    node's address and the check asks the address this process reaches the
    agent from (``127.0.0.1`` for an agent on loopback).
    """

    name: str
    port: int
    id: str = ""  # empty: a default unique per process, see default_id()
    address: str | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    check_path: str = "/status"
    check_interval: float = 10.0
    check_timeout: float | None = None
    deregister_critical_after: float = MIN_DEREGISTER_AFTER
    enable_tag_override: bool = False

    def __post_init__(self) -> None:
        """Check every field, however the registration is made.

        :raises SettingsError: naming the field whose value is unusable.
        """
        name = self._field("name", _identifier, True)
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _FieldError(
                "port",
                " must be the port the application listens on "
                f"(1 to 65535), got {port!r}",
            )
        values = {
            "name": name,
            "id": self._field("id", _identifier) if self.id else default_id(name, port),
            "address": None
            if self.address is None
            else self._field("address", _address),
            "tags": self._field("tags", _tags),
            "meta": self._field("meta", _meta),
            "check_path": self._field("check_path", _path),
            "check_interval": self._field(
                "check_interval",
                _duration,
                MIN_CHECK_INTERVAL,
                "Consul's shortest check interval",
            ),
            "check_timeout": None
            if self.check_timeout is None
            else self._field("check_timeout", _duration, 0.001, "1 ms"),
            "deregister_critical_after": self._field(
                "deregister_critical_after",
                _duration,
                MIN_DEREGISTER_AFTER,
                "Consul's shortest",
            ),
        }
        if not isinstance(self.enable_tag_override, bool):
            raise _FieldError(
                "enable_tag_override",
                f" must be true or false, got {self.enable_tag_override!r}",
            )
        for field, value in values.items():
            object.__setattr__(self, field, value)

    def _field(self, field: str, check: Callable[..., Any], *args: Any) -> Any:
        """``check(value, origin, *args)`` for one field, its error named."""
        origin = f"Registration.{field}"
        try:
            return check(getattr(self, field), origin, *args)
        except SettingsError as error:
            raise _FieldError(field, str(error)[len(origin) :]) from None

    @property
    def check_id(self) -> str:
        """The ID Consul gives the service's HTTP check."""
        return f"{CHECK_PREFIX}{self.id}"

    def check_url(self, host: str) -> str:
        """The URL of the HTTP check when the backend is reached at ``host``."""
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.check_path}"

    @classmethod
    def from_mapping(cls, config: Any) -> Registration:
        """The ``register`` key of the setting, checked.

        :raises SettingsError: naming the key whose value is unusable.
        """
        where = f"{SETTING}['register']"
        if not isinstance(config, Mapping):
            raise SettingsError(
                f"{where} must be a dict with at least name and port, "
                f"not {type(config).__name__}"
            )
        unknown = sorted(set(config) - _KEYS)
        if unknown:
            raise SettingsError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(sorted(_KEYS))}"
            )
        given = {key: value for key, value in config.items() if value is not None}
        try:
            return cls(**{"name": None, "port": None, **given})
        except _FieldError as error:
            raise SettingsError(f"{where}[{error.field!r}]{error.problem}") from None


class _FieldError(SettingsError):
    """A field of :class:`Registration` is unusable; ``problem`` follows its name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"Registration.{field}{problem}")
        self.field = field
        self.problem = problem


def default_id(name: str, port: int) -> str:
    """A service ID unique per process on a node (see the module's doc)."""
    host = _HOST_NAME.sub("-", socket.gethostname()).strip("-.") or "host"
    return f"{name}-{host}-{port}-{os.getpid()}-{_PROCESS_TOKEN}"


def duration_text(seconds: float) -> str:
    """``seconds`` as a Go duration for Consul, to the millisecond."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


def _identifier(value: Any, origin: str, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if (
        not isinstance(value, str)
        or not value.strip()
        or "/" in value
        or any(c.isspace() for c in value.strip())
    ):
        raise SettingsError(
            f"{origin} must be a non-empty string without '/' or spaces, got {value!r}"
        )
    return value.strip()


def _address(value: Any, origin: str) -> str:
    host = value.strip() if isinstance(value, str) else value
    if not is_host(host):
        raise SettingsError(
            f"{origin} must be a host name or IP address (no port, no brackets), "
            f"got {value!r}"
        )
    return str(host)


def _path(value: Any, origin: str) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or any(c.isspace() for c in value)
    ):
        raise SettingsError(
            f"{origin} must be a path starting with '/', without spaces, got {value!r}"
        )
    return value


def _tags(value: Any, origin: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(isinstance(tag, str) and tag for tag in value)
    ):
        raise SettingsError(f"{origin} must be a list of non-empty strings")
    return tuple(value)


def _meta(value: Any, origin: str) -> Mapping[str, str]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise SettingsError(f"{origin} must be a dict of strings")
    for key, item in value.items():
        if not isinstance(key, str) or not _META_KEY.match(key):
            raise SettingsError(
                f"{origin}: key {key!r} must be 1 to 128 letters, digits, "
                "'-' or '_' (Consul's rule)"
            )
        if key.startswith("consul-"):
            raise SettingsError(f"{origin}: key {key!r}: 'consul-' is reserved")
        if not isinstance(item, str) or len(item) > 512:
            raise SettingsError(
                f"{origin}[{key!r}] must be a string of at most 512 characters"
            )
    return types.MappingProxyType(dict(value))


def _duration(value: Any, origin: str, minimum: float, why: str) -> float:
    """Seconds from a number of seconds or a Go duration string (``"1m30s"``)."""
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION.findall(text)
        if not text or "".join(a + b for a, b in parts) != text:
            raise SettingsError(
                f"{origin} must be seconds or a duration like '10s', '1m' or "
                f"'500ms', got {value!r}"
            )
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{origin} must be a number of seconds, got {value!r}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds > 86400 * 7:
        raise SettingsError(f"{origin} must be at most a week, got {value!r}")
    if seconds < minimum:
        raise SettingsError(
            f"{origin} must be at least {minimum:g} s ({why}), got {value!r}"
        )
    return seconds


# --------------------------------------------------------------------------
# keeping the registration true


class Registrar:
    """Keeps one :class:`Registration` on the agent until it is withdrawn.

    It registers in a task of its own, so a slow or refusing agent never
    delays a request, and retries with capped backoff. The watcher hands it
    every answer about the node's checks (:meth:`checks_seen`); once the
    service's check was there and is gone, it registers again.

    States: ``new`` (not registered yet), ``pending`` (the agent took it,
    Consul's catalog has not shown it yet), ``seen``, ``lost`` and
    ``withdrawn`` (deregistered, for good).
    """

    def __init__(
        self, registration: Registration, retry_max: float, agent: str
    ) -> None:
        self.registration = registration
        self.retry_max = max(retry_max, registration.check_interval)
        self.agent = agent
        self.state = "new"
        self.registered_at: float | None = None
        """``time.monotonic()`` of the last registration the agent took."""
        self._client: ConsulClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wanted: asyncio.Event | None = None
        self._error: str | None = None
        self._lost_at: float | None = None
        self._in_flight = False
        self._timed_out = False  # a register call timed out: it may have arrived
        self._host: str | None = registration.address

    def start(self, client: ConsulClient) -> None:
        """Register in the background, through ``client``."""
        self._client = client
        self._wanted = asyncio.Event()  # made on the loop it serves
        self._wanted.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def checks_seen(self, checks: Sequence[Check]) -> None:
        """The node's checks as Consul last reported them; never blocks."""
        if self.state not in ("pending", "seen"):
            return
        present = any(c.get("CheckID") == self.registration.check_id for c in checks)
        if present:
            self.state = "seen"
        elif self.state == "seen":
            # A "pending" registration may not have reached the catalog yet;
            # only one that was there and left is lost.
            LOGGER.warning(
                "service %r is no longer registered on %s (agent restarted with "
                "empty state, or deregistered by hand): registering again",
                self.registration.id,
                self.agent,
            )
            self.state = "lost"
            self._lost_at = time.monotonic()
            if self._wanted is not None:
                self._wanted.set()

    async def withdraw(self) -> None:
        """Deregister, once and for good: the agent stops routing here at once."""
        if self.state == "withdrawn":
            return
        # A registration in flight, or one whose answer timed out, may have
        # reached the agent all the same: withdraw it too.
        registered = (
            self._in_flight
            or self._timed_out
            or self.state in ("pending", "seen", "lost")
        )
        self.state = "withdrawn"
        self.abandon()
        client = self._client
        if not registered or client is None:
            return
        service_id = self.registration.id
        try:
            await client.deregister_service(service_id)
        except ConsulError as error:
            LOGGER.warning(
                "cannot deregister service %r (%s); Consul removes it %s after "
                "its check fails",
                service_id,
                _explained(str(error), self.registration.name),
                duration_text(self.registration.deregister_critical_after),
            )
        else:
            LOGGER.info("deregistered service %r from %s", service_id, self.agent)

    def abandon(self) -> None:
        """Stop registering, without deregistering."""
        if self._task is not None:
            if not self._task.get_loop().is_closed():
                self._task.cancel()
            self._task = None

    def close(self) -> None:
        """Stop registering and close the connection; no deregistering."""
        self.abandon()
        if self._client is not None:
            self._client.close()

    async def _run(self) -> None:
        wanted = self._wanted
        assert wanted is not None
        failures = 0
        while True:
            await wanted.wait()
            wanted.clear()
            try:
                await self._register()
            except Exception as error:  # retried; a bug must not end the task
                if not isinstance(error, ConsulError):
                    LOGGER.exception("unexpected error registering with Consul")
                failures += 1
                self._failed(str(error) or type(error).__name__)
                wanted.set()
                ceiling = min(self.retry_max, 0.05 * 2 ** min(failures - 1, 32))
                await asyncio.sleep(random.uniform(ceiling / 2, ceiling))
            else:
                failures = 0

    async def _register(self) -> None:
        client = self._client
        assert client is not None
        registration = self.registration
        if self._host is None:
            try:
                self._host = await _source_address(
                    client.settings.host, client.settings.port
                )
            except OSError as error:
                raise ConsulError(
                    "cannot tell the address the agent reaches this process at "
                    f"({error.strerror or error}); set register's address"
                ) from None
        url = registration.check_url(self._host)
        self._in_flight = True
        try:
            await client.register_service(
                registration.name,
                registration.id,
                registration.port,
                address=registration.address,
                tags=list(registration.tags),
                meta=dict(registration.meta),
                check_url=url,
                interval=duration_text(registration.check_interval),
                timeout=None
                if registration.check_timeout is None
                else duration_text(registration.check_timeout),
                deregister_after=duration_text(registration.deregister_critical_after),
                enable_tag_override=registration.enable_tag_override,
            )
        except ConsulTimeout:
            self._timed_out = True
            raise
        finally:
            self._in_flight = False
        if self.state == "withdrawn":  # withdrawn while the agent answered
            return
        again = self.state == "lost" or self.registered_at is not None
        self.state = "pending"
        self.registered_at = now = time.monotonic()
        self._error = None
        if again:
            lost = self._lost_at
            LOGGER.info(
                "registered service %r on %s again%s",
                registration.id,
                self.agent,
                "" if lost is None else f", {now - lost:.1f} s after it was lost",
            )
        else:
            LOGGER.info(
                "registered service %r as %r on %s, checked at GET %s every %s",
                registration.name,
                registration.id,
                self.agent,
                url,
                duration_text(registration.check_interval),
            )

    def _failed(self, error: str) -> None:
        if error == self._error:
            return
        self._error = error
        LOGGER.warning(
            "cannot register service %r on %s (%s); retrying",
            self.registration.id,
            self.agent,
            _explained(error, self.registration.name),
        )


def _explained(error: str, name: str) -> str:
    """``error``, with the ACL rule a 403 means when it is one."""
    if " answered 403 " not in error:
        return error
    return (
        f"{error}; the token needs service:write on {name!r}: "
        f'service "{name}" {{ policy = "write" }}'
    )


async def _source_address(host: str, port: int) -> str:
    """The address this process reaches the agent from: where the agent, and
    so its HTTP check, reaches this process when no ``address`` is set."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(address)  # UDP: picks the route, sends nothing
        source: str = probe.getsockname()[0]
    return source


__all__ = ["Registrar", "Registration", "default_id"]
