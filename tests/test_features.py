"""Beyond the original handler, against a real agent: service maintenance, the
fleet-wide key, application/health+json, liveness and draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import pytest
from tornado import httpclient, web

import sprockets_status_consul as ssc

from .consul_agent import AgentBase, free_port, wait_for
from .fault_support import ROOT
from .test_integration import all_answer, backends, get_status, serving

HEALTH = {"Accept": "application/health+json"}


async def fetch(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    client = httpclient.AsyncHTTPClient()
    response = await client.fetch(url, headers=headers, raise_error=False)
    return response.code, json.loads(response.body), response.headers["Content-Type"]


async def until_code(url: str, code: int, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got, body, _ = await fetch(url)
        if got == code:
            return body
        assert time.monotonic() < deadline, f"still {got}: {body}"
        await asyncio.sleep(0.005)


@pytest.fixture
def service_id(consul_agent: AgentBase) -> Any:
    service = f"web-{uuid.uuid4().hex[:8]}"
    response = consul_agent.request(
        "PUT", "/v1/agent/service/register", body={"ID": service, "Name": "web"}
    )
    assert response.status == 200, response.body
    yield service
    consul_agent.request("PUT", f"/v1/agent/service/deregister/{service}")


def test_service_maintenance(consul_agent: AgentBase, service_id: str) -> None:
    async def main() -> None:
        settings = {"address": consul_agent.http_addr, "service": service_id}
        async with serving(settings) as (_, url):
            await until_code(url, 200)
            await asyncio.to_thread(
                consul_agent.consul,
                "maint", "-enable", "-service", service_id, "-reason", "canary bad",
            )  # fmt: skip
            body = await until_code(url, 503)
            assert (body["source"], body["reason"]) == ("service", "canary bad")

            # Node maintenance comes first when both are on.
            await asyncio.to_thread(
                consul_agent.consul, "maint", "-enable", "-reason", "node down"
            )
            deadline = time.monotonic() + 5
            while (await fetch(url))[1].get("source") != "node":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            await asyncio.to_thread(consul_agent.consul, "maint", "-disable")
            body = await until_code(url, 503)
            while body.get("source") != "service":
                assert time.monotonic() < deadline
                body = (await fetch(url))[1]

            await asyncio.to_thread(
                consul_agent.consul, "maint", "-disable", "-service", service_id
            )
            await until_code(url, 200)

    asyncio.run(main())


def test_maintenance_of_another_service_does_not_count(
    consul_agent: AgentBase, service_id: str
) -> None:
    async def main() -> None:
        settings = {"address": consul_agent.http_addr, "service": "some-other-id"}
        async with serving(settings) as (app, url):
            await until_code(url, 200)
            # The watcher sees the change (the node's index moves) and ignores it.
            watcher = ssc.watch(app)
            seen = watcher._followed[0].answered_at
            await asyncio.to_thread(
                consul_agent.consul, "maint", "-enable", "-service", service_id
            )
            deadline = time.monotonic() + 5
            while watcher._followed[0].answered_at == seen:
                assert time.monotonic() < deadline, "the change never reached it"
                await asyncio.sleep(0.005)
            assert (await fetch(url))[0] == 200
            assert watcher.status().status == ssc.OK

    asyncio.run(main())


def test_fleet_wide_key_flips_every_backend(consul_agent: AgentBase) -> None:
    key = f"sprockets-status-consul/test/{uuid.uuid4().hex[:8]}/maintenance"
    try:
        with backends(3, consul_agent, {"key": key}) as ports:
            wait_for(lambda: all_answer(ports, 200), 5, message="backends not up")
            consul_agent.consul("kv", "put", key, "deploy 42")
            wait_for(lambda: all_answer(ports, 503, "deploy 42"), 5, interval=0.002)
            for port in ports:
                assert get_status(port)[1]["source"] == "key"
            consul_agent.consul("kv", "put", key, "deploy 43")
            wait_for(lambda: all_answer(ports, 503, "deploy 43"), 5, interval=0.002)
            consul_agent.consul("kv", "delete", key)
            wait_for(lambda: all_answer(ports, 200), 5, interval=0.002)
    finally:
        consul_agent.consul("kv", "delete", key, check=False)


def test_an_empty_key_still_means_maintenance(consul_agent: AgentBase) -> None:
    key = f"sprockets-status-consul/test/{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with serving({"address": consul_agent.http_addr, "key": key}) as (_, url):
            await until_code(url, 200)
            await asyncio.to_thread(consul_agent.consul, "kv", "put", key)
            body = await until_code(url, 503)
            assert body["reason"] == f"key {key} is set"

    try:
        asyncio.run(main())
    finally:
        consul_agent.consul("kv", "delete", key, check=False)


def test_health_json(consul_agent: AgentBase, service_id: str) -> None:
    key = f"sprockets-status-consul/test/{uuid.uuid4().hex[:8]}"
    settings = {"address": consul_agent.http_addr, "service": service_id, "key": key}

    async def main() -> None:
        async with serving(settings) as (_, url):
            await until_code(url, 200)
            code, body, content_type = await fetch(url, HEALTH)
            assert (code, content_type) == (200, "application/health+json")
            assert body["status"] == "pass"
            assert body["serviceId"] == "tornado"
            assert isinstance(body["version"], str)
            assert set(body["checks"]) == {
                "application:status",
                "consul-node:maintenance",
                "consul-service:maintenance",
                "consul-key:maintenance",
            }
            node = body["checks"]["consul-node:maintenance"][0]
            assert node["componentId"] == consul_agent.node_name
            assert node["status"] == "pass"

            await asyncio.to_thread(consul_agent.consul, "kv", "put", key, "big deploy")
            await until_code(url, 503)
            code, body, _ = await fetch(url, HEALTH)
            assert (code, body["status"], body["output"]) == (503, "fail", "big deploy")
            assert body["checks"]["consul-key:maintenance"][0]["status"] == "fail"
            assert body["checks"]["consul-node:maintenance"][0]["status"] == "pass"

            # Plain requests, and health+json refused with q=0, keep the seed's.
            for headers in (None, {"Accept": "application/health+json;q=0"}):
                code, body, content_type = await fetch(url, headers)
                assert content_type.startswith("application/json")
                assert body["status"] == "maintenance"

    ssc.set_application("tornado")
    try:
        asyncio.run(main())
    finally:
        ssc.set_application(None)  # type: ignore[arg-type]
        consul_agent.consul("kv", "delete", key, check=False)


def test_health_json_warns_while_consul_is_away() -> None:
    async def main() -> None:
        async with serving({"address": f"127.0.0.1:{free_port()}"}) as (_, url):
            code, body, _ = await fetch(url, HEALTH)
            assert (code, body["status"]) == (200, "warn")
            check = body["checks"]["consul-node:maintenance"][0]
            assert check["status"] == "warn"
            assert "cannot reach" in check["output"]

    asyncio.run(main())


def test_liveness_stays_up_in_maintenance() -> None:
    async def main() -> None:
        app = web.Application(
            [(r"/status", ssc.StatusHandler), (r"/live", ssc.LivenessHandler)]
        )
        port = free_port()
        server = app.listen(port, address="127.0.0.1")
        base = f"http://127.0.0.1:{port}"
        try:
            for status, code in ((ssc.MAINTENANCE, 503), (ssc.DRAINING, 503)):
                app.status = status  # type: ignore[attr-defined]
                assert (await fetch(f"{base}/status"))[0] == code
                live = await fetch(f"{base}/live")
                assert (live[0], live[1]["status"]) == (200, "ok")
                live = await fetch(f"{base}/live", HEALTH)
                assert (live[0], live[1]["status"]) == (200, "pass")
        finally:
            server.stop()

    asyncio.run(main())


def test_sigterm_drains_then_exits(consul_agent: AgentBase) -> None:
    port = free_port()
    env = {**os.environ, "CONSUL_HTTP_ADDR": consul_agent.http_addr}
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.backend", "--port", str(port), "--grace", "1.5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        wait_for(lambda: get_status(port)[0] == 200, 5)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: get_status(port)[0] == 503, 2, interval=0.005)
        body = get_status(port)[1]
        assert (body["status"], body["source"]) == ("draining", "application")
        live = f"http://127.0.0.1:{port}/live"
        with urllib.request.urlopen(live, timeout=2) as response:
            assert response.status == 200
        returncode = process.wait(timeout=10)
        drained = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=10)
    assert returncode == 0, stderr
    assert 1.4 <= drained < 5, drained
    assert "Traceback" not in stderr
    assert "draining: /status answers 503" in stderr
