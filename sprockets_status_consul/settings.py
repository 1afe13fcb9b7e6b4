"""The ``consul_status`` application setting, read once and checked at start-up.

Every key falls back to Consul's own environment variables, then to Consul's
defaults, so a service configured for the ``consul`` command line works as is::

    Application(routes, consul_status={"ttl": 5, "failure_mode": "closed"})

A bad value raises :class:`SettingsError` naming the key (or the environment
variable) it came from. The token is never part of a message or a ``repr``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registration import Registration

SETTING = "consul_status"
"""The name of the Tornado application setting this module reads."""

FAIL_OPEN = "open"
"""While Consul cannot be reached, keep serving the last known status."""

FAIL_CLOSED = "closed"
"""Once the last answer is older than the TTL, report maintenance."""

DEFAULT_ADDRESS = "127.0.0.1:8500"

_NODE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class SettingsError(ValueError):
    """A ``consul_status`` key or a Consul environment variable is unusable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved settings of the Consul watcher, checked however they are made.

    ``host``, ``port`` and ``scheme`` come from ``address``
    (``CONSUL_HTTP_ADDR``); ``token`` from ``token``, ``token_file``,
    ``CONSUL_HTTP_TOKEN`` or ``CONSUL_HTTP_TOKEN_FILE``; ``node`` is ``None``
    until the watcher asks the agent for its node name.

    Built directly (``Settings(ttl=5, failure_mode="closed")``), it reads no
    environment variable; a bad value raises the :class:`SettingsError` that
    :meth:`from_mapping` raises, naming the field instead of the key. Either
    form can be the ``consul_status`` application setting.
    """

    host: str = "127.0.0.1"
    port: int = 8500
    scheme: str = "http"
    token: str | None = dataclasses.field(default=None, repr=False)
    node: str | None = None
    service: str | None = None
    key: str | None = None
    ttl: float = 10.0
    blocking: bool = True
    timeout: float = 2.0
    startup_wait: float = 0.5
    retry_max: float = 3.0
    failure_mode: str = FAIL_OPEN
    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    register: Registration | None = None

    def __post_init__(self) -> None:
        """Check every field: the one place the rules live."""
        from .registration import Registration  # it imports this module

        if self.register is not None and not isinstance(self.register, Registration):
            raise _FieldError(
                "register",
                "must be a Registration (a dict only in the consul_status "
                f"setting), not {type(self.register).__name__}",
            )
        if self.register is not None and self.service is None:
            # A registered instance follows its own service maintenance.
            object.__setattr__(self, "service", self.register.id)
        problem = next(_problems(self), None)
        if problem is not None:
            raise _FieldError(*problem)
        for name in _SECONDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def address(self) -> str:
        """``scheme://host:port`` of the agent, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def wait(self) -> float:
        """How long one blocking query may wait for a change, in seconds.

        It equals the TTL: a hung agent is noticed within about one TTL, and
        an idle backend sends Consul about one request per TTL.
        """
        return self.ttl

    @classmethod
    def from_mapping(
        cls,
        config: Mapping[str, Any] | None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Resolve settings from the ``consul_status`` dict and the environment.

        :raises SettingsError: on an unknown key or an unusable value, naming
            the key or the environment variable it came from.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise SettingsError(
                f"{SETTING} must be a dict or a Settings, not {type(config).__name__}"
            )
        env = os.environ if environ is None else environ
        unknown = sorted(set(config) - _KEYS)
        if unknown:
            raise SettingsError(
                f"{SETTING}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(sorted(_KEYS))}"
            )
        reader = _Reader(config, env)

        address, address_origin = reader.string(
            "address", "CONSUL_HTTP_ADDR", DEFAULT_ADDRESS
        )
        scheme, host, port = _parse_address(address, address_origin)
        for name in ("scheme", "host", "port"):
            reader.origins[name] = address_origin
        ssl, ssl_origin = reader.flag("ssl", "CONSUL_HTTP_SSL", scheme == "https")
        if ssl and scheme == "http":
            scheme = "https"
        elif not ssl and scheme == "https" and ssl_origin.startswith(SETTING):
            # As Consul's api package: CONSUL_HTTP_SSL=false never downgrades
            # an https address; only the setting may contradict it, loudly.
            raise SettingsError(f"{ssl_origin} is false but the address is https")
        values: dict[str, Any] = {
            "host": host,
            "port": port,
            "scheme": scheme,
            "token": reader.token(),
            "node": reader.optional_string("node", None),
            "service": reader.optional_string("service", None),
            "key": reader.optional_string("key", None),
            "blocking": reader.flag("blocking", None, cls.blocking)[0],
            "failure_mode": reader.string("failure_mode", None, FAIL_OPEN)[0],
            "verify": reader.flag("verify", "CONSUL_HTTP_SSL_VERIFY", cls.verify)[0],
            "ca_file": reader.optional_string("ca_file", "CONSUL_CACERT"),
            "cert_file": reader.optional_string("cert_file", "CONSUL_CLIENT_CERT"),
            "key_file": reader.optional_string("key_file", "CONSUL_CLIENT_KEY"),
        }
        for name in _SECONDS:
            value, _ = reader.get(name, None)
            if value is not None:
                values[name] = value
        if config.get("register") is not None:
            # Imported here: registration needs the transport, which needs
            # this module.
            from .registration import Registration

            values["register"] = Registration.from_mapping(config["register"])
        try:
            return cls(**values)
        except _FieldError as error:
            origin = reader.origins.get(error.field) or f"{SETTING}[{error.field!r}]"
            raise SettingsError(f"{origin} {error.problem}") from None


def resolve(value: Settings | Mapping[str, Any] | None) -> Settings:
    """The settings a ``consul_status`` value stands for.

    A :class:`Settings` is used as it is; a dict (or nothing) is resolved
    with :meth:`Settings.from_mapping`, against the environment.
    """
    if isinstance(value, Settings):
        return value
    return Settings.from_mapping(value)


class _FieldError(SettingsError):
    """A field of :class:`Settings` is unusable; ``from_mapping`` names its origin."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"Settings.{field} {problem}")
        self.field = field
        self.problem = problem


_SECONDS = {
    # field: (least allowed, whether the least is allowed, most allowed)
    "ttl": (0.0, False, 600.0),  # Consul's longest blocking wait
    "timeout": (0.0, False, 86400.0),
    "startup_wait": (0.0, True, 86400.0),
    "retry_max": (0.0, False, 86400.0),
}


def _problems(settings: Settings) -> Iterator[tuple[str, str]]:
    """What is wrong with ``settings``: (field, problem) pairs, in field order."""
    if settings.scheme not in ("http", "https"):
        yield "scheme", f"must be 'http' or 'https', got {settings.scheme!r}"
    if not is_host(settings.host):
        yield (
            "host",
            "must be a host name or an IP address (no port, no brackets), "
            f"got {settings.host!r}",
        )
    port = settings.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        yield "port", f"must name a port from 1 to 65535, got {port!r}"
    if settings.token is not None:
        problem = _token_problem(settings.token)
        if problem:
            yield "token", problem
    node = settings.node
    if node is not None and not (isinstance(node, str) and _NODE_NAME.match(node)):
        yield (
            "node",
            "must be a Consul node name (letters, digits, '-', '_' and '.'), "
            f"got {node!r}",
        )
    service = settings.service
    if service is not None and (
        not isinstance(service, str) or not service or "/" in service
    ):
        yield "service", f"must be a service ID, got {service!r}"
    key = settings.key
    if key is not None and (
        not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/")
    ):
        yield (
            "key",
            f"must be a Consul KV key without a leading or trailing '/', got {key!r}",
        )
    for name, (least, least_allowed, most) in _SECONDS.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            yield name, f"must be a number of seconds, got {value!r}"
        elif (
            not math.isfinite(value)
            or value < least
            or (value == least and not least_allowed)
        ):
            kind = "non-negative" if least_allowed else "positive"
            yield name, f"must be a {kind} number of seconds, got {value!r}"
        elif value > most:
            yield name, f"must be at most {most:g} s, got {value!r}"
    for name in ("blocking", "verify"):
        if not isinstance(getattr(settings, name), bool):
            yield name, f"must be true or false, got {getattr(settings, name)!r}"
    if settings.failure_mode not in (FAIL_OPEN, FAIL_CLOSED):
        yield (
            "failure_mode",
            f"must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}, got {settings.failure_mode!r}",
        )
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, str) or not value):
            yield name, "must be a non-empty string (a file name)"
    if (settings.cert_file is None) != (settings.key_file is None):
        yield (
            "cert_file" if settings.cert_file is not None else "key_file",
            "is set but not its pair: a client certificate needs both cert_file "
            "and key_file",
        )


_KEYS = frozenset(
    {
        "address",
        "ssl",
        "token",
        "token_file",
        "node",
        "service",
        "key",
        "ttl",
        "blocking",
        "timeout",
        "startup_wait",
        "retry_max",
        "failure_mode",
        "verify",
        "ca_file",
        "cert_file",
        "key_file",
        "register",
    }
)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Reader:
    """Reads one key from the setting, else from its environment variable.

    ``origins`` remembers where each value came from, for the messages of
    :class:`SettingsError`.
    """

    def __init__(self, config: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.config = config
        self.env = env
        self.origins: dict[str, str] = {}

    def get(self, key: str | None, var: str | None) -> tuple[Any, str]:
        """The raw value and where it came from, ``(None, "")`` when unset."""
        value: Any = None
        origin = ""
        if key is not None and self.config.get(key) is not None:
            value, origin = self.config[key], f"{SETTING}[{key!r}]"
        elif var and self.env.get(var, "") != "":
            value, origin = self.env[var], var
        if key is not None and origin:
            self.origins[key] = origin
        return value, origin

    def optional_string(self, key: str | None, var: str | None) -> str | None:
        value, origin = self.get(key, var)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{origin} must be a non-empty string")
        return value.strip()

    def string(self, key: str, var: str | None, default: str) -> tuple[str, str]:
        value = self.optional_string(key, var)
        if value is None:
            return default, f"{SETTING}[{key!r}]"
        return value, self.origins[key]

    def flag(self, key: str, var: str | None, default: bool) -> tuple[bool, str]:
        value, origin = self.get(key, var)
        if value is None:
            return default, ""
        if isinstance(value, bool):
            return value, origin
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE, origin
        raise SettingsError(f"{origin} must be true or false, got {value!r}")

    def token(self) -> str | None:
        """The ACL token: setting, setting's file, environment, environment's file."""
        if (
            self.get("token", None)[0] is not None
            and self.get("token_file", None)[0] is not None
        ):
            raise SettingsError(f"{SETTING}: set token or token_file, not both")
        # The file wins over the token, as in Consul's CLI and api package.
        for key, var in (
            ("token_file", None),
            ("token", None),
            (None, "CONSUL_HTTP_TOKEN_FILE"),
            (None, "CONSUL_HTTP_TOKEN"),
        ):
            value = self.optional_string(key, var)
            if value is None:
                continue
            origin = self.origins[key] if key else str(var)
            self.origins["token"] = origin
            if not origin.endswith(("_file']", "_FILE")):
                return value
            try:
                with open(value, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as error:
                raise SettingsError(
                    f"{origin}: cannot read the token file {value!r}: {error.strerror}"
                ) from None
            if not token:
                raise SettingsError(f"{origin}: the token file {value!r} is empty")
            self.origins["token"] = f"{origin} ({value!r})"
            return token
        return None


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def is_host(value: Any) -> bool:
    """Whether ``value`` is an IP address or a host name, nothing around it."""
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.removesuffix(".").split(".")
        return all(_HOST_LABEL.fullmatch(label) for label in labels)
    return True


def _token_problem(token: str) -> str | None:
    """What makes ``token`` unfit for an HTTP header; never the token itself."""
    if (
        not isinstance(token, str)
        or not token
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        return "holds spaces, line breaks or other characters no ACL token has"
    return None


def _parse_address(value: str, origin: str) -> tuple[str, str, int]:
    """Split ``host:port`` or ``http(s)://host:port`` into its three parts.

    Errors show the address without any ``user:password@``, so that a
    password never reaches a log line or a status body.
    """
    text = value if "://" in value else f"http://{value}"
    shown = re.sub(r"^([^/]*//)?[^/]*@", r"\1***@", value)
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as error:
        raise SettingsError(f"{origin}: {shown!r} is not host:port ({error})") from None
    if url.scheme not in ("http", "https"):
        raise SettingsError(
            f"{origin}: scheme {url.scheme!r} is not supported, use http or https"
        )
    if not url.hostname or url.path not in ("", "/") or url.query or url.username:
        raise SettingsError(
            f"{origin}: {shown!r} is not host:port or http(s)://host:port"
        )
    if port is None:
        port = 443 if url.scheme == "https" and "://" in value else 8500
    return url.scheme, url.hostname, port
