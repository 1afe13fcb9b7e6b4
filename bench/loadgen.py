"""A keep-alive HTTP/1.1 client, and the Python load generator built on it.

The load generator is the fallback when ``wrk`` is not installed (and the load
of the smoke run, whose rounds are shorter than wrk's one second)::

    python -m bench.loadgen --port 8001 --port 8002 --connections 16 \\
        --duration 5 --max-requests 1000000

Each connection sends ``GET /status``, reads the whole answer, and sends the
next (a closed loop, like wrk); connections are spread over the ports. It
stops after ``--duration`` seconds or ``--max-requests`` answers, whichever
comes first, and prints one JSON line: ``requests``, ``seconds``, ``codes``
(answers by status code), ``errors`` and ``p99_ms``, the 99th percentile of
the latency of one answer in :data:`SAMPLE_EVERY` (timing them all would
cost the load generator's single core more than the sample is worth; null
when no answer was sampled).

:class:`KeepAliveClient` is also what the propagation test polls backends with.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

SAMPLE_EVERY = 10
"""Of the answers, the one in this many whose latency is measured."""


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


class KeepAliveClient(asyncio.Protocol):
    """One keep-alive connection, one request at a time.

    Parses what Tornado answers: a status line, headers with
    ``Content-Length``, and the body.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._error: Exception | None = None

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> KeepAliveClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, host, port)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        start = buffer.find(b"\r\ncontent-length:", 0, end)
        if start < 0:
            start = buffer.find(b"\r\nContent-Length:", 0, end)
        if start >= 0:
            stop = buffer.find(b"\r\n", start + 17)
            stop = end if stop < 0 or stop > end else stop
            length = int(buffer[start + 17 : stop])
        total = end + 4 + length
        if len(buffer) < total:
            return
        code = int(buffer[9:12])
        del buffer[:total]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(code)

    def connection_lost(self, exc: Exception | None) -> None:
        self._error = exc or ConnectionError("connection closed")
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error)
        self.transport = None

    async def get(self, request: bytes = REQUEST) -> int:
        """Send one request; return the status code of the answer."""
        if self.transport is None:
            raise self._error or ConnectionError("not connected")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def load(
    ports: Sequence[int],
    connections: int,
    duration: float,
    max_requests: int,
) -> dict[str, Any]:
    """Closed-loop load on ``ports``; what :func:`main` prints."""
    codes: collections.Counter[int] = collections.Counter()
    errors = 0
    sent = 0
    latencies: list[float] = []
    clients = [
        await KeepAliveClient.connect(ports[i % len(ports)]) for i in range(connections)
    ]
    started = time.monotonic()
    deadline = started + duration

    async def drive(client: KeepAliveClient) -> None:
        nonlocal errors, sent
        while sent < max_requests and time.monotonic() < deadline:
            sent += 1
            sampled = sent % SAMPLE_EVERY == 0
            begun = time.perf_counter() if sampled else 0.0
            try:
                code = await client.get()
            except (OSError, ConnectionError):
                errors += 1
                return
            if sampled:
                latencies.append(time.perf_counter() - begun)
            codes[code] += 1

    try:
        await asyncio.wait_for(
            asyncio.gather(*(drive(c) for c in clients)), duration + 5.0
        )
    finally:
        for client in clients:
            client.close()
    seconds = time.monotonic() - started
    return {
        "requests": sum(codes.values()),
        "seconds": seconds,
        "codes": {str(code): count for code, count in sorted(codes.items())},
        "errors": errors,
        "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Closed-loop keep-alive GET /status load, one JSON line out.",
    )
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    result = asyncio.run(
        load(args.port, args.connections, args.duration, args.max_requests)
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
