"""Talking to the Consul agent: the ``consul`` package's endpoints, one connection.

The ``consul`` package (python-consul2, python-consul or py-consul: all three
install it) builds the requests and reads the answers with its ``Agent``,
``Health`` and ``KV`` endpoints; this module is the HTTP client under them,
built as the package's own adapters are, on Tornado's public HTTP/1.1 client
parts (:class:`tornado.tcpclient.TCPClient` and
:class:`tornado.http1connection.HTTP1Connection`):

* one HTTP/1.1 connection per :class:`ConsulClient`, kept alive across
  blocking queries and opened again only after an error or when the agent
  closes it, so a backend holds one socket per followed source and leaves no
  ``TIME_WAIT`` socket behind per query;
* requests on one client take turns on that connection;
* every request has a deadline that follows the blocking query's ``wait``;
  a request that misses it closes the connection;
* :meth:`ConsulClient.close` closes the connection at once, ending a
  blocking query that is still waiting;
* every failure comes out as one :class:`ConsulError` whose message is fit
  for a log line: it names the agent and the problem, and never the token.

Settings are already resolved (see :mod:`.settings`), so the environment
variables the ``consul`` package reads on its own (and lets override its
arguments) play no part here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import consul
import consul.base
from tornado import httpclient, httputil, iostream, locks, netutil, tcpclient
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters

from .settings import Settings

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

_RETRIED_METHODS = frozenset({"GET", "PUT", "DELETE"})
"""Idempotent methods: sent again once when a kept-alive connection turns out
to be closed before any answer came."""

_MAX_ANSWER = 16 << 20
"""The largest answer read, in bytes: far above anything the agent sends."""


def _endpoint(name: str) -> Any:
    """The ``consul`` package's endpoint class ``name`` (``"Agent"``, ...).

    python-consul2 and python-consul nest them in ``consul.base.Consul``;
    py-consul moved them to one module each, ``consul.api.<name>``.
    """
    nested = getattr(consul.base.Consul, name, None)
    if isinstance(nested, type):
        return nested
    module = importlib.import_module(f"consul.api.{name.lower()}")
    return getattr(module, name)


class _LiteralResolver(netutil.Resolver):
    """Answers an IP address at once; asks the default resolver for a name.

    Tornado's default resolver runs ``getaddrinfo`` in a thread for every
    connection, even to ``127.0.0.1``.
    """

    def initialize(self) -> None:
        self._names = netutil.Resolver()

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


class _Answer(httputil.HTTPMessageDelegate):
    """One answer as :class:`~tornado.http1connection.HTTP1Connection` reads it."""

    def __init__(self) -> None:
        self.start_line: httputil.ResponseStartLine | None = None
        self.headers: httputil.HTTPHeaders | None = None
        self.chunks: list[bytes] = []
        self.complete = False

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.start_line = start_line
        self.headers = headers

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.complete = True

    @property
    def code(self) -> int:
        return self.start_line.code if self.start_line is not None else 0

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def keeps_alive(self) -> bool:
        """Whether the agent lets the connection carry another request."""
        if self.start_line is None or self.headers is None:
            return False
        connection = self.headers.get("Connection", "").lower()
        if self.start_line.version == "HTTP/1.1":
            return connection != "close"
        return connection == "keep-alive"


class _Closed(Exception):
    """The connection closed before a complete answer; ``answered`` says
    whether any of it had arrived."""

    def __init__(self, reason: str, answered: bool) -> None:
        super().__init__(reason)
        self.answered = answered


class _Connection:
    """One HTTP/1.1 connection to the agent, kept alive between requests.

    Requests take turns (a lock); the connection opens on the first request,
    stays open while the agent keeps it alive, and closes after any error, a
    missed deadline or a cancelled request, whose state on the wire is then
    unknown. The next request opens a new one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._host_header = settings.address.split("://", 1)[1]
        self._tcp = tcpclient.TCPClient(resolver=_LiteralResolver())
        self._params = HTTP1ConnectionParameters(
            max_body_size=_MAX_ANSWER, decompress=False
        )
        self._stream: iostream.IOStream | None = None
        self._lock = locks.Lock()
        self._tls: ssl.SSLContext | None = None
        self._closes = 0  # calls of close(), which a retry must not undo

    @property
    def _connections(self) -> set[iostream.IOStream]:
        """The open connection, if any, as a set (empty or one)."""
        return {self._stream} if self._stream is not None else set()

    async def fetch(
        self, request: httpclient.HTTPRequest, target: str
    ) -> tuple[int, httputil.HTTPHeaders, bytes]:
        """Send ``request`` to ``target`` (path and query); the code,
        headers and body of the answer.

        :raises ssl.SSLError: TLS failed.
        :raises OSError: the agent cannot be reached.
        :raises TimeoutError: no answer before the request's deadline.
        :raises _Closed: the connection closed before a complete answer.
        :raises httputil.HTTPInputError: the answer is not HTTP.
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(request.request_timeout or 0)
            reused = self._stream is not None and not self._stream.closed()
            closes = self._closes
            try:
                return await self._exchange(request, target, deadline)
            except _Closed as closed:
                if not reused or closed.answered or closes != self._closes:
                    raise
                if request.method not in _RETRIED_METHODS:
                    raise
            # The agent had closed the kept-alive connection: once more, anew.
            return await self._exchange(request, target, deadline)

    async def _exchange(
        self, request: httpclient.HTTPRequest, target: str, deadline: float
    ) -> tuple[int, httputil.HTTPHeaders, bytes]:
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            stream.close()

        try:
            stream = await self._connect(request, deadline)
            timer = asyncio.get_running_loop().call_at(deadline, expire)
            try:
                answer = await self._send(stream, request, target)
            except _Closed:
                if not expired:
                    raise
                raise TimeoutError("Timeout during request") from None
            finally:
                timer.cancel()
        except BaseException:
            self._drop()  # an unknown state on the wire
            raise
        if stream.closed() or not answer.keeps_alive:
            self._drop()
        assert answer.headers is not None  # a complete answer has its headers
        return answer.code, answer.headers, answer.body

    async def _connect(
        self, request: httpclient.HTTPRequest, deadline: float
    ) -> iostream.IOStream:
        stream = self._stream
        if stream is not None and not stream.closed():
            return stream
        self._drop()
        settings = self.settings
        left = deadline - asyncio.get_running_loop().time()
        timeout = min(float(request.connect_timeout or 0), left)
        try:
            stream = await self._tcp.connect(
                settings.host,
                settings.port,
                ssl_options=self._tls_context() if settings.scheme == "https" else None,
                timeout=max(timeout, 0.001),
            )
        except iostream.StreamClosedError as error:
            raise error.real_error or OSError("closed") from None
        except TimeoutError:
            raise TimeoutError("Timeout while connecting") from None
        self._stream = stream
        return stream

    def _tls_context(self) -> ssl.SSLContext:
        """The TLS settings, made on first use (a bad file fails a request)."""
        if self._tls is None:
            settings = self.settings
            with _loading("ca_file, CONSUL_CACERT", settings.ca_file):
                context = ssl.create_default_context(cafile=settings.ca_file)
            if settings.cert_file is not None:
                pair = f"{settings.cert_file} / {settings.key_file}"
                with _loading("cert_file / key_file", pair):
                    context.load_cert_chain(settings.cert_file, settings.key_file)
            if not settings.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls

    async def _send(
        self, stream: iostream.IOStream, request: httpclient.HTTPRequest, target: str
    ) -> _Answer:
        connection = HTTP1Connection(stream, True, self._params)
        headers = request.headers  # this module's own request: add to it
        headers["Host"] = self._host_header
        body = request.body or b""
        if body or request.method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        answer = _Answer()
        try:
            connection.write_headers(
                httputil.RequestStartLine(request.method, target, "HTTP/1.1"),
                headers,
                body or None,
            )
            connection.finish()
            await connection.read_response(answer)
        except iostream.StreamClosedError as error:
            if error.real_error is not None and not isinstance(
                error.real_error, (ConnectionResetError, BrokenPipeError)
            ):
                raise error.real_error from None
            raise _Closed(
                "connection closed", answered=answer.start_line is not None
            ) from None
        if not answer.complete:
            raise _Closed("connection closed mid-answer", answered=True)
        return answer

    def close(self) -> None:
        """Close the connection now; a request waiting on it ends.

        A later request opens a new one.
        """
        self._closes += 1
        self._drop()

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with contextlib.suppress(RuntimeError):
            # RuntimeError: its event loop was closed with a query waiting;
            # the socket is closed, only telling the (gone) waiter failed.
            stream.close()


class _HTTPClient(consul.base.HTTPClient):  # type: ignore[misc]
    """The ``consul`` package's HTTP client interface over :class:`_Connection`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            host=settings.host,
            port=settings.port,
            scheme=settings.scheme,
            verify=settings.verify,
        )
        # The package writes an IPv6 address without its brackets.
        self.base_uri = settings.address
        self.settings = settings
        self.client = _Connection(settings)

    def get(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
        connections_timeout: float | None = None,
    ) -> Awaitable[Any]:
        params = list(params or ())
        if path.startswith(_STALE_READS) and ("stale", "1") not in params:
            # Any server may answer, as consul-template reads by default: a
            # cluster electing a leader keeps answering, a few ms behind.
            params.append(("stale", "1"))
        return self._call(
            "GET", callback, path, params, headers, None, raw, connections_timeout
        )

    def put(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None = None,
        data: str | bytes | None = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Awaitable[Any]:
        return self._call(
            "PUT", callback, path, params, headers, data, False, connections_timeout
        )

    def delete(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None = None,
        data: str | bytes | None = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Awaitable[Any]:
        return self._call(
            "DELETE", callback, path, params, headers, data, False, connections_timeout
        )

    def post(
        self,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None = None,
        data: str | bytes | None = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Awaitable[Any]:
        return self._call(
            "POST", callback, path, params, headers, data, False, connections_timeout
        )

    def close(self) -> None:
        """Close the connection, ending a request still waiting on it."""
        self.client.close()

    def _call(
        self,
        method: str,
        callback: Callable[[Any], Any],
        path: str,
        params: Iterable[tuple[str, Any]] | None,
        headers: dict[str, str] | None,
        data: str | bytes | None,
        raw: bool,
        timeout: float | None,
    ) -> Awaitable[Any]:
        """Build the request of one endpoint call; its answer, through ``callback``."""
        fields = httputil.HTTPHeaders(headers or {})
        kept: list[tuple[str, Any]] = []
        for name, value in params or ():
            if name == "token":
                # python-consul sends the token in the URL: move it to the
                # header, out of every log of a URL.
                fields.setdefault("X-Consul-Token", value)
            else:
                kept.append((name, value))
        settings = self.settings
        if timeout is None:
            timeout = settings.timeout
            wait = dict(kept).get("wait")
            if wait is not None:
                # Consul adds up to wait/16 of jitter to a blocking query.
                timeout += _seconds(wait) * 17 / 16
        request = httpclient.HTTPRequest(
            self.uri(path, kept),
            method=method,
            headers=fields,
            body=data if method != "GET" else None,
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
        if raw:
            return self._request(callback, request, raw=True)
        return self._request(callback, request)

    async def _request(
        self,
        callback: Callable[[Any], Any],
        request: httpclient.HTTPRequest,
        raw: bool = False,
    ) -> Any:
        target = request.url[len(self.base_uri) :]
        path = target.split("?", 1)[0]
        # Marks what Tornado does for this request: its callbacks run in a
        # copy of this context (see _QuietConsulIO).
        marked = _CONSUL_IO.set(True)
        try:
            code, headers, body = await self.client.fetch(request, target)
        except ssl.SSLError as error:
            raise ConsulError(
                f"TLS with {self.base_uri} failed: {error.reason or error}; "
                "check ca_file (CONSUL_CACERT) and the client certificate"
            ) from None
        except TimeoutError as error:
            raise ConsulTimeout(
                f"no answer from {self.base_uri}{path}: {error or 'Timeout'}"
            ) from None
        except (_Closed, httputil.HTTPInputError) as error:
            raise ConsulError(
                f"no answer from {self.base_uri}{path}: {error}"
            ) from None
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise ConsulError(f"cannot reach {self.base_uri}: {reason}") from None
        finally:
            with contextlib.suppress(ValueError):
                # ValueError: a collected task's coroutine is closed in
                # whatever context the collector runs in; nothing to undo.
                _CONSUL_IO.reset(marked)
        try:
            return callback(self._response(code, headers, body, raw))
        except consul.ACLPermissionDenied as error:
            raise ConsulError(
                f"{self.base_uri}{path} answered 403 (ACL: permission denied, "
                f"check the token): {self._text(error)}"
            ) from None
        except (consul.ConsulException, KeyError) as error:
            if "X-Consul-Index" not in headers and path.startswith(_STALE_READS):
                raise ConsulError(
                    f"{self.base_uri}{path} answered {code} without "
                    "an X-Consul-Index header"
                ) from None
            if isinstance(error, KeyError) or isinstance(
                error.__cause__, (ValueError, TypeError, KeyError)
            ):
                raise self._unusable(path, code, error) from None
            raise ConsulError(
                f"{self.base_uri}{path} answered {self._text(error)}"
            ) from None
        except (AttributeError, IndexError, TypeError, ValueError) as error:
            raise self._unusable(path, code, error) from None

    @staticmethod
    def _response(
        code: int, headers: httputil.HTTPHeaders, body: bytes, raw: bool
    ) -> Any:
        """The ``consul`` package's ``Response``: python-consul2's has a
        fourth field, the body's bytes."""
        fields = {
            "code": code,
            "headers": headers,
            "body": body if raw else body.decode("utf-8"),
            "content": body,
        }
        response_type = consul.base.Response
        return response_type(*(fields[name] for name in response_type._fields))

    def _unusable(self, path: str, code: int, error: Exception) -> ConsulError:
        return ConsulError(
            f"{self.base_uri}{path} answered {code} with a body that "
            f"is not what Consul sends ({type(error.__cause__ or error).__name__})"
        )

    def _text(self, error: Exception) -> str:
        """An exception's text, one line, short, and without the token."""
        text = str(error)
        if self.settings.token:
            text = text.replace(self.settings.token, "<token>")
        text = " ".join(text.split())[:200]
        return text or type(error).__name__


class ConsulClient:
    """The few Consul calls the watcher makes, with checked answers.

    ``agent``, ``health`` and ``kv`` are the ``consul`` package's endpoints
    over this client's connection: every call returns an awaitable, and every
    failure is a :class:`ConsulError`.

    :param settings: where the agent is and how to talk to it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = _HTTPClient(settings)
        # The attributes the endpoint classes read from their parent, set
        # here instead of by ``consul.base.Consul.__init__``, which would let
        # the environment override ``settings``.
        self.token = settings.token
        self.dc = None
        self.consistency = "default"
        self.scheme = settings.scheme
        self.agent = _endpoint("Agent")(self)
        self.health = _endpoint("Health")(self)
        self.kv = _endpoint("KV")(self)

    def prepare_headers(self, token: str | None = None) -> dict[str, str]:
        """The headers of a request: the ACL token (py-consul's endpoints ask)."""
        token = token or self.token
        return {"X-Consul-Token": token} if token else {}

    async def node_name(self) -> str:
        """The node name of the agent this client talks to."""
        try:
            answer = await self.agent.self()
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
        raw_index, checks = await self.health.node(
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
        raw_index, entry = await self.kv.get(
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

    # Registration (see .registration) ---------------------------------

    async def register_service(
        self,
        name: str,
        service_id: str,
        port: int,
        *,
        check_url: str,
        interval: str,
        deregister_after: str,
        timeout: str | None = None,
        address: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        enable_tag_override: bool = False,
    ) -> None:
        """Register a service on the agent, with an HTTP check of ``check_url``.

        Durations are Go duration strings (``"10s"``). Consul names the check
        ``service:<service_id>``.
        """
        done = await self.agent.service.register(
            name,
            service_id=service_id,
            address=address,
            port=port,
            tags=tags,
            meta=meta,
            check=consul.Check.http(
                check_url, interval, timeout=timeout, deregister=deregister_after
            ),
            enable_tag_override=enable_tag_override,
        )
        if done is not True:
            raise ConsulError(
                f"{self.http.base_uri}/v1/agent/service/register did not "
                "register the service"
            )

    async def deregister_service(self, service_id: str) -> None:
        """Remove a service (and its check) from the agent.

        A service the agent does not know is already gone: not an error.
        The ID goes as it is: python-consul2 quotes the path itself.
        """
        await self.agent.service.deregister(service_id)

    def close(self) -> None:
        """Close the connection now, ending a blocking query still waiting.

        A later call opens a new one.
        """
        self.http.close()


@contextlib.contextmanager
def _loading(setting: str, path: str | None) -> Iterator[None]:
    """A TLS file that cannot be loaded is a ConsulError naming the setting
    (or its environment variable), not a Consul agent that cannot be reached."""
    try:
        yield
    except (OSError, ssl.SSLError) as error:  # SSLError: not a usable PEM file
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None)
        raise ConsulError(
            f"cannot load the TLS file(s) of {setting} ({path}): {reason or error}"
        ) from None


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
