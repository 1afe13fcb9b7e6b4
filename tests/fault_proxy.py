"""A fault-injecting HTTP proxy in front of a real Consul agent, for the tests.

:class:`FaultProxy` listens on a loopback port and forwards each request to
an upstream agent (also on loopback), or answers it wrongly, as its current
:class:`Mode` says; a test switches the mode while the proxy runs::

    with FaultProxy(("127.0.0.1", agent.http_port)) as proxy:
        ...  # point the application at proxy.address
        proxy.set_mode(Mode.HANG)
        ...
        proxy.set_mode(Mode.PASS)

The mode is read when a request arrives, so a blocking query that is already
waiting upstream is answered as it was asked; the next request gets the fault.

It runs an asyncio loop in a daemon thread and is bounded: it stops by itself
after ``lifetime`` seconds, a hanging or trickling answer ends after
``hang_max`` seconds, an upstream answer is awaited at most ``upstream_timeout``
seconds and read up to ``max_body`` bytes, and :meth:`FaultProxy.stop` (also
on ``with`` exit) closes every connection. Only loopback addresses are
accepted, for listening and upstream alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import json
import threading
import time
from types import TracebackType

__all__ = ["FaultProxy", "Mode", "ProxiedRequest"]


class Mode(str, enum.Enum):
    """What the proxy does with the next request."""

    PASS = "pass"
    """Forward to the agent and relay its answer unchanged."""
    ERROR_500 = "500"
    """Answer 500 with a Consul-like error text, without asking the agent."""
    NOT_FOUND = "404"
    """Answer 404 (``404 page not found``), without asking the agent."""
    TRUNCATED = "truncated"
    """The agent's answer with only the first half of its body (well framed)."""
    NOT_JSON = "not_json"
    """The agent's status and headers with an HTML body."""
    WRONG_SHAPE = "wrong_shape"
    """The agent's headers with a JSON object where Consul sends a list."""
    NO_INDEX = "no_index"
    """The agent's answer without its ``X-Consul-Index`` header."""
    SLOW = "slow"
    """The agent's answer, trickled a few bytes at a time (very slow)."""
    CLOSE_MID = "close_mid"
    """The agent's headers and half its body, then the connection is closed."""
    HANG = "hang"
    """Read the request and never answer (until the client gives up)."""
    NOT_HTTP = "not_http"
    """Answer something that is not HTTP at all, then close."""
    ECHO_TOKEN = "echo_token"
    """Answer 403 with a body that quotes the request's ``X-Consul-Token``
    after ``echo_pad`` characters, as a careless gateway might."""


@dataclasses.dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy received: when, in which mode, what."""

    at: float  # time.monotonic()
    mode: Mode
    method: str
    path: str


_REASONS = {200: "OK", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}
_HOP_HEADERS = frozenset({"connection", "content-length", "transfer-encoding"})
# Not forwarded: the proxy reads the agent's answer, so it must be identity.
_DROPPED_REQUEST_HEADERS = frozenset({"connection", "accept-encoding"})


def _check_loopback(host: str, what: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{what} must be a loopback address, not {host!r}")


@dataclasses.dataclass
class _Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def head(self, content_length: int | None = None) -> bytes:
        length = len(self.body) if content_length is None else content_length
        lines = [f"HTTP/1.1 {self.status} {self.reason}"]
        lines += [
            f"{name}: {value}"
            for name, value in self.headers
            if name.lower() not in _HOP_HEADERS
        ]
        lines += [f"Content-Length: {length}", "Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def encode(self) -> bytes:
        return self.head() + self.body


def _synthetic(status: int, body: bytes, content_type: str) -> _Answer:
    return _Answer(status, _REASONS[status], [("Content-Type", content_type)], body)


def _parse_answer(raw: bytes) -> _Answer:
    """An HTTP/1.x answer read to the end of the connection."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("the upstream answer has no end of headers")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    encodings = [v.lower() for n, v in headers if n.lower() == "transfer-encoding"]
    if "chunked" in encodings:
        body = _dechunk(body)
    else:
        lengths = [int(v) for n, v in headers if n.lower() == "content-length"]
        if lengths:
            body = body[: lengths[0]]
    return _Answer(int(status), reason[0] if reason else "", headers, body)


def _without_blocking(target: str) -> str:
    """A request target without the ``index`` and ``wait`` of a blocking query."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [
        pair
        for pair in query.split("&")
        if pair.partition("=")[0] not in ("index", "wait")
    ]
    return f"{path}?{'&'.join(kept)}" if kept else path


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


class FaultProxy:
    """A loopback HTTP proxy in front of a Consul agent that injects faults.

    :param upstream: ``(host, port)`` of the agent, on loopback.
    :param host: the loopback address to listen on.
    :param port: the port to listen on; 0 picks a free one.
    :param mode: the mode to start in.
    :param lifetime: seconds after which the proxy stops by itself.
    :param hang_max: longest a hanging or trickling answer lasts, in seconds.
    :param trickle_interval: seconds between two pieces of a :data:`Mode.SLOW`
        answer; ``trickle_bytes`` bytes are sent each time.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Mode = Mode.PASS,
        lifetime: float = 300.0,
        hang_max: float = 30.0,
        trickle_interval: float = 0.2,
        trickle_bytes: int = 4,
        echo_pad: int = 0,
        upstream_timeout: float = 30.0,
        max_body: int = 8 << 20,
    ) -> None:
        _check_loopback(host, "the proxy's address")
        self.set_upstream(*upstream)
        self.host = host
        self._port = port
        self._mode = mode
        self.lifetime = lifetime
        self.hang_max = hang_max
        self.trickle_interval = trickle_interval
        self.trickle_bytes = trickle_bytes
        self.echo_pad = echo_pad
        self.upstream_timeout = upstream_timeout
        self.max_body = max_body
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- the test's side ---------------------------------------------------

    @property
    def port(self) -> int:
        if not self._started.is_set() or self._error is not None:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to give the application as its agent's address."""
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_mode(self, mode: Mode) -> None:
        """Answer the requests that arrive from now on as ``mode`` says."""
        self._mode = Mode(mode)

    def set_upstream(self, host: str, port: int) -> None:
        """Forward the requests that arrive from now on to another agent."""
        _check_loopback(host, "the upstream agent")
        self._upstream = (host, port)

    def requests(self, since: float = 0.0) -> list[ProxiedRequest]:
        """The requests received at or after ``since`` (``time.monotonic()``)."""
        with self._lock:
            return [r for r in self._requests if r.at >= since]

    def start(self, timeout: float = 10.0) -> FaultProxy:
        """Start listening; return once the port is open."""
        if self._thread is not None:
            raise RuntimeError("the proxy was already started")
        self._thread = threading.Thread(
            target=self._run, name=f"fault-proxy-{self._port}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise RuntimeError(f"the proxy did not start within {timeout} s")
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"the proxy did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and close every connection; safe to call twice."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the proxy did not stop within {timeout} s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the proxy's thread ------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by start()
            self._error = error
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def on_connection(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._serve(reader, writer)
            except (
                OSError,
                ValueError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                asyncio.TimeoutError,
            ):
                pass  # the client went away, or sent something unreadable
            except asyncio.CancelledError:
                # Cancelled by stop(). Ending normally spares asyncio's stream
                # callback (3.11) from logging the cancelled task as an error.
                pass
            finally:
                handlers.discard(task)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        server = await asyncio.start_server(
            on_connection, self.host, self._port, limit=1 << 20
        )
        self._port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.lifetime)
        finally:
            server.close()
            for task in list(handlers):
                task.cancel()
            if handlers:
                await asyncio.wait(list(handlers), timeout=5.0)
            await server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.hang_max)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        length = 0
        token = ""
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "x-consul-token":
                token = value.strip()
        body = await reader.readexactly(length) if length else b""
        mode = self._mode
        with self._lock:
            self._requests.append(
                ProxiedRequest(time.monotonic(), mode, method, target.split("?")[0])
            )

        if mode is Mode.HANG:
            # Until the client closes its end, the proxy stops, or hang_max.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), self.hang_max)
            return
        if mode is Mode.ERROR_500:
            text = b"rpc error making call: injected fault (500)"
            writer.write(_synthetic(500, text, "text/plain").encode())
            await writer.drain()
            return
        if mode is Mode.NOT_FOUND:
            text = b"404 page not found"
            writer.write(_synthetic(404, text, "text/plain").encode())
            await writer.drain()
            return
        if mode is Mode.ECHO_TOKEN:
            pad = "ACL check failed " + "." * max(0, self.echo_pad - 17)
            text = f"{pad[: self.echo_pad]}{token} is not allowed here".encode()
            writer.write(_synthetic(403, text, "text/plain").encode())
            await writer.drain()
            return
        if mode is Mode.NOT_HTTP:
            writer.write(b"-ERR unknown command 'GET'\r\n-ERR wrong protocol\r\n\r\n")
            await writer.drain()
            return

        if mode is not Mode.PASS:
            # A fault is made from an answer that comes at once, not after a
            # blocking query's wait.
            target = _without_blocking(target)
        answer = await self._forward(method, target, header_lines, body)
        if answer is None:
            return  # the agent cannot be reached: close, as it would be
        if mode is Mode.TRUNCATED:
            answer.body = answer.body[: len(answer.body) // 2]
        elif mode is Mode.NOT_JSON:
            answer.headers = [
                (n, v) for n, v in answer.headers if n.lower() != "content-type"
            ] + [("Content-Type", "text/html")]
            answer.body = b"<html><body><h1>Service Unavailable</h1></body></html>"
        elif mode is Mode.WRONG_SHAPE:
            try:
                original = json.loads(answer.body)
            except ValueError:
                original = None
            answer.body = json.dumps({"Checks": original}).encode()
        elif mode is Mode.NO_INDEX:
            answer.headers = [
                (n, v) for n, v in answer.headers if n.lower() != "x-consul-index"
            ]
        elif mode is Mode.CLOSE_MID:
            half = answer.body[: len(answer.body) // 2]
            writer.write(answer.head(len(answer.body)) + half)
            await writer.drain()
            return
        elif mode is Mode.SLOW:
            await self._trickle(writer, answer.encode())
            return
        writer.write(answer.encode())
        await writer.drain()

    async def _forward(
        self, method: str, target: str, header_lines: list[str], body: bytes
    ) -> _Answer | None:
        host, port = self._upstream
        headers = [
            line
            for line in header_lines
            if line
            and line.partition(":")[0].strip().lower() not in _DROPPED_REQUEST_HEADERS
        ]
        head = "\r\n".join(
            [f"{method} {target} HTTP/1.1", *headers, "Connection: close"]
        )
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.upstream_timeout
            )
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            writer.write(head.encode("latin-1") + b"\r\n\r\n" + body)
            await writer.drain()
            raw = await asyncio.wait_for(
                self._read_to_end(reader), self.upstream_timeout
            )
            return _parse_answer(raw)
        except (OSError, ValueError, asyncio.TimeoutError):
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_to_end(self, reader: asyncio.StreamReader) -> bytes:
        data = bytearray()
        while len(data) <= self.max_body:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def _trickle(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        deadline = time.monotonic() + self.hang_max
        for start in range(0, len(data), self.trickle_bytes):
            if time.monotonic() >= deadline:
                return
            writer.write(data[start : start + self.trickle_bytes])
            await writer.drain()
            await asyncio.sleep(self.trickle_interval)
