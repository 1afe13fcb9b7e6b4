"""How the transport reads an agent's answers off the wire, byte by byte."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sprockets_status_consul import transport
from sprockets_status_consul.transport import _Answer, _Closed, _Malformed, _Reader


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def read(*pieces: bytes, lost: bool = False, split: bool = False) -> Any:
    """What the reader makes of ``pieces`` (fed one byte at a time with
    ``split``), then of the connection's end with ``lost``: the answer, or the
    exception, and the reader."""

    async def main() -> Any:
        reader = _Reader()
        reader.connection_made(FakeTransport())
        answer = reader.expect()
        data = b"".join(pieces)
        chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
        for chunk in chunks:
            reader.data_received(chunk)
        if lost:
            reader.connection_lost(None)
        if not answer.done():
            return None, reader
        try:
            return answer.result(), reader
        except Exception as error:
            return error, reader

    return asyncio.run(main())


HEAD = b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("split", [False, True])
def test_a_body_of_content_length(split: bool) -> None:
    answer, reader = read(HEAD, b"Content-Length: 4\r\n\r\n[42]", split=split)
    assert answer == _Answer(
        200,
        {
            "X-Consul-Index": "7",
            "Content-Type": "application/json",
            "Content-Length": "4",
        },
        b"[42]",
        True,
    )
    assert reader.idle()


@pytest.mark.parametrize("split", [False, True])
def test_a_body_in_chunks_with_extensions_and_trailers(split: bool) -> None:
    answer, reader = read(
        HEAD,
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"2;ext=1\r\n[4\r\nA\r\n2abcdefghi\r\n1\r\n]\r\n0\r\nX-Trailer: 1\r\n\r\n",
        split=split,
    )
    assert answer.body == b"[42abcdefghi]"
    assert reader.idle()


def test_a_body_up_to_the_end_of_the_connection() -> None:
    answer, _ = read(b"HTTP/1.0 200 OK\r\n\r\n[1,", b"2]")
    assert answer is None  # not complete until the connection ends
    answer, _ = read(b"HTTP/1.0 200 OK\r\n\r\n[1,2]", lost=True)
    assert answer.body == b"[1,2]" and not answer.keeps_alive


@pytest.mark.parametrize(
    ("head", "keeps_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\n", True),
        (b"HTTP/1.0 200 OK\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n", True),
    ],
)
def test_whether_the_connection_is_kept(head: bytes, keeps_alive: bool) -> None:
    answer, _ = read(head, b"Content-Length: 0\r\n\r\n")
    assert answer.keeps_alive is keeps_alive


def test_names_are_written_as_consul_writes_them_and_repeats_joined() -> None:
    answer, _ = read(
        b"HTTP/1.1 404 Not Found\r\nx-consul-index: 3\r\nVary: a\r\nvary: b\r\n",
        b"content-length: 0\r\n\r\n",
    )
    assert answer.code == 404
    assert answer.headers == {
        "X-Consul-Index": "3",
        "Vary": "a, b",
        "Content-Length": "0",
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 OK\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "unexpected status 100"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "not a header line"),
        (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "not a header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n", "bad Content-Length"),
        # Digits to str.isdigit(), not to int(): "²" is b"\xb2" in Latin-1.
        (b"HTTP/1.1 \xb200 OK\r\n\r\n", "not an HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "CRLF"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000, "headers too long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "too large"),
    ],
)
def test_what_is_not_http_fails_the_answer_and_the_connection(
    data: bytes, message: str
) -> None:
    error, reader = read(data)
    assert isinstance(error, _Malformed), error
    assert message in str(error)
    assert reader.closed and reader.transport.aborted


def test_a_body_over_the_limit_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_MAX_ANSWER", 10)
    chunk = b"8\r\n12345678\r\n"
    error, _ = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk * 2)
    assert isinstance(error, _Malformed) and "too large" in str(error)


def test_a_chunk_over_the_limit_fails_at_its_size_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not once the agent has sent that much: the size says it already."""
    monkeypatch.setattr(transport, "_MAX_ANSWER", 10)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for size in (b"b\r\n", b"8\r\n12345678\r\n3\r\n", b"fffffffffffffffffff\r\n"):
        error, _ = read(chunked, size)
        assert isinstance(error, _Malformed) and "too large" in str(error), size


def test_trailers_over_the_limit() -> None:
    error, reader = read(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
        b"X-Trailer: " + b"y" * 70000,
    )
    assert isinstance(error, _Malformed) and "trailers too long" in str(error)
    assert reader.transport.aborted


@pytest.mark.parametrize(
    ("data", "answered"),
    [
        (b"", False),
        (b"HTT", True),
        (HEAD + b"Content-Length: 10\r\n\r\n[1", True),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n[1\r\n", True),
    ],
)
def test_a_connection_that_ends_early(data: bytes, answered: bool) -> None:
    error, reader = read(data, lost=True)
    assert isinstance(error, _Closed)
    assert error.answered is answered
    assert reader.closed


def test_bytes_nobody_asked_for_spoil_the_connection() -> None:
    answer, reader = read(HEAD, b"Content-Length: 2\r\n\r\n[]HTTP/1.1 200 OK\r\n")
    assert answer.body == b"[]"
    assert not reader.idle()


def test_bytes_while_nothing_is_asked_close_the_connection() -> None:
    """Rather than pile up until the next request: the agent may send on."""
    answer, reader = read(HEAD, b"Content-Length: 2\r\n\r\n[]")
    assert answer.body == b"[]" and reader.idle()
    reader.data_received(b"HTTP/1.1 200 OK\r\n")
    assert reader.transport.aborted and not reader.idle()


@pytest.mark.parametrize("end", ["abort", "reset"])
def test_a_body_up_to_the_end_is_cut_short_by_a_close_not_ended(end: str) -> None:
    """The client's own close (a missed deadline, close()) or a reset is not
    the agent's end of the body: the answer is incomplete."""

    async def main() -> Any:
        reader = _Reader()
        reader.connection_made(FakeTransport())
        answer = reader.expect()
        reader.data_received(b"HTTP/1.0 200 OK\r\n\r\n[1,")
        if end == "abort":
            reader.abort()
            reader.connection_lost(None)
        else:
            reader.connection_lost(ConnectionResetError())
        return answer.exception()

    error = asyncio.run(main())
    assert isinstance(error, _Closed) and error.answered


def test_content_length_beside_chunks_is_read_in_chunks_and_not_kept() -> None:
    """RFC 9112, 6.3: chunks win, and the connection closes after the answer
    (the two disagree on where the next answer starts)."""
    answer, _ = read(
        HEAD,
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"2\r\n[]\r\n0\r\n\r\n",
    )
    assert answer.body == b"[]"
    assert not answer.keeps_alive


def test_an_answer_asked_of_a_closed_connection_fails_at_once() -> None:
    """The agent closed the connection before the request went out (between
    the connect and the write, say): nothing will ever arrive on it."""

    async def main() -> None:
        reader = _Reader()
        reader.connection_made(FakeTransport())
        reader.connection_lost(None)
        answer = reader.expect()
        assert answer.done()
        error = answer.exception()
        assert isinstance(error, _Closed) and not error.answered

    asyncio.run(main())


def test_abort_fails_the_answer_awaited_even_when_the_transport_is_gone() -> None:
    """A transport whose connection is already lost does not call
    ``connection_lost`` again: abort() itself ends the wait (a missed
    deadline relies on it)."""

    async def main() -> None:
        reader = _Reader()
        reader.connection_made(FakeTransport())  # abort() reports nothing
        answer = reader.expect()
        reader.abort()
        assert answer.done()
        assert isinstance(answer.exception(), _Closed)

    asyncio.run(main())
