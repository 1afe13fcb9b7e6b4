"""The ``consul_status`` application setting, read once and checked at start-up.

Every key falls back to Consul's own environment variables, then to Consul's
defaults, so a service configured for the ``consul`` command line works as is::

    Application(routes, consul_status={"ttl": 5, "failure_mode": "closed"})

A bad value raises :class:`SettingsError` naming the key (or the environment
variable) it came from. The token is never part of a message or a ``repr``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
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
    """Resolved settings of the Consul watcher.

    ``host``, ``port`` and ``scheme`` come from ``address``
    (``CONSUL_HTTP_ADDR``); ``token`` from ``token``, ``token_file``,
    ``CONSUL_HTTP_TOKEN`` or ``CONSUL_HTTP_TOKEN_FILE``; ``node`` is ``None``
    until the watcher asks the agent for its node name.
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

    @property
    def address(self) -> str:
        """``scheme://host:port`` of the agent, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def wait(self) -> float:
        """How long one blocking query may wait for a change, in seconds.

        It equals the TTL: a hung agent is noticed within about one TTL, and
        an idle backend sends Consul one request per TTL.
        """
        return self.ttl

    @classmethod
    def from_mapping(
        cls,
        config: Mapping[str, Any] | None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Resolve settings from the ``consul_status`` dict and the environment.

        :raises SettingsError: on an unknown key or an unusable value.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise SettingsError(
                f"{SETTING} must be a dict, not {type(config).__name__}"
            )
        env = os.environ if environ is None else environ
        unknown = sorted(set(config) - _KEYS)
        if unknown:
            raise SettingsError(
                f"{SETTING}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(sorted(_KEYS))}"
            )
        reader = _Reader(config, env)

        scheme, host, port = _parse_address(
            *reader.string("address", "CONSUL_HTTP_ADDR", DEFAULT_ADDRESS)
        )
        ssl, ssl_origin = reader.flag("ssl", "CONSUL_HTTP_SSL", scheme == "https")
        if ssl and scheme == "http":
            scheme = "https"
        elif not ssl and scheme == "https" and ssl_origin.startswith(SETTING):
            # As Consul's api package: CONSUL_HTTP_SSL=false never downgrades
            # an https address; only the setting may contradict it, loudly.
            raise SettingsError(f"{ssl_origin} is false but the address is https")

        node, node_origin = reader.optional_string("node", None)
        if node is not None and not _NODE_NAME.match(node):
            raise SettingsError(
                f"{node_origin} must be a Consul node name "
                f"(letters, digits, '-', '_' and '.'), got {node!r}"
            )
        service, service_origin = reader.optional_string("service", None)
        if service is not None and "/" in service:
            raise SettingsError(
                f"{service_origin} must be a service ID, got {service!r}"
            )
        kv_key, kv_origin = reader.optional_string("key", None)
        if kv_key is not None and (kv_key.startswith("/") or kv_key.endswith("/")):
            raise SettingsError(
                f"{kv_origin} must be a Consul KV key without a leading or "
                f"trailing '/', got {kv_key!r}"
            )
        register = None
        if config.get("register") is not None:
            # Imported here: registration needs the transport, which needs
            # this module.
            from .registration import Registration

            register = Registration.from_mapping(config["register"])
            service = service or register.id
        failure_mode, origin = reader.string("failure_mode", None, FAIL_OPEN)
        if failure_mode not in (FAIL_OPEN, FAIL_CLOSED):
            raise SettingsError(
                f"{origin} must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}, "
                f"got {failure_mode!r}"
            )
        ca_file, _ = reader.optional_string("ca_file", "CONSUL_CACERT")
        cert_file, cert_origin = reader.optional_string(
            "cert_file", "CONSUL_CLIENT_CERT"
        )
        key_file, key_origin = reader.optional_string("key_file", "CONSUL_CLIENT_KEY")
        if (cert_file is None) != (key_file is None):
            raise SettingsError(
                f"{cert_origin or key_origin} is set but not its pair: "
                "a client certificate needs both cert_file and key_file"
            )
        return cls(
            host=host,
            port=port,
            scheme=scheme,
            token=reader.token(),
            node=node,
            service=service,
            key=kv_key,
            ttl=reader.seconds("ttl", cls.ttl, maximum=600.0),  # Consul's longest wait
            blocking=reader.flag("blocking", None, cls.blocking)[0],
            timeout=reader.seconds("timeout", cls.timeout),
            startup_wait=reader.seconds("startup_wait", cls.startup_wait, zero=True),
            retry_max=reader.seconds("retry_max", cls.retry_max),
            failure_mode=failure_mode,
            verify=reader.flag("verify", "CONSUL_HTTP_SSL_VERIFY", cls.verify)[0],
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            register=register,
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
    """Reads one key from the setting, else from its environment variable."""

    def __init__(self, config: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.config = config
        self.env = env

    def _get(self, key: str | None, var: str | None) -> tuple[Any, str]:
        """The raw value and where it came from, ``(None, "")`` when unset."""
        if key is not None and self.config.get(key) is not None:
            return self.config[key], f"{SETTING}[{key!r}]"
        if var and self.env.get(var, "") != "":
            return self.env[var], var
        return None, ""

    def optional_string(
        self, key: str | None, var: str | None
    ) -> tuple[str | None, str]:
        value, origin = self._get(key, var)
        if value is None:
            return None, origin
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{origin} must be a non-empty string")
        return value.strip(), origin

    def string(self, key: str, var: str | None, default: str) -> tuple[str, str]:
        value, origin = self.optional_string(key, var)
        return (default, f"{SETTING}[{key!r}]") if value is None else (value, origin)

    def flag(self, key: str, var: str | None, default: bool) -> tuple[bool, str]:
        value, origin = self._get(key, var)
        if value is None:
            return default, ""
        if isinstance(value, bool):
            return value, origin
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE, origin
        raise SettingsError(f"{origin} must be true or false, got {value!r}")

    def seconds(
        self, key: str, default: float, zero: bool = False, maximum: float = 86400.0
    ) -> float:
        value, origin = self._get(key, None)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{origin} must be a number of seconds")
        if value > maximum:
            raise SettingsError(
                f"{origin} must be at most {maximum:g} s, got {value!r}"
            )
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise SettingsError(
                f"{origin} must be a {'non-negative' if zero else 'positive'} "
                f"number of seconds, got {value!r}"
            )
        return float(value)

    def token(self) -> str | None:
        """The ACL token: setting, setting's file, environment, environment's file."""
        if (
            self._get("token", None)[0] is not None
            and self._get("token_file", None)[0] is not None
        ):
            raise SettingsError(f"{SETTING}: set token or token_file, not both")
        # The file wins over the token, as in Consul's CLI and api package.
        for key, var in (
            ("token_file", None),
            ("token", None),
            (None, "CONSUL_HTTP_TOKEN_FILE"),
            (None, "CONSUL_HTTP_TOKEN"),
        ):
            value, origin = self.optional_string(key, var)
            if value is None:
                continue
            if not origin.endswith(("_file']", "_FILE")):
                return _checked_token(value, origin)
            try:
                with open(value, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as error:
                raise SettingsError(
                    f"{origin}: cannot read the token file {value!r}: {error.strerror}"
                ) from None
            if not token:
                raise SettingsError(f"{origin}: the token file {value!r} is empty")
            return _checked_token(token, f"{origin} ({value!r})")
        return None


def _checked_token(token: str, origin: str) -> str:
    """A token fit for an HTTP header; the message never shows it."""
    if not token.isascii() or not token.isprintable() or " " in token:
        raise SettingsError(
            f"{origin}: the token has spaces, line breaks or other characters "
            "no ACL token has"
        )
    return token


def _parse_address(value: str, origin: str) -> tuple[str, str, int]:
    """Split ``host:port`` or ``http(s)://host:port`` into its three parts."""
    text = value if "://" in value else f"http://{value}"
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as error:
        raise SettingsError(f"{origin}: {value!r} is not host:port ({error})") from None
    if url.scheme not in ("http", "https"):
        raise SettingsError(
            f"{origin}: scheme {url.scheme!r} is not supported, use http or https"
        )
    if not url.hostname or url.path not in ("", "/") or url.query or url.username:
        raise SettingsError(
            f"{origin}: {value!r} is not host:port or http(s)://host:port"
        )
    if port is None:
        port = 443 if url.scheme == "https" and "://" in value else 8500
    if not 0 < port < 65536:
        raise SettingsError(f"{origin}: port {port} is out of range")
    return url.scheme, url.hostname, port
