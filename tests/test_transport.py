"""The transport: requests, timeouts and answers, against a real agent."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from sprockets_status_consul.settings import Settings
from sprockets_status_consul.transport import ConsulClient, ConsulError

from .consul_agent import AgentBase, free_port


def client_for(agent: AgentBase, **settings: Any) -> ConsulClient:
    return ConsulClient(
        Settings.from_mapping(
            {"address": agent.http_addr, "token": agent.token, **settings}, environ={}
        )
    )


def test_request_timeout_follows_wait() -> None:
    """A blocking query may outlive Tornado's 20 s default request timeout."""
    client = ConsulClient(Settings(timeout=2.0))
    seen: list[Any] = []

    async def fake_request(callback: Any, request: Any) -> None:
        seen.append(request)

    client.http._request = fake_request
    asyncio.run(
        client.http.get(
            None, "/v1/health/node/n", params=[("index", "5"), ("wait", "60000ms")]
        )
    )
    asyncio.run(client.http.get(None, "/v1/agent/self"))
    blocking, plain = seen
    assert blocking.timeout == pytest.approx(2.0 + 60 * 17 / 16)
    assert blocking.connect_timeout == plain.connect_timeout == 2.0
    assert plain.timeout == 2.0
    # The watcher's reads need no leader: any server may answer them.
    assert "stale=1" in blocking.target
    assert "stale" not in plain.target


def test_node_name_and_checks(consul_agent: AgentBase) -> None:
    async def main() -> None:
        client = client_for(consul_agent)
        try:
            node = await client.node_name()
            assert node == consul_agent.node_name
            index, checks = await client.node_checks(node)
            assert index > 0
            assert "serfHealth" in {c["CheckID"] for c in checks}
        finally:
            client.close()

    asyncio.run(main())


def test_blocking_query_returns_on_change(consul_agent: AgentBase) -> None:
    async def main() -> None:
        client = client_for(consul_agent)
        try:
            index, _ = await client.node_checks(consul_agent.node_name)
            timer = threading.Timer(
                0.3, consul_agent.consul, ("maint", "-enable", "-reason", "blocked")
            )
            started = time.monotonic()
            timer.start()
            new_index, checks = await client.node_checks(
                consul_agent.node_name, index, wait=20.0
            )
            elapsed = time.monotonic() - started
            timer.join()
            assert 0.25 < elapsed < 5
            assert new_index > index
            notes = {c["CheckID"]: c.get("Notes") for c in checks}
            assert notes["_node_maintenance"] == "blocked"
        finally:
            client.close()

    asyncio.run(main())


def test_blocking_query_waits_for_wait(consul_agent: AgentBase) -> None:
    async def main() -> None:
        client = client_for(consul_agent)
        try:
            index, _ = await client.node_checks(consul_agent.node_name)
            started = time.monotonic()
            same, _ = await client.node_checks(consul_agent.node_name, index, wait=0.5)
            elapsed = time.monotonic() - started
            assert same == index
            # Consul adds up to wait/16 of jitter.
            assert 0.45 < elapsed < 0.5 * 17 / 16 + 0.5
        finally:
            client.close()

    asyncio.run(main())


def test_connection_refused_is_a_clear_error() -> None:
    port = free_port()

    async def main() -> None:
        client = ConsulClient(Settings(port=port, token="s3cr3t"))
        try:
            with pytest.raises(ConsulError) as error:
                await client.node_name()
            text = str(error.value)
            assert f"cannot reach http://127.0.0.1:{port}" in text
            assert "s3cr3t" not in text
        finally:
            client.close()

    asyncio.run(main())


def test_close_ends_a_waiting_blocking_query(consul_agent: AgentBase) -> None:
    async def main() -> None:
        client = client_for(consul_agent)
        index, _ = await client.node_checks(consul_agent.node_name)
        query = asyncio.ensure_future(
            client.node_checks(consul_agent.node_name, index, wait=30.0)
        )
        deadline = time.monotonic() + 5
        while not client.http.client._connections:
            assert time.monotonic() < deadline, "the query never started"
            await asyncio.sleep(0.005)
        query.cancel()
        client.close()
        assert not client.http.client._connections
        with pytest.raises(asyncio.CancelledError):
            await query

    asyncio.run(main())


def test_failed_connects_leave_no_connection_behind() -> None:
    """A refused connection never had a stream: it must not be kept either."""
    port = free_port()

    async def main() -> None:
        client = ConsulClient(Settings(port=port))
        try:
            for _ in range(20):
                with pytest.raises(ConsulError):
                    await client.node_name()
            assert not client.http.client._connections
        finally:
            client.close()

    asyncio.run(main())


def test_the_token_does_not_follow_redirects() -> None:
    """A redirect is an answer like any other: nothing is sent where it points."""

    async def main() -> None:
        elsewhere: list[bytes] = []

        async def record(reader: asyncio.StreamReader, writer: Any) -> None:
            elsewhere.append(await reader.read(1000))
            writer.close()

        async def redirect(reader: asyncio.StreamReader, writer: Any) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 307 Temporary Redirect\r\nContent-Length: 0\r\n"
                + f"Location: http://127.0.0.1:{other_port}/v1/agent/self".encode()
                + b"\r\n\r\n"
            )
            await writer.drain()
            writer.close()

        other = await asyncio.start_server(record, "127.0.0.1", 0)
        other_port = other.sockets[0].getsockname()[1]
        agent = await asyncio.start_server(redirect, "127.0.0.1", 0)
        port = agent.sockets[0].getsockname()[1]
        client = ConsulClient(Settings(port=port, token="s3cr3t"))
        try:
            with pytest.raises(ConsulError) as raised:
                await client.node_name()
            await asyncio.sleep(0.05)  # a redirect followed would have arrived
        finally:
            client.close()
            other.close()
            agent.close()
            await other.wait_closed()
            await agent.wait_closed()
        assert elsewhere == []
        assert "s3cr3t" not in str(raised.value)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("files", "setting"),
    [
        ({"ca_file": "missing-ca.pem"}, "ca_file"),
        ({"cert_file": "missing.pem", "key_file": "missing-key.pem"}, "cert_file"),
    ],
)
def test_a_missing_tls_file_is_named_not_taken_for_the_agent(
    tmp_path: Any, files: dict[str, str], setting: str
) -> None:
    paths = {key: str(tmp_path / name) for key, name in files.items()}
    settings = Settings(port=free_port(), scheme="https", **paths)  # type: ignore[arg-type]

    async def main() -> None:
        client = ConsulClient(settings)
        try:
            with pytest.raises(ConsulError) as error:
                await client.node_name()
            text = str(error.value)
            assert setting in text and paths[setting] in text, text
            assert "cannot reach" not in text
        finally:
            client.close()

    asyncio.run(main())
