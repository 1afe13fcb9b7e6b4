"""Checks, Consul and the application's own status together, against a real agent.

At each step /status, its health+json answer, the change listeners and the
metrics must tell the same story.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry
from tornado import httpclient

import sprockets_status_consul as ssc
from sprockets_status_consul import checks, metrics
from sprockets_status_consul import status as st

from .consul_agent import AgentBase
from .test_changes import Recorder
from .test_integration import serving, until
from .test_metrics import maintenance_sources, parse, value

HEALTH = {"Accept": "application/health+json"}


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """The code and the JSON body of an answer."""
    client = httpclient.AsyncHTTPClient()
    response = await client.fetch(url, headers=headers, raise_error=False)
    return response.code, json.loads(response.body)


async def scrape(url: str) -> dict[Any, float]:
    response = await httpclient.AsyncHTTPClient().fetch(url)
    return parse(response.body.decode())


def test_a_check_consul_and_the_application_agree_everywhere(
    consul_agent: AgentBase,
) -> None:
    async def main() -> None:
        settings = {"address": consul_agent.http_addr}
        async with serving(settings) as (app, url):
            registry = CollectorRegistry()
            app.add_handlers(
                r".*",
                [(r"/metrics", metrics.MetricsHandler, {"registry": registry})],
            )
            metrics_url = url.replace("/status", "/metrics")
            recorder = Recorder()
            ssc.on_change(app, recorder)
            healthy: dict[str, Any] = {"db": True}

            async def database() -> None:
                if not healthy["db"]:
                    raise ConnectionError("connection refused")

            ssc.add_check(app, "db", database, interval=0.02, timeout=1)

            async def agree(expected: st.Answer, changes: int) -> None:
                """Wait for the listeners, then compare every view of the status."""

                async def told() -> bool:
                    return len(recorder.calls) >= changes

                await until(told)
                assert len(recorder.calls) == changes, recorder.calls
                if changes:
                    assert recorder.calls[-1][1] == expected
                code, body = await get(url)
                assert code == (200 if expected.status == st.OK else 503), body
                assert body["status"] == expected.status
                assert (body.get("source"), body.get("reason")) == (
                    expected.source,
                    expected.reason,
                )
                code, health = await get(url, HEALTH)
                assert health["status"] == ("pass" if code == 200 else "fail")
                db = health["checks"]["db:status"][0]
                assert db["status"] == ("pass" if healthy["db"] else "fail")
                assert isinstance(db["observedValue"], float)
                assert db["time"].endswith("Z")
                samples = await scrape(metrics_url)
                assert value(samples, "up") == (expected.status == st.OK)
                sources = {expected.source} if expected.source else set()
                assert maintenance_sources(samples) == sources
                assert value(samples, "consul_connected") == 1
                assert value(samples, "check_up", check="db") == healthy["db"]
                assert value(samples, "changes_total") == changes
                assert value(samples, "consul_requests_total", outcome="ok")

            checked = st.Answer(st.MAINTENANCE, "check", "db: connection refused")
            node = st.Answer(st.MAINTENANCE, "node", "rolling deploy")
            own = st.Answer(st.MAINTENANCE, "application")

            async def consul(*args: str) -> None:
                await asyncio.to_thread(consul_agent.consul, "maint", *args)

            await until(lambda: asyncio.sleep(0, ssc.watch(app).ready))
            await until(lambda: asyncio.sleep(0, checks.results(app)[0].time))
            await agree(st.ANSWER_OK, 0)

            healthy["db"] = False
            await agree(checked, 1)
            await consul("-enable", "-reason", "rolling deploy")
            await agree(node, 2)
            app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
            ssc.status_changed(app)
            await agree(own, 3)
            app.status = ssc.OK  # type: ignore[attr-defined]
            ssc.status_changed(app)
            await agree(node, 4)
            await consul("-disable")
            await agree(checked, 5)
            healthy["db"] = True
            await agree(st.ANSWER_OK, 6)
            assert [old for old, _ in recorder.calls] == [
                st.ANSWER_OK,
                checked,
                node,
                own,
                node,
                checked,
            ]

    asyncio.run(main())
