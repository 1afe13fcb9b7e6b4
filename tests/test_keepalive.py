"""The transport's one kept-alive connection: reused, reopened, closed.

Most tests talk to :class:`TinyAgent`, a loopback HTTP/1.1 server in a thread
that answers ``/v1/health/node/...`` the way Consul does and counts the
connections it accepts; the rest talk to real Consul dev agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sprockets_status_consul.settings import Settings
from sprockets_status_consul.transport import ConsulClient, ConsulError, ConsulTimeout

from .consul_agent import AgentBase, DevAgent, free_port

CHECKS = json.dumps(
    [{"CheckID": "serfHealth", "Status": "passing", "Node": "tiny"}]
).encode()


@dataclasses.dataclass
class Seen:
    """One request as :class:`TinyAgent` received it."""

    connection: int
    method: str
    target: str
    headers: dict[str, str]


class TinyAgent:
    """A loopback HTTP/1.1 server with Consul's health answers, for the tests.

    Each answer carries a new ``X-Consul-Index``. ``behave(seen)`` decides what
    to do with a request: ``"answer"``, ``"answer and close"`` (the answer says
    ``Connection: close``), ``"answer then drop"`` (keep-alive announced, then
    closed silently), or ``"hang"`` (read on until the client closes).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.accepted = 0
        self.closed_by_client = 0
        self.seen: list[Seen] = []
        self.behave: Callable[[Seen], str] = lambda seen: "answer"
        self._index = 10
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> TinyAgent:
        self._thread.start()
        assert self._ready.wait(10), "the tiny agent did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await asyncio.wait_for(self._stop.wait(), 120)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        number = self.accepted
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {}
                for header in lines:
                    if header:
                        name, _, value = header.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                seen = Seen(number, method, target, headers)
                self.seen.append(seen)
                action = self.behave(seen)
                if action == "hang":
                    await reader.read()  # until the client closes
                    self.closed_by_client += 1
                    return
                self._index += 1
                close = action == "answer and close"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"X-Consul-Index: {self._index}\r\n".encode()
                    + f"Content-Length: {len(CHECKS)}\r\n".encode()
                    + (b"Connection: close\r\n" if close else b"")
                    + b"\r\n"
                    + CHECKS
                )
                await writer.drain()
                if action != "answer":
                    return
        finally:
            writer.close()


@pytest.fixture
def tiny() -> Iterator[TinyAgent]:
    with TinyAgent() as agent:
        yield agent


def client_at(address: str, **settings: Any) -> ConsulClient:
    return ConsulClient(
        Settings.from_mapping({"address": address, **settings}, environ={})
    )


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def test_one_connection_carries_consecutive_blocking_queries(tiny: TinyAgent) -> None:
    async def main() -> None:
        client = client_at(tiny.address)
        try:
            index = 0
            for _ in range(20):
                index, checks = await client.node_checks("tiny", index, wait=5.0)
                assert checks[0]["CheckID"] == "serfHealth"
        finally:
            client.close()

    asyncio.run(main())
    assert len(tiny.seen) == 20
    assert tiny.accepted == 1, f"{tiny.accepted} connections for 20 queries"
    assert {seen.connection for seen in tiny.seen} == {1}


def test_a_connection_the_agent_closes_is_opened_again(tiny: TinyAgent) -> None:
    actions = iter(["answer and close", "answer then drop", "answer", "answer"])
    tiny.behave = lambda seen: next(actions)

    async def main() -> None:
        client = client_at(tiny.address)
        try:
            for _ in range(4):  # no error: a dropped idle connection is retried
                await client.node_checks("tiny", 5, wait=5.0)
        finally:
            client.close()

    asyncio.run(main())
    assert [seen.connection for seen in tiny.seen] == [1, 2, 3, 3]
    assert tiny.accepted == 3


def test_close_during_a_waiting_query_closes_the_socket_at_once(
    tiny: TinyAgent,
) -> None:
    tiny.behave = lambda seen: "hang" if "index" in seen.target else "answer"

    async def main() -> float:
        client = client_at(tiny.address)
        index, _ = await client.node_checks("tiny")
        query = asyncio.ensure_future(client.node_checks("tiny", index, wait=60.0))
        await eventually(lambda: len(tiny.seen) == 2, 5, "the blocking query sent")
        client.close()
        took = await eventually(
            lambda: tiny.closed_by_client == 1, 5, "the agent sees the close"
        )
        with pytest.raises(ConsulError, match="no answer from"):
            await query
        return took

    took = asyncio.run(main())
    assert took < 0.5, took


def test_a_missed_deadline_closes_the_connection(tiny: TinyAgent) -> None:
    hang = [True]
    tiny.behave = lambda seen: "hang" if hang.pop() else "answer"

    async def main() -> None:
        client = client_at(tiny.address, timeout=0.2)
        try:
            started = time.monotonic()
            with pytest.raises(ConsulError, match="Timeout") as error:
                await client.node_checks("tiny", 5, wait=0.1)
            # Deadline: wait * 17/16 + timeout.
            assert 0.3 <= time.monotonic() - started < 1.5
            assert f"no answer from {tiny.address}/v1/health/node/tiny" in str(
                error.value
            )
            await eventually(
                lambda: tiny.closed_by_client == 1, 5, "the timed-out socket closed"
            )
            hang.append(False)
            await client.node_checks("tiny", 5, wait=0.1)  # on a new connection
        finally:
            client.close()

    asyncio.run(main())
    assert tiny.accepted == 2


def test_requests_take_turns_on_the_one_connection(tiny: TinyAgent) -> None:
    async def main() -> None:
        client = client_at(tiny.address)
        try:
            answers = await asyncio.gather(
                *(client.node_checks("tiny") for _ in range(10))
            )
        finally:
            client.close()
        assert len({index for index, _ in answers}) == 10

    asyncio.run(main())
    assert tiny.accepted == 1


def time_wait_sockets(port: int) -> int:
    """Sockets in TIME_WAIT to or from ``port``, either end (/proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, remote, state = line.split()[1:4]
                ends = {int(end.rsplit(":", 1)[1], 16) for end in (local, remote)}
                if port in ends and state == "06":  # TIME_WAIT
                    count += 1
    return count


def test_queries_leave_no_time_wait_sockets_behind(consul_agent: AgentBase) -> None:
    port = int(consul_agent.http_addr.rsplit(":", 1)[1])
    before = time_wait_sockets(port)

    async def main() -> None:
        client = client_at(consul_agent.http_addr, token=consul_agent.token)
        try:
            index = 0
            for _ in range(30):
                index, _ = await client.node_checks(
                    consul_agent.node_name, index, wait=0.01
                )
        finally:
            client.close()

    asyncio.run(main())
    # One connection, closed once by the client at the end.
    assert time_wait_sockets(port) - before <= 1


@dataclasses.dataclass
class Recorded:
    code: int
    body: str


def record(response: Any) -> Recorded:
    return Recorded(response.code, response.body)


def test_put_post_and_delete_work(consul_agent: AgentBase) -> None:
    """The whole client interface, for the endpoints that write."""
    key = f"ssc-test/{time.monotonic_ns()}"

    async def main() -> None:
        client = client_at(consul_agent.http_addr, token=consul_agent.token)
        http = client.http
        try:
            put = await http.put(record, f"/v1/kv/{key}", data="v1")
            assert (put.code, put.body.strip()) == (200, "true")
            assert (await client.kv_value(key))[1] == b"v1"
            query = {"Name": key.replace("/", "-"), "Service": {"Service": "x"}}
            created = await http.post(record, "/v1/query", data=json.dumps(query))
            assert created.code == 200, created
            query_id = json.loads(created.body)["ID"]
            removed = await http.delete(record, f"/v1/query/{query_id}")
            assert removed.code == 200, removed
            deleted = await http.delete(record, f"/v1/kv/{key}")
            assert (deleted.code, deleted.body.strip()) == (200, "true")
            assert (await client.kv_value(key))[1] is None
            # An endpoint that registers with PUT, as the package offers it.
            service = key.replace("/", "-")
            await client.agent.service.register(service, service_id=service)
            assert service in await client.agent.services()
            await client.agent.service.deregister(service)
            assert service not in await client.agent.services()
        finally:
            client.close()

    asyncio.run(main())


# --------------------------------------------------------------------------
# IPv6


def test_an_ipv6_address_is_written_with_brackets() -> None:
    with TinyAgent("::1") as tiny:

        async def main() -> None:
            client = client_at(tiny.address)
            try:
                assert client.http.base_uri == tiny.address
                await client.node_checks("tiny")
            finally:
                client.close()

        asyncio.run(main())
    assert tiny.seen[0].headers["host"] == f"[::1]:{tiny.port}"


def test_an_unreachable_ipv6_agent_is_named_with_brackets() -> None:
    port = free_port("::1")

    async def main() -> None:
        client = client_at(f"[::1]:{port}")
        try:
            with pytest.raises(ConsulError) as error:
                await client.node_name()
        finally:
            client.close()
        assert str(error.value).startswith(f"cannot reach http://[::1]:{port}: ")

    asyncio.run(main())


def test_a_dev_agent_on_ipv6_loopback(make_dev_agent: Callable[..., DevAgent]) -> None:
    agent = make_dev_agent(host="::1")
    assert agent.http_addr.startswith("[::1]:")

    async def main() -> None:
        client = client_at(agent.http_addr)
        try:
            node = await client.node_name()
            assert node == agent.node_name
            _, checks = await client.node_checks(node)
            assert "serfHealth" in {check["CheckID"] for check in checks}
        finally:
            client.close()

    asyncio.run(main())


def test_a_body_up_to_the_end_that_misses_the_deadline_is_a_timeout() -> None:
    """An answer without Content-Length or chunks, sent slowly: the deadline
    ends it, and the part that came is not taken for the whole."""

    async def main() -> None:
        async def serve(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\n\r\n[")
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.05)
                    writer.write(b" ")
                    await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = client_at(f"http://127.0.0.1:{port}", timeout=0.3)
        try:
            with pytest.raises(ConsulError, match="Timeout"):
                await client.node_checks("tiny")
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_a_client_whose_loop_closed_mid_query_works_on_the_next_loop(
    tiny: TinyAgent,
) -> None:
    """A fixture closes its loop with a query waiting (its tasks are never
    cancelled); the client, closed, goes on on the next loop. The request
    left behind neither holds the client's turn nor, once collected, closes
    the new loop's connection."""
    tiny.behave = lambda seen: "hang" if "index=" in seen.target else "answer"
    client = client_at(tiny.address)
    loop = asyncio.new_event_loop()
    left = [loop.create_task(client.node_checks("tiny", 5, wait=30.0))]
    loop.run_until_complete(eventually(lambda: len(tiny.seen) == 1, 5, "query sent"))
    loop.close()
    client.close()

    async def main() -> None:
        query = asyncio.ensure_future(client.node_checks("tiny", 6, wait=30.0))
        try:
            await eventually(lambda: len(tiny.seen) == 2, 5, "the next query sent")
            reader = client.http.client._reader
            assert reader is not None and not reader.closed
            left.clear()
            gc.collect()  # the request left behind is closed, at once
            assert not reader.closed
            assert not query.done()
        finally:
            query.cancel()
            client.close()

    asyncio.run(main())


def test_close_ends_a_request_still_connecting() -> None:
    """close() while the TLS handshake waits: the request ends then, rather
    than at the connect timeout (or, connected, with its query sent)."""

    accepted: list[bool] = []

    async def main() -> float:
        async def stall(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            accepted.append(True)
            try:
                await reader.read()  # never answers the TLS ClientHello
            finally:
                writer.close()

        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = client_at(f"https://127.0.0.1:{port}", timeout=10, verify=False)
        try:
            query = asyncio.ensure_future(client.node_checks("tiny", 5, wait=30.0))
            await eventually(lambda: bool(accepted), 5, "the TLS handshake begun")
            client.close()
            started = time.monotonic()
            with pytest.raises(ConsulError, match="connection closed"):
                await asyncio.wait_for(query, 5)
            return time.monotonic() - started
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) < 0.5


def test_a_request_waiting_for_its_turn_keeps_its_deadline(tiny: TinyAgent) -> None:
    """A short call behind a blocking query on the same client does not wait
    for that query: its timeout counts from the call."""
    tiny.behave = lambda seen: "hang" if "index=" in seen.target else "answer"

    async def main() -> None:
        client = client_at(tiny.address, timeout=0.3)
        blocking = asyncio.ensure_future(client.node_checks("tiny", 5, wait=30.0))
        try:
            await eventually(lambda: len(tiny.seen) == 1, 5, "the query was sent")
            started = time.monotonic()
            with pytest.raises(ConsulTimeout, match="waiting for the connection"):
                await client.node_checks("tiny")
            assert time.monotonic() - started < 2.0
            assert not blocking.done()  # the query in turn goes on
        finally:
            blocking.cancel()
            client.close()

    asyncio.run(main())


def test_an_agent_that_closes_each_connection_at_once_never_hangs_a_request() -> None:
    """A dying or restarting agent accepts and closes at once: every request
    ends, within its deadline, with an error."""

    async def main() -> None:
        async def close_at_once(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.close()

        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = client_at(f"http://127.0.0.1:{port}", timeout=0.3)
        try:
            for _ in range(20):
                with pytest.raises(ConsulError):
                    await asyncio.wait_for(client.node_checks("tiny", 5, wait=0.1), 5)
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
