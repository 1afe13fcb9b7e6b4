"""ConsulStatusHandler against a real Consul agent.

The design card's promise: several backend processes behind one agent, and
``consul maint -enable -reason X`` makes every one of them answer 503 with
reason X within milliseconds; ``-disable`` brings them all back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from tornado import httpclient, web

import sprockets_status_consul as ssc
from sprockets_status_consul.watcher import _WATCHERS

from . import fault_support
from .consul_agent import AgentBase, free_port, wait_for


def get_status(port: int) -> tuple[int, dict[str, Any]]:
    """GET /status of a backend: the code and the JSON body."""
    url = f"http://127.0.0.1:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@contextlib.contextmanager
def backends(
    count: int, agent: AgentBase, settings: dict[str, Any] | None = None
) -> Iterator[list[int]]:
    """Start ``count`` backend processes following ``agent``; yield their ports.

    On exit each must stop cleanly on SIGTERM (see ``fault_support.backends``).
    """
    env = {"CONSUL_HTTP_TOKEN": agent.token} if agent.token else None
    with fault_support.backends(
        agent.http_addr, [settings or {}] * count, env=env
    ) as started:
        yield [backend.port for backend in started]


def all_answer(ports: list[int], code: int, reason: str | None = None) -> bool:
    for port in ports:
        status, body = get_status(port)
        if status != code or (reason is not None and body.get("reason") != reason):
            return False
    return True


def test_three_backends_follow_node_maintenance(
    consul_agent: AgentBase, record_property: Any
) -> None:
    with backends(3, consul_agent) as ports:
        wait_for(lambda: all_answer(ports, 200), 5, message="backends not up")
        for port in ports:
            assert get_status(port)[1]["consul"] == "connected"

        consul_agent.consul("maint", "-enable", "-reason", "deploy 42")
        started = time.monotonic()
        wait_for(
            lambda: all_answer(ports, 503, "deploy 42"),
            5,
            interval=0.002,
            message=lambda: f"not all in maintenance: {[get_status(p) for p in ports]}",
        )
        enable_seconds = time.monotonic() - started
        for port in ports:
            code, body = get_status(port)
            assert (code, body["status"], body["source"]) == (
                503,
                "maintenance",
                "node",
            )

        consul_agent.consul("maint", "-disable")
        started = time.monotonic()
        wait_for(lambda: all_answer(ports, 200), 5, interval=0.002)
        disable_seconds = time.monotonic() - started
        for port in ports:
            assert "reason" not in get_status(port)[1]

    record_property("propagation_enable_ms", round(enable_seconds * 1000, 1))
    record_property("propagation_disable_ms", round(disable_seconds * 1000, 1))
    print(
        f"\nconsul maint reached 3 backends in {enable_seconds * 1000:.1f} ms "
        f"(enable), {disable_seconds * 1000:.1f} ms (disable)"
    )


@contextlib.asynccontextmanager
async def serving(
    settings: dict[str, Any],
) -> AsyncIterator[tuple[web.Application, str]]:
    """An in-process application with ConsulStatusHandler; yields it and its URL."""
    app = web.Application(
        [(r"/status", ssc.ConsulStatusHandler)], consul_status=settings
    )
    port = free_port()
    server = app.listen(port, address="127.0.0.1")
    try:
        yield app, f"http://127.0.0.1:{port}/status"
    finally:
        server.stop()
        await ssc.stop(app)


async def fetch(url: str) -> tuple[int, dict[str, Any]]:
    client = httpclient.AsyncHTTPClient()
    response = await client.fetch(url, raise_error=False)
    return response.code, json.loads(response.body)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_in_process_handler_follows_the_agents_node(consul_agent: AgentBase) -> None:
    async def main() -> None:
        async with serving({"address": consul_agent.url}) as (app, url):
            assert (await fetch(url))[0] == 200
            assert _WATCHERS[app].node == consul_agent.node_name

            await asyncio.to_thread(
                consul_agent.consul, "maint", "-enable", "-reason", "from the test"
            )

            async def in_maintenance() -> bool:
                code, body = await fetch(url)
                return code == 503 and body.get("reason") == "from the test"

            await until(in_maintenance)
            app.status = "maintenance"  # type: ignore[attr-defined]
            assert (await fetch(url))[1]["source"] == "application"

    asyncio.run(main())


def test_a_node_the_agent_does_not_know(
    consul_agent: AgentBase, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        settings = {"address": consul_agent.http_addr, "node": "no-such-node"}
        async with serving(settings) as (_, url):
            code, body = await fetch(url)
            assert (code, body["status"], body["consul"]) == (200, "ok", "stale")

    with caplog.at_level(logging.WARNING, logger="sprockets_status_consul"):
        asyncio.run(main())
    assert "Consul knows no node named 'no-such-node'" in caplog.text


@pytest.mark.parametrize(("failure_mode", "expected"), [("open", 200), ("closed", 503)])
def test_nothing_listening_answers_at_once(
    failure_mode: str, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"127.0.0.1:{free_port()}"

    async def main() -> None:
        settings = {"address": address, "failure_mode": failure_mode}
        async with serving(settings) as (_, url):
            started = time.monotonic()
            code, body = await fetch(url)
            assert time.monotonic() - started < 0.5
            assert (code, body["consul"]) == (expected, "stale")
            for _ in range(20):
                assert (await fetch(url))[0] == expected

    with caplog.at_level(logging.WARNING, logger="sprockets_status_consul"):
        asyncio.run(main())
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("sprockets_status")
    ]
    assert len(warnings) == 1, warnings
    assert f"cannot reach http://{address}" in warnings[0]


def test_stop_closes_the_blocking_query(consul_agent: AgentBase) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        app = web.Application(consul_status={"address": consul_agent.http_addr})
        before = open_fds()
        watcher = ssc.watch(app)
        await watcher.wait_ready(5)
        await until(lambda: asyncio.sleep(0.01, result=open_fds() > before))
        await ssc.stop(app)
        await until(lambda: asyncio.sleep(0.01, result=open_fds() == before))

    asyncio.run(main())
