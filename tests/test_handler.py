"""The handlers: the seed's contract, and how Consul's answer reaches the body."""

from __future__ import annotations

import json
import logging
from typing import Any
from unittest import mock

import pytest
from tornado import httputil, testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import handler as handler_module
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .test_watcher import ScriptedConsul, maint


@pytest.fixture(autouse=True)
def application_name() -> Any:
    ssc.set_application("tornado")  # an installed distribution with a version
    yield
    ssc.set_application(None)  # type: ignore[arg-type]


class StatusHandlerTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", ssc.StatusHandler)])

    def get_json(self, method: str = "GET") -> tuple[int, dict[str, Any]]:
        response = self.fetch("/status", method=method)
        return response.code, json.loads(response.body)

    def test_ok_by_default(self) -> None:
        import tornado

        code, body = self.get_json()
        assert code == 200
        assert body == {
            "application": "tornado",
            "status": "ok",
            "version": tornado.version,
        }

    def test_status_codes_follow_application_status(self) -> None:
        for status, code in ((ssc.OK, 200), (ssc.MAINTENANCE, 503), ("broken", 500)):
            self._app.status = status  # type: ignore[attr-defined]
            response_code, body = self.get_json()
            assert (response_code, body["status"]) == (code, status)

    def test_unknown_distribution_reports_unknown_version(self) -> None:
        ssc.set_application("no-such-distribution-anywhere")
        assert self.get_json()[1]["version"] == "unknown"

    def test_head_has_the_headers_and_no_body(self) -> None:
        self._app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        response = self.fetch("/status", method="HEAD")
        assert response.code == 503
        assert response.body == b""
        assert response.headers["Content-Type"].startswith("application/json")

    def test_other_methods_get_405_json(self) -> None:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            body = "" if method in ("POST", "PUT", "PATCH") else None
            response = self.fetch(
                "/status", method=method, body=body, allow_nonstandard_methods=True
            )
            assert response.code == 405, method
            assert json.loads(response.body)["code"] == 405

    def test_not_cached(self) -> None:
        assert self.fetch("/status").headers["Cache-Control"] == "no-store"

    def test_odd_requests_get_the_normal_body(self) -> None:
        response = self.fetch(
            "/status?" + "x=1&" * 500, headers={"Accept": "image/png;q=nonsense"}
        )
        assert response.code == 200
        assert json.loads(response.body)["status"] == "ok"


class SeedHooks(ssc.StatusHandler):
    """A subclass as users of the original handler wrote them."""

    def _application_status(self) -> str:
        return self.get_query_argument("status", ssc.OK)

    def _status_response(self) -> dict[str, Any]:
        body = super()._status_response()
        body["extra"] = True
        return body

    def _status_response_code(self) -> int:
        return (
            299
            if self._application_status() == "custom"
            else super()._status_response_code()
        )


class SeedHookTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", SeedHooks)])

    def test_hooks_still_shape_the_answer(self) -> None:
        response = self.fetch("/status?status=custom")
        assert response.code == 299
        body = json.loads(response.body)
        assert (body["status"], body["extra"]) == ("custom", True)
        assert self.fetch("/status?status=maintenance").code == 503


class ConsulStatusHandlerTests(testing.AsyncHTTPTestCase):
    """The handler over a watcher whose transport is scripted."""

    settings = Settings(startup_wait=2.0)

    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        self.watcher = ConsulWatcher(self.settings, client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = self.watcher
        return app

    def get_json(self) -> tuple[int, dict[str, Any]]:
        response = self.fetch("/status")
        return response.code, json.loads(response.body)

    def test_first_request_waits_briefly_for_the_first_answer(self) -> None:
        self.io_loop.call_later(0.05, self.consul.answer, 3)
        code, body = self.get_json()
        assert (code, body["status"], body["consul"]) == (200, "ok", "connected")

    def test_node_maintenance_gives_503_with_reason(self) -> None:
        self.consul.answer(3, maint("deploy 42"))
        code, body = self.get_json()
        assert code == 503
        assert body["status"] == ssc.MAINTENANCE
        assert (body["source"], body["reason"]) == ("node", "deploy 42")
        assert {"application", "version", "consul"} <= set(body)

    def test_application_status_that_is_not_ok_wins(self) -> None:
        self.consul.answer(3)
        self._app.status = "maintenance"  # type: ignore[attr-defined]
        code, body = self.get_json()
        assert (code, body["source"]) == (503, "application")
        assert "reason" not in body
        self._app.status = "broken"  # type: ignore[attr-defined]
        assert self.get_json()[0] == 500

    def test_one_watcher_serves_every_request(self) -> None:
        self.consul.answer(3)
        for _ in range(20):
            assert self.get_json()[0] == 200
        assert len(self.consul.calls) == 2  # the first query and one blocking

    def test_unreachable_consul_keeps_serving(self) -> None:
        self.consul.fail(ssc.ConsulError("cannot reach http://127.0.0.1:8500"))
        code, body = self.get_json()
        assert (code, body["status"]) == (200, "ok")
        assert body["consul"] == st.STALE


class FailClosedTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        settings = Settings(startup_wait=0.05, failure_mode="closed", retry_max=30.0)
        _WATCHERS[app] = ConsulWatcher(settings, client=self.consul)  # type: ignore[arg-type]
        return app

    def test_no_answer_within_startup_wait_is_maintenance(self) -> None:
        response = self.fetch("/status")
        body = json.loads(response.body)
        assert (response.code, body["source"], body["consul"]) == (
            503,
            "consul",
            "starting",
        )

    def test_unreachable_from_the_start_is_maintenance(self) -> None:
        self.consul.fail(ssc.ConsulError("cannot reach http://127.0.0.1:8500"))
        response = self.fetch("/status")
        body = json.loads(response.body)
        assert response.code == 503
        assert "cannot reach" in body["reason"]


class BadSettingTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application(
            [(r"/status", ssc.ConsulStatusHandler)], consul_status={"ttl": "soon"}
        )

    def test_watch_names_the_bad_key(self) -> None:
        with pytest.raises(ssc.SettingsError, match=r"consul_status\['ttl'\]"):
            ssc.watch(self._app)

    def test_a_request_gets_a_json_500_and_one_log_line(self) -> None:
        handler_module._logged_errors.clear()
        with self.assertLogs("sprockets_status_consul", logging.ERROR) as logs:
            for _ in range(3):
                response = self.fetch("/status")
                assert response.code == 500
                assert json.loads(response.body)["code"] == 500
        assert len(logs.records) == 1
        assert "consul_status['ttl']" in logs.records[0].getMessage()


class MemoryOnlyTests(testing.AsyncHTTPTestCase):
    """Once Consul has answered, requests never wait on it again."""

    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        settings = Settings(startup_wait=0.2)
        self.watcher = ConsulWatcher(settings, client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = self.watcher
        return app

    def test_requests_read_memory_while_the_blocking_query_waits(self) -> None:
        self.consul.answer(3, maint("before"))
        assert self.fetch("/status").code == 503
        # The blocking query now waits for an answer that never comes.
        assert len(self.consul.calls) == 2
        for _ in range(50):
            started = self.io_loop.time()
            assert self.fetch("/status").code == 503
            assert self.io_loop.time() - started < 0.15  # well under startup_wait
        assert len(self.consul.calls) == 2

    def test_prepare_returns_nothing_to_wait_for_once_ready(self) -> None:
        self.consul.answer(3)
        assert self.fetch("/status").code == 200
        request = httputil.HTTPServerRequest(
            start_line=httputil.RequestStartLine("GET", "/status", "HTTP/1.1"),
            headers=httputil.HTTPHeaders({"Host": "localhost"}),
        )
        request.connection = mock.Mock()
        handler = ssc.ConsulStatusHandler(self._app, request)
        assert handler.prepare() is None
        assert handler.consul_status is self.watcher.status()


class HealthHookTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", SeedHooks)])

    def test_health_json_follows_the_hooks(self) -> None:
        response = self.fetch(
            "/status?status=maintenance",
            headers={"Accept": "Application/Health+JSON"},
        )
        assert response.code == 503
        assert response.headers["Content-Type"] == "application/health+json"
        body = json.loads(response.body)
        assert body["status"] == "fail"
        assert body["checks"]["application:status"][0]["status"] == "fail"


class AllowTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", ssc.ConsulStatusHandler)])

    def test_405_names_the_allowed_methods(self) -> None:
        response = self.fetch("/status", method="DELETE")
        assert response.code == 405
        assert response.headers["Allow"] == "GET, HEAD"
        assert response.headers["Vary"] == "Accept"


def test_encoded_bodies_match_tornados_encoding_and_stay_bounded() -> None:
    from tornado import escape

    body = {"application": "a</script>", "status": "ok", "consul_age": 1.5}
    assert handler_module._encoded(body) == escape.utf8(escape.json_encode(body))
    assert handler_module._encoded(dict(body)) is handler_module._encoded(body)
    nested = {"status": "ok", "extra": {"a": [1]}}
    assert json.loads(handler_module._encoded(nested)) == nested
    for n in range(1000):
        handler_module._encoded({"n": n})
    assert len(handler_module._ENCODED) <= 256
