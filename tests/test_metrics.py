"""The Prometheus metrics (the ``prometheus`` extra) and the query outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import checks, metrics
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .consul_agent import free_port
from .fault_support import ROOT
from .test_checks import run_clean
from .test_watcher import ScriptedConsul, maint, until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"sprockets_status_{name}", tuple(sorted(labels.items()))))


def maintenance_sources(samples: Samples) -> set[str]:
    return {
        dict(labels)["source"]
        for (name, labels), got in samples.items()
        if name == "sprockets_status_maintenance" and got == 1
    }


def test_the_metrics_follow_consul_the_checks_and_the_application() -> None:
    async def main() -> None:
        app = web.Application()
        consul = ScriptedConsul()
        watcher = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
        _WATCHERS[app] = watcher
        registry = CollectorRegistry()
        metrics.register(app, registry)
        metrics.register(app, registry)  # idempotent
        healthy = {"db": True}

        async def database() -> bool:
            return healthy["db"]

        ssc.add_check(app, "db", database, interval=0.005, critical=False)
        samples = scrape(registry)
        assert value(samples, "up") == 1
        assert value(samples, "consul_connected") == 0
        assert value(samples, "check_up", check="db") == 1
        assert value(samples, "check_duration_seconds", check="db") is None
        assert maintenance_sources(samples) == set()

        watcher.start()
        consul.answer(3, maint())
        await until(lambda: watcher.queries["ok"] == 1)
        consul.fail(ssc.ConsulError("cannot reach"))
        await until(lambda: watcher.queries["error"] == 1)
        consul.answer(4, maint())
        await until(lambda: watcher.queries["ok"] == 2)
        healthy["db"] = False
        await until(lambda: checks.results(app)[0].failing)
        samples = scrape(registry)
        assert value(samples, "up") == 0
        assert value(samples, "consul_connected") == 1
        assert maintenance_sources(samples) == {"node"}
        for outcome, count in (("ok", 2), ("error", 1), ("timeout", 0)):
            assert value(samples, "consul_requests_total", outcome=outcome) == count
        assert value(samples, "changes_total") == 1  # ok -> node maintenance
        assert value(samples, "check_up", check="db") == 0
        duration = value(samples, "check_duration_seconds", check="db")
        assert duration is not None and 0 <= duration < 1

        app.status = ssc.DRAINING  # type: ignore[attr-defined]
        ssc.status_changed(app)
        samples = scrape(registry)
        assert maintenance_sources(samples) == {"application"}
        assert value(samples, "changes_total") == 2
        app.status = "broken"  # a 500: neither up nor in maintenance
        samples = scrape(registry)
        assert (value(samples, "up"), maintenance_sources(samples)) == (0, set())
        await ssc.stop(app)

    run_clean(main)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_timeouts_and_errors_are_counted_apart() -> None:
    async def main(port: int, outcome: str) -> dict[str, int]:
        settings = Settings(port=port, node="n", timeout=0.1, retry_max=0.1)
        watcher = ConsulWatcher(settings)
        watcher.start()
        try:
            await until(lambda: watcher.queries[outcome] >= 2, timeout=5)
        finally:
            await watcher.stop()
        return watcher.queries

    with silent_server() as port:
        silent = asyncio.run(main(port, "timeout"))
    refused = asyncio.run(main(free_port(), "error"))
    assert (silent["ok"], silent["error"]) == (0, 0), silent
    assert (refused["ok"], refused["timeout"]) == (0, 0), refused


class MetricsHandlerTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        self.registry = CollectorRegistry()
        return web.Application(
            [(r"/metrics", metrics.MetricsHandler, {"registry": self.registry})]
        )

    def test_serves_the_text_format_with_the_applications_metrics(self) -> None:
        response = self.fetch("/metrics")
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(response.body.decode())
        assert value(samples, "up") == 1
        assert value(samples, "changes_total") == 0
        # A second request does not register them twice (that would be a 500).
        assert self.fetch("/metrics").code == 200

    def test_openmetrics_when_asked(self) -> None:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        response = self.fetch("/metrics", headers=headers)
        assert response.headers["Content-Type"].startswith("application/openmetrics")
        assert response.body.rstrip().endswith(b"# EOF")


def test_a_collected_applications_metrics_make_way_for_the_next() -> None:
    registry = CollectorRegistry()
    first = web.Application()
    metrics.register(first, registry)
    del first  # without a gc.collect(): its cycles wait for the collector
    second = web.Application()
    metrics.register(second, registry)
    assert value(scrape(registry), "up") == 1


def test_two_living_applications_in_one_registry_is_a_clear_error() -> None:
    registry = CollectorRegistry()
    first = web.Application()
    metrics.register(first, registry)
    with pytest.raises(ValueError, match="its own CollectorRegistry"):
        metrics.register(web.Application(), registry)
    assert first is not None


class DefaultRegistryTests(testing.AsyncHTTPTestCase):
    """Each test's application serves the default registry in turn."""

    def get_app(self) -> web.Application:
        return web.Application([(r"/metrics", metrics.MetricsHandler)])

    def test_first(self) -> None:
        assert self.fetch("/metrics").code == 200

    def test_second(self) -> None:
        assert self.fetch("/metrics").code == 200


def test_the_library_imports_without_prometheus_client() -> None:
    script = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import sprockets_status_consul as ssc\n"
        "assert callable(ssc.add_check) and callable(ssc.on_change)\n"
        "try:\n"
        "    import sprockets_status_consul.metrics\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'sprockets-status-consul[prometheus]'" in done.stdout


def test_the_readmes_alert_rule_uses_a_metric_we_export() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    rules = [
        rule
        for block in blocks
        if "alert:" in block
        for group in yaml.safe_load(block)["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) == 1
    rule = rules[0]
    expr = "sprockets_status_consul_connected == 0"
    assert (rule["expr"], rule["for"]) == (expr, "5m")
    registry = CollectorRegistry()
    metrics.register(web.Application(), registry)
    assert value(scrape(registry), "consul_connected") == 0  # no watcher: not connected
