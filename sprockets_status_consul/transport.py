"""Talking to the Consul agent: python-consul2's endpoints over Tornado's HTTP client.

python-consul2 builds the requests and reads the answers (its ``Agent``,
``Health`` and ``KV`` endpoints); the HTTP client under them is its Tornado
client with four changes the watcher needs:

* every request carries a timeout that follows the blocking query's ``wait``
  (python-consul2 leaves Tornado's 20 s default, which ends any longer wait
  with a spurious :class:`consul.base.Timeout`);
* the client owns its connections, so :meth:`ConsulClient.close` really closes
  a blocking query that is still waiting;
* every failure comes out as one :class:`ConsulError` whose message is fit for
  a log line: it names the agent and the problem, and never the token;
* python-consul2's ``consul/base.py`` is loaded on its own, without the
  ``consul`` package whose ``__init__`` imports ``requests`` (6.5 MiB of
  memory per process for a client never used here).

Settings are already resolved (see :mod:`.settings`), so the environment
variables python-consul2 reads on its own (and lets override its arguments)
play no part here.
"""

from __future__ import annotations

import contextvars
import importlib.util
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tornado import httpclient, iostream, netutil, simple_httpclient

from .settings import Settings


def _load_consul_base() -> Any:
    """python-consul2's ``consul.base``, without the ``consul`` package.

    ``import consul.base`` runs ``consul/__init__.py``, which imports the
    ``requests`` client (``consul.std``): 6.5 MiB of resident memory per
    process for a library this one never uses. ``consul/base.py`` itself
    needs only the standard library and ``six``, so it is loaded on its own,
    as a private module; python-consul2 stays the dependency that builds the
    requests.
    """
    name = "sprockets_status_consul._consul_base"
    module = sys.modules.get(name)
    if module is not None:
        return module
    package = importlib.util.find_spec("consul")
    if package is None or package.origin is None:
        raise ImportError("python-consul2 is not installed (no 'consul' package)")
    path = os.path.join(os.path.dirname(package.origin), "base.py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load python-consul2's {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


consul_base = _load_consul_base()

_CONSUL_IO: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sprockets_status_consul_io", default=False
)


class _QuietConsulIO(logging.Filter):
    """Drops what Tornado logs about this module's own connections.

    Tornado logs a failed TLS handshake or a malformed answer on every
    attempt; the watcher already reports each failure once per change of
    state. Records about any other connection of the process pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _CONSUL_IO.get()


logging.getLogger("tornado.general").addFilter(_QuietConsulIO())

Check = dict[str, str]
"""A health check as Consul reports it, reduced to its string fields."""


class ConsulError(Exception):
    """Consul could not be asked, or gave an answer that cannot be used.

    The message is safe to log and to show: it never contains the token.
    """


class ConsulTimeout(ConsulError):
    """Consul did not answer (or let us connect) within the timeout."""


def _seconds(duration: str) -> float:
    """Seconds in a ``wait`` parameter as this module writes it (``"1500ms"``)."""
    return int(duration[:-2]) / 1000.0


_STALE_READS = ("/v1/health/", "/v1/kv/")
"""Paths read with ``?stale``: the watcher's queries, which need no leader."""


class _LiteralResolver(netutil.Resolver):
    """Answers an IP address at once; asks the default resolver for a name.

    Tornado's default resolver runs ``getaddrinfo`` in a thread for every
    connection, even to ``127.0.0.1``, and the client opens a connection for
    every query: a thread hop on every change Consul reports.
    """

    def initialize(self) -> None:
        self._names = netutil.DefaultLoopResolver()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names: list[tuple[int, Any]] = await self._names.resolve(host, port, family)
            return names
        if address.version == 6:
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return [(socket.AF_INET, (host, port))]


class _TrackedConnection(simple_httpclient._HTTPConnection):
    """A connection its client knows of until it is done, whatever the outcome."""

    def __init__(self, client: _ClosingHTTPClient, *args: Any, **kwargs: Any) -> None:
        client._connections.add(self)
        super().__init__(client, *args, **kwargs)

    def _run_callback(self, response: httpclient.HTTPResponse) -> None:
        # Every outcome passes here, including errors raised before there is
        # a stream (refused, DNS, connect timeout, TLS).
        self.client._connections.discard(self)  # type: ignore[union-attr]
        super()._run_callback(response)

    def on_connection_close(self) -> None:
        self.client._connections.discard(self)  # type: ignore[union-attr]
        super().on_connection_close()


class _ClosingHTTPClient(simple_httpclient.SimpleAsyncHTTPClient):
    """A Tornado HTTP client whose :meth:`close` also ends requests in flight.

    Tornado's own client only stops taking new requests when closed, so a
    blocking query would hold its socket until Consul answers.
    """

    def initialize(self, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("resolver", _LiteralResolver())
        super().initialize(**kwargs)
        self._connections: set[_TrackedConnection] = set()

    def _connection_class(self) -> type:
        return _TrackedConnection

    def close(self) -> None:
        """Close, ending requests in flight without calling back their callers.

        The caller of a request still in flight has been cancelled (the
        watcher stops its loops first), so there is nobody to tell.
        """
        for connection in list(self._connections):
            connection.final_callback = None  # type: ignore[assignment]
            remove_timeout = getattr(connection, "_remove_timeout", None)
            if remove_timeout is not None:
                remove_timeout()
            stream = getattr(connection, "stream", None)
            if stream is not None:
                stream.close()
        self._connections.clear()
        super().close()


_ConsulHTTPClient: Any = consul_base.HTTPClient


class _HTTPClient(_ConsulHTTPClient):  # type: ignore[misc]
    """python-consul2's Tornado HTTP client with timeouts, TLS and clean errors."""

    def __init__(self, settings: Settings) -> None:
        consul_base.HTTPClient.__init__(
            self,
            host=settings.host,
            port=settings.port,
            scheme=settings.scheme,
            verify=settings.verify,
        )
        self.settings = settings
        self.client = _ClosingHTTPClient(force_instance=True)

    @staticmethod
    def response(response: httpclient.HTTPResponse) -> Any:
        """python-consul2's ``Response`` of a Tornado answer (as consul.tornado)."""
        body = response.body or b""
        return consul_base.Response(
            response.code, response.headers, body.decode("utf-8"), body
        )

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the watcher only reads from Consul")

    put = delete = post = _read_only

    def get(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Awaitable[Any]:
        params = list(params or ())
        if path.startswith(_STALE_READS):
            # Any server may answer, as consul-template reads by default: a
            # cluster electing a leader keeps answering, a few ms behind.
            params.append(("stale", "1"))
        wait = dict(params).get("wait")
        timeout = self.settings.timeout
        if wait is not None:
            # Consul adds up to wait/16 of jitter to a blocking query.
            timeout += _seconds(wait) * 17 / 16
        settings = self.settings
        request = httpclient.HTTPRequest(
            self.uri(path, params),
            method="GET",
            headers=headers,
            connect_timeout=settings.timeout,
            request_timeout=timeout,
            follow_redirects=False,  # Consul never redirects; keep the token here
            validate_cert=settings.verify,
            ca_certs=settings.ca_file,
            client_cert=settings.cert_file,
            client_key=settings.key_file,
            # Small answers: gzip costs both ends more than it saves.
            decompress_response=False,
        )
        return self._request(callback, request)

    async def _request(
        self,
        callback: Callable[[Any], Any],
        request: httpclient.HTTPRequest,
    ) -> Any:
        path = request.url.split("?", 1)[0][len(self.base_uri) :]
        # Marks the connection this request opens: its callbacks run in a
        # copy of this context (see _QuietConsulIO).
        marked = _CONSUL_IO.set(True)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except ssl.SSLError as error:
            raise ConsulError(
                f"TLS with {self.base_uri} failed: {error.reason or error}; "
                "check ca_file (CONSUL_CACERT) and the client certificate"
            ) from None
        except httpclient.HTTPClientError as error:
            # Tornado's 599: a timeout, or the connection closed mid-answer.
            if isinstance(error, simple_httpclient.HTTPTimeoutError):
                raise ConsulTimeout(
                    f"no answer from {self.base_uri}{path}: {error.message}"
                ) from None
            raise ConsulError(
                f"no answer from {self.base_uri}{path}: {error.message}"
            ) from None
        except (OSError, iostream.StreamClosedError) as error:
            reason = getattr(error, "strerror", None) or str(error) or "closed"
            raise ConsulError(f"cannot reach {self.base_uri}: {reason}") from None
        finally:
            _CONSUL_IO.reset(marked)
        try:
            return callback(self.response(response))
        except consul_base.ACLPermissionDenied as error:
            raise ConsulError(
                f"{self.base_uri}{path} answered 403 (ACL: permission denied, "
                f"check the token): {self._text(error)}"
            ) from None
        except consul_base.ConsulException as error:
            raise ConsulError(
                f"{self.base_uri}{path} answered {self._text(error)}"
            ) from None
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, KeyError) and error.args == ("X-Consul-Index",):
                raise ConsulError(
                    f"{self.base_uri}{path} answered {response.code} without "
                    "an X-Consul-Index header"
                ) from None
            raise ConsulError(
                f"{self.base_uri}{path} answered {response.code} with a body that "
                f"is not what Consul sends ({type(error).__name__})"
            ) from None

    def _text(self, error: Exception) -> str:
        """An exception's text, one line, short, and without the token."""
        text = str(error)
        if self.settings.token:
            text = text.replace(self.settings.token, "<token>")
        text = " ".join(text.split())[:200]
        return text or type(error).__name__


class ConsulClient:
    """The few Consul calls the watcher makes, with checked answers.

    :param settings: where the agent is and how to talk to it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = _HTTPClient(settings)
        # The attributes python-consul2's endpoint classes read from their
        # parent, set here instead of by ``consul.base.Consul.__init__``,
        # which would let the environment override ``settings``.
        self.token = settings.token
        self.dc = None
        self.consistency = "default"
        self._agent = consul_base.Consul.Agent(self)
        self._health = consul_base.Consul.Health(self)
        self._kv = consul_base.Consul.KV(self)

    async def node_name(self) -> str:
        """The node name of the agent this client talks to."""
        try:
            answer = await self._agent.self()
        except ConsulError as error:
            if " answered 403 " not in str(error):
                raise
            raise ConsulError(
                f"{error}; finding the agent's node needs agent:read, "
                "or set the node in the consul_status setting"
            ) from None
        try:
            name = answer["Config"]["NodeName"]
        except (KeyError, TypeError):
            name = None
        if not isinstance(name, str) or not name:
            raise ConsulError(
                f"{self.http.base_uri}/v1/agent/self has no Config.NodeName"
            )
        return name

    async def node_checks(
        self, node: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, list[Check]]:
        """The health checks of ``node``, and the index to block on next.

        With ``index`` and ``wait`` this is a blocking query: Consul answers
        when the checks change or after ``wait`` seconds.
        """
        path = f"{self.http.base_uri}/v1/health/node/{node}"
        raw_index, checks = await self._health.node(
            node,
            index=str(index) if index else None,
            wait=f"{max(1, round(wait * 1000))}ms" if wait else None,
        )
        if checks is None:
            raise ConsulError(f"{path} answered 404: node {node!r} not found")
        consul_index = _index(raw_index, path)
        if not isinstance(checks, list):
            raise ConsulError(
                f"{path} answered {type(checks).__name__}, not a list of checks"
            )
        result: list[Check] = []
        for check in checks:
            if not isinstance(check, dict) or not isinstance(check.get("CheckID"), str):
                raise ConsulError(f"{path} answered a check without a CheckID")
            result.append(
                {key: value for key, value in check.items() if isinstance(value, str)}
            )
        return consul_index, result

    async def kv_value(
        self, key: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, bytes | None]:
        """The value of ``key`` (``None`` when there is no such key), and the index.

        With ``index`` and ``wait`` this is a blocking query, as for
        :meth:`node_checks`; a missing key is followed the same way.
        """
        path = f"{self.http.base_uri}/v1/kv/{key}"
        raw_index, entry = await self._kv.get(
            key,
            index=str(index) if index else None,
            wait=f"{max(1, round(wait * 1000))}ms" if wait else None,
        )
        consul_index = _index(raw_index, path)
        if entry is None:
            return consul_index, None
        value = entry.get("Value") if isinstance(entry, dict) else False
        if value is not None and not isinstance(value, bytes):
            raise ConsulError(f"{path} answered an entry without a usable Value")
        return consul_index, value or b""

    def close(self) -> None:
        """Close every connection, ending a blocking query still waiting."""
        self.http.client.close()


def _index(raw: Any, path: str) -> int:
    """The ``X-Consul-Index`` of an answer, checked."""
    try:
        index = int(raw)
    except (TypeError, ValueError):
        raise ConsulError(
            f"{path} answered without a usable X-Consul-Index ({raw!r})"
        ) from None
    if index < 0:
        raise ConsulError(f"{path} answered a negative X-Consul-Index ({index})")
    return index


__all__ = ["Check", "ConsulClient", "ConsulError"]
