"""Talking to the Consul agent: the ``consul`` package's endpoints, one connection.

The ``consul`` package (python-consul2, python-consul or py-consul: all three
install it) builds the requests and reads the answers with its ``Agent``,
``Health`` and ``KV`` endpoints; this module is the HTTP client under them,
built as the package's own adapters are, on asyncio's transports and
protocols (a request is a few bytes written at once; :class:`_Reader` reads
the answer as it arrives, which costs a backend a fraction of what a general
HTTP client does per change, see ``python -m bench.change_cost``):

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
import datetime
import functools
import importlib
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NamedTuple

import consul
import consul.base
import tornado.util
from tornado import locks

from .settings import Settings

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

_READ_SIZE = 16 << 10
"""Bytes read from the socket at a time."""

_MAX_HEAD = 64 << 10
"""The longest status line and headers (or chunk size line, or trailers) read,
in bytes."""

_HEX = re.compile(rb"[0-9A-Fa-f]+")
"""A chunk size (``int(..., 16)`` also takes ``_``, ``0x`` and signs)."""


def _bytes(data: str | bytes | None) -> bytes:
    """A request body as the ``consul`` package gives it, as bytes."""
    if data is None:
        return b""
    return data.encode("utf-8") if isinstance(data, str) else data


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


class _Malformed(Exception):
    """The agent's answer is not HTTP/1.1 as this client reads it."""


class _Closed(Exception):
    """The connection closed before a complete answer; ``answered`` says
    whether any of it had arrived."""

    def __init__(self, reason: str, answered: bool) -> None:
        super().__init__(reason)
        self.answered = answered


class _Answer(NamedTuple):
    code: int
    headers: dict[str, str]  # names as Consul writes them: "X-Consul-Index"
    body: bytes
    keeps_alive: bool


def _digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits only (``str.isdigit`` also takes "²")."""
    return text.isascii() and text.isdigit()


@functools.lru_cache(maxsize=256)
def _header_name(name: str) -> str:
    """``x-consul-index`` as ``X-Consul-Index``: how Consul (Go) writes names."""
    return "-".join(word.capitalize() for word in name.split("-"))


class _Reader(asyncio.BufferedProtocol):
    """Reads the answers that arrive on one connection (RFC 9112, the parts an
    agent uses): a status line, headers, then a body of ``Content-Length``
    bytes, in chunks, or up to the end of the connection.

    Bytes arrive in a buffer of its own, allocated once (a plain
    :class:`asyncio.Protocol` gets a new 256 KiB ``bytes`` per read, which the
    system maps and unmaps each time).

    :meth:`expect` returns the future of the next answer. Whatever goes wrong
    (bytes that are not HTTP, an answer over the limit, a close before the
    end) fails that future; nothing is ever raised into the event loop.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._aborted = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[_Answer] | None = None
        self._head: tuple[int, dict[str, str], bool] | None = None
        self._length: int | None = None  # None: in chunks, or up to the end
        self._chunked = False
        self._chunks: list[bytes] = []
        self._received = 0
        self._landing = memoryview(bytearray(_READ_SIZE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def idle(self) -> bool:
        """Whether the connection may carry a new request."""
        return not self.closed and self._waiter is None and not self._buffer

    def expect(self) -> asyncio.Future[_Answer]:
        """The future of the next answer; failed at once when the connection
        is already closed (nothing would ever come to end the wait)."""
        assert self._waiter is None
        waiter: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._head, self._chunks, self._received = None, [], 0
        if self.closed:
            waiter.set_exception(_Closed("connection closed", answered=False))
        else:
            self._waiter = waiter
        return waiter

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._landing

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._landing[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._waiter is None:
            # Nothing was asked: the connection is spoilt, and the agent may
            # send on; close it rather than keep what comes.
            self.abort()
            return
        self._buffer += data
        try:
            answer = self._parse()
        except _Malformed as error:
            self._fail(error)
            self.abort()
            return
        if answer is not None:
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(answer)

    def eof_received(self) -> bool:
        return False  # close; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        head = self._head
        if (
            head is not None
            and self._length is None
            and not self._chunked
            and exc is None
            and not self._aborted
        ):
            # A body that ends with the connection: the agent's close is its
            # end (not ours, after a missed deadline or close(); nor a reset).
            code, headers, _ = head
            body = bytes(self._buffer)
            self._buffer.clear()
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(_Answer(code, headers, body, False))
            return
        answered = head is not None or bool(self._buffer)
        if exc is not None and not isinstance(
            exc, (ConnectionResetError, BrokenPipeError)
        ):
            self._fail(exc)
        else:
            reason = "connection closed mid-answer" if answered else "connection closed"
            self._fail(_Closed(reason, answered))

    def abort(self) -> None:
        """Close the connection now, without waiting for anything; an answer
        still awaited fails now (a transport already closed would not say)."""
        self.closed = self._aborted = True
        answered = self._head is not None or bool(self._buffer)
        self._fail(_Closed("connection closed", answered=answered))
        transport = self.transport
        if transport is None:
            return
        try:
            transport.abort()
        except RuntimeError:
            # Its event loop was closed with a query waiting: end the
            # connection for the agent now; the socket goes with the transport.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _fail(self, error: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            # RuntimeError: its loop is closed; the waiter is done all the same.
            with contextlib.suppress(RuntimeError):
                waiter.set_exception(error)

    def _parse(self) -> _Answer | None:
        """The answer, once all of it is in the buffer; ``None`` until then."""
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise _Malformed("headers too long")
                return None
            self._head = self._read_head(bytes(buffer[:end]).decode("latin-1"))
            del buffer[: end + 4]
        code, headers, keeps_alive = self._head
        if self._chunked:
            if not self._read_chunks():
                return None
            body = b"".join(self._chunks)
        elif self._length is not None:
            if len(buffer) < self._length:
                return None
            body = bytes(buffer[: self._length])
            del buffer[: self._length]
        else:
            if len(buffer) > _MAX_ANSWER:
                raise _Malformed("answer too large")
            return None  # up to the end of the connection
        # Bytes after a complete answer that nobody asked for: idle() is False.
        return _Answer(code, headers, body, keeps_alive)

    def _read_head(self, text: str) -> tuple[int, dict[str, str], bool]:
        status, *lines = text.split("\r\n")
        version, _, rest = status.partition(" ")
        code_text = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not (
            _digits(code_text) and rest[3:4] in ("", " ")
        ):
            raise _Malformed(f"not an HTTP status line: {status[:40]!r}")
        code = int(code_text)
        if not 200 <= code <= 599:
            raise _Malformed(f"unexpected status {code}")
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or line[0] in " \t":
                raise _Malformed(f"not a header line: {line[:40]!r}")
            name = _header_name(name)
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        connection = headers.get("Connection", "").lower()
        if version == "HTTP/1.1":
            keeps_alive = connection != "close"
        else:
            keeps_alive = connection == "keep-alive"
        self._chunked, self._length = False, None
        coding = headers.get("Transfer-Encoding")
        length = headers.get("Content-Length")
        if code in (204, 304):
            self._length = 0
        elif coding is not None:
            if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise _Malformed(f"unknown Transfer-Encoding {coding[:40]!r}")
            self._chunked = True
            if length is not None:
                keeps_alive = False  # RFC 9112, 6.3: where would the next start?
        elif length is not None:
            if not _digits(length):
                raise _Malformed(f"bad Content-Length {length[:40]!r}")
            self._length = int(length)
            if self._length > _MAX_ANSWER:
                raise _Malformed("answer too large")
        else:
            keeps_alive = False  # the body ends with the connection
        return code, headers, keeps_alive

    def _read_chunks(self) -> bool:
        """Move whole chunks from the buffer to the body; whether the last came."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise _Malformed("chunk size line too long")
                return False
            size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise _Malformed(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if self._received + size > _MAX_ANSWER:
                raise _Malformed("answer too large")
            if size == 0:
                # The last chunk, then trailers (none from Consul) and a CRLF.
                trailers = buffer.find(b"\r\n", end + 2)
                if trailers == end + 2:
                    del buffer[: end + 4]
                    return True
                last = buffer.find(b"\r\n\r\n", end + 2)
                if last < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise _Malformed("trailers too long")
                    return False
                del buffer[: last + 4]
                return True
            if len(buffer) < end + 2 + size + 2:
                return False
            if buffer[end + 2 + size : end + 4 + size] != b"\r\n":
                raise _Malformed("chunk not followed by CRLF")
            self._received += size
            self._chunks.append(bytes(buffer[end + 2 : end + 2 + size]))
            del buffer[: end + 4 + size]


class _Request(NamedTuple):
    """One request as the connection sends it."""

    method: str
    target: str  # path and query
    headers: dict[str, str]
    body: bytes
    timeout: float  # for the whole exchange
    connect_timeout: float


class _Connection:
    """One HTTP/1.1 connection to the agent, kept alive between requests.

    Requests take turns (a lock); the connection opens on the first request,
    stays open while the agent keeps it alive, and closes after any error, a
    missed deadline or a cancelled request, whose state on the wire is then
    unknown. The next request opens a new one. It is built on asyncio's
    transports and protocols: the request is a few bytes written at once,
    and the answer is read by :class:`_Reader` as it arrives.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._host_header = settings.address.split("://", 1)[1]
        self._reader: _Reader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = locks.Lock()
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._tls: ssl.SSLContext | None = None
        self._closes = 0  # calls of close(), which a retry must not undo
        self._connecting: set[asyncio.Future[None]] = set()  # close() ends them

    @property
    def _connections(self) -> set[_Reader]:
        """The open connection, if any, as a set (empty or one)."""
        reader = self._reader
        return {reader} if reader is not None and not reader.closed else set()

    async def fetch(self, request: _Request) -> _Answer:
        """Send ``request``; the agent's answer.

        :raises ssl.SSLError: TLS failed.
        :raises OSError: the agent cannot be reached.
        :raises TimeoutError: no answer before the request's deadline.
        :raises _Closed: the connection closed before a complete answer.
        :raises _Malformed: the answer is not HTTP.
        """
        loop = asyncio.get_running_loop()
        if self._lock_loop is not loop:
            # Turns are taken on one loop: a request left on a loop that
            # closed (its tasks never cancelled) would hold the turn forever.
            self._lock, self._lock_loop = locks.Lock(), loop
        deadline = loop.time() + request.timeout
        try:
            # The deadline counts the wait for a turn too.
            await self._lock.acquire(
                timeout=datetime.timedelta(seconds=request.timeout)
            )
        except (TimeoutError, asyncio.TimeoutError, tornado.util.TimeoutError):
            raise TimeoutError("Timeout waiting for the connection") from None
        try:
            reused = self._usable(loop)
            closes = self._closes
            try:
                return await self._exchange(request, deadline)
            except _Closed as closed:
                if not reused or closed.answered or closes != self._closes:
                    raise
                if request.method not in _RETRIED_METHODS:
                    raise
            # The agent had closed the kept-alive connection: once more, anew.
            return await self._exchange(request, deadline)
        finally:
            self._lock.release()

    def _usable(self, loop: asyncio.AbstractEventLoop) -> bool:
        return self._reader is not None and self._reader.idle() and self._loop is loop

    async def _exchange(self, request: _Request, deadline: float) -> _Answer:
        loop = asyncio.get_running_loop()
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            reader.abort()

        used: _Reader | None = None
        try:
            reader = used = await self._connect(loop, request, deadline)
            timer = loop.call_at(deadline, expire)
            try:
                answer = reader.expect()
                assert reader.transport is not None
                reader.transport.write(self._encode(request))
                result = await answer
            except _Closed:
                if not expired:
                    raise
                raise TimeoutError("Timeout during request") from None
            finally:
                timer.cancel()
        except BaseException:
            # An unknown state on the wire. Only this request's connection:
            # a request left on a closed loop ends when collected, and the
            # client may have a new connection by then.
            if used is not None:
                self._drop(used)
            raise
        if not result.keeps_alive or not reader.idle():
            self._drop(reader)
        return result

    def _encode(self, request: _Request) -> bytes:
        headers = dict(request.headers, Host=self._host_header)
        if request.body or request.method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(request.body))
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"a line break in the {name} header")
            lines.append(f"{name}: {value}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1") + request.body

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, request: _Request, deadline: float
    ) -> _Reader:
        if self._usable(loop):
            assert self._reader is not None
            return self._reader
        self._drop()
        settings = self.settings
        tls = self._tls_context() if settings.scheme == "https" else None
        timeout = min(request.connect_timeout, deadline - loop.time())
        connecting = asyncio.ensure_future(
            loop.create_connection(
                _Reader,
                settings.host,
                settings.port,
                ssl=tls,
                server_hostname=settings.host if tls is not None else None,
            )
        )
        closed: asyncio.Future[None] = loop.create_future()
        self._connecting.add(closed)
        try:
            await asyncio.wait(
                (connecting, closed),
                timeout=max(timeout, 0.001),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._connecting.discard(closed)
            connecting.cancel()  # when not done: cancelled, timed out or closed
        made = connecting.done() and not connecting.cancelled()
        if closed.done() or not made:
            if made and connecting.exception() is None:
                connecting.result()[0].abort()  # close() came first
            if closed.done():
                raise _Closed("connection closed", answered=False)
            raise TimeoutError("Timeout while connecting")
        _, reader = connecting.result()
        self._reader, self._loop = reader, loop
        return reader

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

    def close(self) -> None:
        """Close the connection now; a request waiting on it ends.

        A later request opens a new one.
        """
        self._closes += 1
        for closed in list(self._connecting):
            with contextlib.suppress(RuntimeError):  # its loop is closed
                if not closed.done():
                    closed.set_result(None)
        self._drop()

    def _drop(self, reader: _Reader | None = None) -> None:
        """Close the connection (``reader``'s, whether or not it is the
        client's current one)."""
        if reader is None or reader is self._reader:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.abort()


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
        fields = dict(headers or {})
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
        request = _Request(
            method,
            self.uri(path, kept)[len(self.base_uri) :],
            fields,
            _bytes(data) if method != "GET" else b"",
            timeout,
            settings.timeout,
        )
        if raw:
            return self._request(callback, request, raw=True)
        return self._request(callback, request)

    async def _request(
        self,
        callback: Callable[[Any], Any],
        request: _Request,
        raw: bool = False,
    ) -> Any:
        path = request.target.split("?", 1)[0]
        try:
            code, headers, body, _ = await self.client.fetch(request)
        except ssl.SSLError as error:
            raise ConsulError(
                f"TLS with {self.base_uri} failed: {error.reason or error}; "
                "check ca_file (CONSUL_CACERT) and the client certificate"
            ) from None
        except TimeoutError as error:
            raise ConsulTimeout(
                f"no answer from {self.base_uri}{path}: {error or 'Timeout'}"
            ) from None
        except (_Closed, _Malformed) as error:
            raise ConsulError(
                f"no answer from {self.base_uri}{path}: {error}"
            ) from None
        except OSError as error:
            raise ConsulError(
                f"cannot reach {self.base_uri}: {_reason(error)}"
            ) from None
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
    def _response(code: int, headers: dict[str, str], body: bytes, raw: bool) -> Any:
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


def _reason(error: OSError) -> str:
    """Why a connection failed, in the system's words ("Connection refused")."""
    if error.errno and not isinstance(error, socket.gaierror):
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__


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
