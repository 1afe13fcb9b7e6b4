"""A counting HTTP proxy in front of the Consul agent, one listener per backend.

::

    python -m bench.proxy --upstream 127.0.0.1:8500 --listeners 4

Opens the given number of loopback listeners, one for each backend process,
forwards every connection to the agent byte for byte, and counts per listener
the HTTP requests going through (and how many of them are blocking queries,
with ``index=``) and how many are *standing*: sent, and not yet answered by a
single byte, as a blocking query is while Consul holds it.

It prints ``{"ports": [...]}`` once listening, then reads commands on stdin,
one a line: ``counts`` prints one JSON line with the counters of every
listener, ``reset`` zeroes them (what is standing stays standing, and the
highest standing count restarts from it); end of input stops the proxy.
The clients here send no request bodies beyond ``Content-Length`` ones and do
not pipeline, which is all the request counting assumes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence

CHUNK = 65536


@dataclasses.dataclass
class Counter:
    """What went through one listener."""

    requests: int = 0
    blocking: int = 0
    connections: int = 0
    standing: int = 0
    max_standing: int = 0

    def reset(self) -> None:
        self.requests = self.blocking = self.connections = 0
        self.max_standing = self.standing


class _Exchange:
    """One client connection: at most one request waiting for its answer."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.waiting = False

    def request(self, head: bytes) -> int:
        """Count a request head; return the length of its body."""
        counter = self.counter
        counter.requests += 1
        line, _, headers = head.partition(b"\r\n")
        if b"index=" in line:
            counter.blocking += 1
        if not self.waiting:
            self.waiting = True
            counter.standing += 1
            counter.max_standing = max(counter.max_standing, counter.standing)
        for header in headers.split(b"\r\n"):
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value.strip() or b"0")
        return 0

    def answered(self) -> None:
        if self.waiting:
            self.waiting = False
            self.counter.standing -= 1


async def _requests(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: _Exchange
) -> None:
    buffer = b""
    body = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        buffer += data
        while buffer:
            if body:
                skip = min(body, len(buffer))
                buffer = buffer[skip:]
                body -= skip
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            body = exchange.request(buffer[:end])
            buffer = buffer[end + 4 :]
        await writer.drain()


async def _responses(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: _Exchange
) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        exchange.answered()
        writer.write(data)
        await writer.drain()


async def _relay(
    counter: Counter,
    upstream: tuple[str, int],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    exchange = _Exchange(counter)
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        writer.close()
        return
    counter.connections += 1
    # When either side is done the exchange is: a client that goes away does
    # not leave a blocking query standing in the counts until Consul answers.
    pumps = [
        asyncio.ensure_future(_requests(reader, up_writer, exchange)),
        asyncio.ensure_future(_responses(up_reader, writer, exchange)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        exchange.answered()
        for end in (writer, up_writer):
            end.close()


async def serve(upstream: tuple[str, int], listeners: int) -> None:
    counters = [Counter() for _ in range(listeners)]
    servers = []
    for counter in counters:

        async def relay(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            counter: Counter = counter,
        ) -> None:
            await _relay(counter, upstream, reader, writer)

        servers.append(await asyncio.start_server(relay, "127.0.0.1", 0))
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print(json.dumps({"ports": ports}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = await stdin.readline()
        if not line:
            break
        command = line.strip()
        if command == b"counts":
            print(json.dumps([dataclasses.asdict(c) for c in counters]), flush=True)
        elif command == b"reset":
            for counter in counters:
                counter.reset()
            print(json.dumps({"reset": True}), flush=True)
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy",
        description="A counting HTTP proxy in front of the Consul agent.",
    )
    parser.add_argument("--upstream", required=True, help="the agent, host:port")
    parser.add_argument("--listeners", type=int, default=1)
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve((host.strip("[]"), int(port)), args.listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main())
