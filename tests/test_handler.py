"""The handlers: the seed's contract, and how Consul's answer reaches the body."""

from __future__ import annotations

import datetime
import gc
import json
import logging
import uuid
import warnings
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tornado.escape
from tornado import httputil, testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import handler as handler_module
from sprockets_status_consul import health as ssc_health
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.status import ConsulStatus
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
            assert json.loads(response.body) == {
                "error": "Method Not Allowed",
                "code": 405,
            }

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


class OwnBody(ssc.StatusHandler):
    """A seed subclass whose body has keys of its own, as the seed invited."""

    def _status_response(self) -> dict[str, Any]:
        return {"service": "billing", "status": self.get_query_argument("s", "ok")}


class Refusing(ssc.StatusHandler):
    def get(self, *args: Any, **kwargs: Any) -> None:
        raise web.HTTPError(429, reason="Slow Down")


class SeedCompatibilityTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        self.app = web.Application([(r"/status", OwnBody), (r"/refuse", Refusing)])
        return self.app

    def test_a_body_of_other_keys_still_answers_health_json(self) -> None:
        for query, status in (("", "pass"), ("?s=maintenance", "fail")):
            response = self.fetch(
                "/status" + query, headers={"Accept": "application/health+json"}
            )
            assert response.code == 200  # _application_status() says ok
            body = json.loads(response.body)
            assert (body["status"], body["serviceId"]) == (status, "tornado")
            assert body["version"] == ssc.application_identity(self.app)[1]
            assert body["notes"] == ["service: billing"]

    def test_the_seed_module_names(self) -> None:
        assert ssc.APPLICATION == "tornado"  # type: ignore[attr-defined]
        assert OwnBody._package_version() == ssc.application_identity(self.app)[1]
        ssc.set_application(None)  # type: ignore[arg-type]
        assert ssc.APPLICATION == ssc.UNKNOWN  # type: ignore[attr-defined]
        assert ssc.StatusHandler._package_version() == ssc.UNKNOWN
        with pytest.raises(AttributeError):
            ssc.NOT_THERE  # type: ignore[attr-defined]  # noqa: B018

    def test_an_http_error_answers_its_own_reason(self) -> None:
        response = self.fetch("/refuse")
        assert response.code == 429
        assert json.loads(response.body) == {"error": "Slow Down", "code": 429}


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


class Told(ssc.ConsulStatusHandler):
    """Consul's answer comes from the query (status, reason, source, consul, age)."""

    @property
    def consul_status(self) -> ConsulStatus:  # type: ignore[override]
        status = self.get_query_argument("status", ssc.OK)
        age = self.get_query_argument("age", None)
        return ConsulStatus(
            status,
            self.get_query_argument("consul", st.CONNECTED),
            self.get_query_argument("reason", None),
            self.get_query_argument("source", "key" if status != ssc.OK else None),
            None if age is None else float(age),
        )


class Subclassed(ssc.ConsulStatusHandler):
    """Keeps every hook and every per-request value."""


class ToldEachTime(Told):
    """Overrides a hook of the body, so its body is made on every request."""

    def write(self, chunk: Any) -> None:
        super().write(chunk)


class Extra(ssc.StatusHandler):
    def _status_response(self) -> dict[str, Any]:
        return {**super()._status_response(), "extra": True}


class ExtraAfter(ssc.ConsulStatusHandler, Extra):
    """``Extra`` comes after the handler in the MRO: reached through super()."""


class Stamping(ssc.StatusHandler):
    def get(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        self.set_header("X-Stamp", "stamped")
        return super().get(*args, **kwargs)


class StampingAfter(Told, Stamping):
    """``Stamping.get`` comes after the handler's in the MRO, reached by super()."""


def with_extra(cls: type[Told]) -> type[Told]:
    """A class decorator: the hook is added after the class is made."""

    def _status_response(self: Told) -> dict[str, Any]:
        return {**ssc.ConsulStatusHandler._status_response(self), "extra": True}

    cls._status_response = _status_response  # type: ignore[method-assign]
    return cls


@with_extra
class Decorated(Told):
    pass


class EncodedOnceTests(testing.AsyncHTTPTestCase):
    """The JSON body is encoded once per answer, and is the hooks' body."""

    def get_app(self) -> web.Application:
        import tornado

        other = web.Application(
            [(r"/other/.*", Told)], service="other", version=tornado.version
        )
        third = web.Application([(r"/third/.*", Told)], service="other", version="9")
        app = web.Application(
            [
                (r"/told", Told),
                (r"/ConsulStatusHandler", ssc.ConsulStatusHandler),
                (r"/Subclassed", Subclassed),
                (r"/each", ToldEachTime),
                (r"/mixed", ExtraAfter),
                (r"/stamped", StampingAfter),
                (r"/decorated", Decorated),
                (r"/other/.*", other),
                (r"/third/.*", third),
            ]
        )
        _WATCHERS[app] = _WATCHERS[other] = _WATCHERS[third] = ConsulWatcher(
            Settings(startup_wait=0.0),
            client=ScriptedConsul(),  # type: ignore[arg-type]
        )
        return app

    def answers(self, path: str) -> tuple[int, str, bytes]:
        response = self.fetch(path)
        return response.code, response.headers["Content-Type"], response.body

    def test_the_body_is_that_of_the_hooks_byte_for_byte(self) -> None:
        for query in (
            "",
            "status=maintenance&reason=deploy+1",
            "status=maintenance&reason=deploy+1&source=node",
            "status=maintenance&reason=%3C/script%3E+%C3%A9",
            "status=unknown&reason=x",
            "status=maintenance&consul=stale&age=3.5",
        ):
            for own in (None, "maintenance", "draining", "broken"):
                self._app.status = own or ssc.OK  # type: ignore[attr-defined]
                assert self.answers(f"/told?{query}") == self.answers(
                    f"/each?{query}"
                ), (query, own)

    def test_encoded_once_while_the_answer_stays(self) -> None:
        reason = f"never-seen-{uuid.uuid4()}"
        with mock.patch(
            "tornado.escape.json_encode", wraps=tornado.escape.json_encode
        ) as encode:
            for _ in range(5):
                self.fetch(f"/told?status=maintenance&reason={reason}")
            assert encode.call_count == 1
            self.fetch(f"/told?status=maintenance&reason={reason}-2")
            assert encode.call_count == 2

    def test_each_answer_has_its_own_body_and_the_memory_is_bounded(self) -> None:
        for n in range(3 * handler_module._MAX_RENDERED):
            body = json.loads(self.fetch(f"/told?status=maintenance&reason=r{n}").body)
            assert body["reason"] == f"r{n}"
        assert len(handler_module._RENDERED) <= handler_module._MAX_RENDERED

    def test_a_stale_answer_says_its_own_age(self) -> None:
        for age in (1.0, 2.5, 7.0):
            body = json.loads(self.fetch(f"/told?consul=stale&age={age}").body)
            assert body["consul_age"] == age

    def test_what_the_watcher_knows_of_consul_is_in_the_body(self) -> None:
        for consul in (st.CONNECTED, st.STARTING, st.UNREACHABLE, st.CONNECTED):
            assert json.loads(self.fetch(f"/told?consul={consul}").body)["consul"] == (
                consul
            )

    def test_applications_keep_their_own_name_and_version(self) -> None:
        import tornado

        for path, name, version in (
            ("/told", "tornado", tornado.version),
            ("/other/told", "other", tornado.version),
            ("/third/told", "other", "9"),
        ):
            body = json.loads(self.fetch(path).body)
            assert (body["application"], body["version"]) == (name, version)

    def test_a_mixin_reached_through_super_still_shapes_the_body(self) -> None:
        for _ in range(2):
            assert json.loads(self.fetch("/mixed").body)["extra"] is True

    def test_a_hook_added_after_the_class_is_made_is_asked(self) -> None:
        for path in ("/told", "/decorated", "/told", "/decorated"):
            body = json.loads(self.fetch(f"{path}?status=maintenance&reason=r").body)
            assert ("extra" in body) is (path == "/decorated"), path

    def test_a_patched_hook_is_asked_and_leaves_no_trace(self) -> None:
        for hook, patched in (
            (ssc.ConsulStatusHandler, "_status_response_code"),
            (ssc.StatusHandler, "_status_response_code"),
        ):
            assert self.fetch("/told").code == 200
            with mock.patch.object(hook, patched, return_value=418):
                assert self.fetch("/told").code == 418
                assert self.fetch("/told?status=maintenance").code == 418
            assert self.fetch("/told").code == 200
            assert self.fetch("/told?status=maintenance").code == 503
        with mock.patch.object(ssc.StatusHandler, "_status_response") as response:
            response.return_value = {"application": "patched"}
            assert json.loads(self.fetch("/told").body)["application"] == "patched"
        assert json.loads(self.fetch("/told").body)["application"] == "tornado"

    def test_a_patched_per_request_value_is_read(self) -> None:
        said = ConsulStatus(ssc.MAINTENANCE, st.CONNECTED, "patched", "node")
        for cls in (ssc.ConsulStatusHandler, Subclassed):
            assert self.fetch(f"/{cls.__name__}").code == 200
            with mock.patch.object(
                cls, "consul_status", new_callable=mock.PropertyMock
            ) as consul_status:
                consul_status.return_value = said
                response = self.fetch(f"/{cls.__name__}")
                assert response.code == 503
                assert json.loads(response.body)["reason"] == "patched"
            assert self.fetch(f"/{cls.__name__}").code == 200

    def test_a_mixin_get_reached_through_super_is_still_called(self) -> None:
        for _ in range(2):
            response = self.fetch("/stamped?status=maintenance&reason=r")
            assert response.headers.get("X-Stamp") == "stamped"
            assert json.loads(response.body)["reason"] == "r"


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
            [(r"/status", ssc.ConsulStatusHandler)],
            consul_status={"ttl": "s3cr3t-soon"},
        )

    def test_watch_names_the_bad_key(self) -> None:
        with pytest.raises(ssc.SettingsError, match=r"consul_status\['ttl'\]"):
            ssc.watch(self._app)

    def test_a_request_gets_a_500_status_body_and_one_log_line(self) -> None:
        handler_module._logged_errors.clear()
        with self.assertLogs("sprockets_status_consul", logging.ERROR) as logs:
            for _ in range(3):
                response = self.fetch("/status")
                assert response.code == 500
                body = json.loads(response.body)
                assert body["application"] == "tornado"
                assert (body["status"], body["consul"]) == ("unknown", "unavailable")
                assert body["source"] == "settings"
                assert body["reason"] == "bad consul_status setting (see the log)"
                assert b"s3cr3t" not in response.body
        assert len(logs.records) == 1
        assert "consul_status['ttl']" in logs.records[0].getMessage()
        assert "s3cr3t-soon" in logs.records[0].getMessage()

    def test_health_json_fails_with_the_reason(self) -> None:
        response = self.fetch("/status", headers={"Accept": "application/health+json"})
        assert response.code == 500
        body = json.loads(response.body)
        check = body["checks"]["consul:watcher"][0]
        assert (body["status"], check["status"]) == ("fail", "fail")
        assert check["output"] == "bad consul_status setting (see the log)"
        assert b"s3cr3t" not in response.body


class WatcherFailureTests(testing.AsyncHTTPTestCase):
    """Getting the watcher fails for a reason that is not a setting."""

    def get_app(self) -> web.Application:
        return web.Application([(r"/status", ssc.ConsulStatusHandler)])

    def test_answers_the_application_status_and_logs_each_kind_once(self) -> None:
        handler_module._logged_errors.clear()
        failures = [RuntimeError("Event loop is closed")] * 3 + [KeyError("x")] * 2
        with (
            mock.patch.object(handler_module, "current", side_effect=failures),
            self.assertLogs("sprockets_status_consul", logging.ERROR) as logs,
        ):
            for _ in failures:
                response = self.fetch("/status")
                assert response.code == 200
                body = json.loads(response.body)
                assert (body["status"], body["consul"]) == ("ok", "unavailable")
                assert "reason" not in body
        assert [r.exc_info[0] for r in logs.records if r.exc_info] == [
            RuntimeError,
            KeyError,
        ]
        assert len(logs.records) == 2

    def test_the_application_status_still_counts(self) -> None:
        self._app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        with mock.patch.object(handler_module, "current", side_effect=OSError("x")):
            response = self.fetch(
                "/status", headers={"Accept": "application/health+json"}
            )
        assert response.code == 503
        body = json.loads(response.body)
        assert body["checks"]["consul:watcher"][0]["status"] == "warn"
        assert body["checks"]["consul:watcher"][0]["output"] == (
            "unexpected error: OSError"
        )


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


class Overridden(ssc.ConsulStatusHandler):
    """A subclass that answers GET its own way."""

    def get(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        self.set_status(503)
        self.set_header("X-Overridden", "yes")
        self.write({"status": "overridden"})
        return None


class HeadTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", Overridden)])

    def test_head_answers_what_the_subclass_get_answers(self) -> None:
        get = self.fetch("/status")
        head = self.fetch("/status", method="HEAD")
        assert (get.code, head.code) == (503, 503)
        assert head.headers["X-Overridden"] == "yes"
        assert head.body == b""


class SynchronousMixin:
    """A mixin as written for a synchronous ``prepare``: it does not await."""

    def prepare(self) -> None:
        self.prepared = True
        super().prepare()  # type: ignore[misc]


class MixedIn(SynchronousMixin, ssc.ConsulStatusHandler):
    pass


class SynchronousMixinTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", MixedIn)])
        self.consul = ScriptedConsul()
        self.watcher = ConsulWatcher(Settings(startup_wait=5), client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = self.watcher
        return app

    def test_the_first_request_of_a_process_is_answered(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            response = self.fetch("/status")  # Consul has not answered yet
            gc.collect()
        assert response.code == 200
        body = json.loads(response.body)
        assert (body["status"], body["consul"]) == ("ok", "starting")
        assert not [w for w in caught if "never awaited" in str(w.message)]

        self.consul.answer(3, maint("deploy 42"))
        self.io_loop.run_sync(lambda: self.watcher.wait_ready(5))
        body = json.loads(self.fetch("/status").body)
        assert (body["status"], body["reason"]) == ("maintenance", "deploy 42")


class ReadsBeforePrepare(ssc.ConsulStatusHandler):
    """A mixin's way: reads what Consul says before ``super().prepare()``."""

    def prepare(self) -> Any:
        self.seen_first = self.consul_status.consul
        return super().prepare()


class Decorating(ssc.ConsulStatusHandler):
    """Overrides a per-request value with a property that asks ``super()``."""

    @property
    def consul_status(self) -> ConsulStatus:
        return super().consul_status


class ReadsAfter(ssc.ConsulStatusHandler):
    """Keeps every hook, and reads the per-request values once answered."""

    def on_finish(self) -> None:
        self.application.settings["read_after"].append(
            (self.consul_status, self.answer)
        )


class CountingWatcher(ConsulWatcher):
    reads = 0

    def status(self) -> ConsulStatus:
        CountingWatcher.reads += 1
        return super().status()


class PerRequestValueTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application(
            [
                (r"/early", ReadsBeforePrepare),
                (r"/decorated", Decorating),
                (r"/after", ReadsAfter),
                (r"/status", ssc.ConsulStatusHandler),
            ],
            read_after=[],
        )
        self.consul = ScriptedConsul()
        self.watcher = CountingWatcher(Settings(startup_wait=5), client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = self.watcher
        return app

    def test_values_read_before_the_first_answer_are_read_again_after_it(
        self,
    ) -> None:
        self.io_loop.call_later(0.1, self.consul.answer, 3, maint("deploy 42"))
        response = self.fetch("/early")  # waits for the first answer
        body = json.loads(response.body)
        assert response.code == 503, body
        assert (body["status"], body["consul"]) == ("maintenance", "connected")

    def test_a_value_is_computed_once_per_request_through_super(self) -> None:
        self.consul.answer(3)
        self.io_loop.run_sync(lambda: self.watcher.wait_ready(5))
        for accept in ("application/json", "application/health+json"):
            CountingWatcher.reads = 0
            response = self.fetch("/decorated", headers={"Accept": accept})
            assert response.code == 200
            assert CountingWatcher.reads == 1, accept

    def test_the_values_a_body_was_made_of_are_those_read_after_it(self) -> None:
        self.consul.answer(3, maint("deploy 42"))
        self.io_loop.run_sync(lambda: self.watcher.wait_ready(5))
        for path in ("/status", "/after", "/status?again", "/after?again"):
            CountingWatcher.reads = 0
            body = json.loads(self.fetch(path).body)
            assert CountingWatcher.reads == 1, path
            assert (body["status"], body["reason"]) == ("maintenance", "deploy 42")
        (consul, answer), _ = self._app.settings["read_after"]
        assert consul.reason == answer.reason == "deploy 42"


class Truthful(ssc.StatusHandler):
    """Adds a value from the query: a boolean, an int or a float."""

    def _status_response(self) -> dict[str, Any]:
        body = super()._status_response()
        value = self.get_query_argument("value")
        body["value"] = {"true": True, "one": 1, "float": 1.0}[value]
        return body


class ExactBodyTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application([(r"/status", Truthful)])

    def test_equal_values_keep_their_own_encoding(self) -> None:
        for value, expected in (("one", "1"), ("true", "true"), ("float", "1.0")):
            body = self.fetch(f"/status?value={value}").body.decode()
            assert f'"value": {expected}' in body, body


class IdentityTests(testing.AsyncHTTPTestCase):
    """Name and version: the application's settings, then set_application."""

    def get_app(self) -> web.Application:
        self.first = web.Application(
            [(r"/first/status", ssc.StatusHandler)], service="first", version="1.0.0"
        )
        self.second = web.Application(
            [(r"/second/status", ssc.StatusHandler)], service="second", version="2.0.0"
        )
        return web.Application(
            [
                (r"/first/.*", self.first),
                (r"/second/.*", self.second),
                (r"/status", ssc.StatusHandler),
            ]
        )

    def test_two_applications_in_one_process_differ(self) -> None:
        import tornado

        first = json.loads(self.fetch("/first/status").body)
        second = json.loads(self.fetch("/second/status").body)
        fallback = json.loads(self.fetch("/status").body)
        assert (first["application"], first["version"]) == ("first", "1.0.0")
        assert (second["application"], second["version"]) == ("second", "2.0.0")
        assert (fallback["application"], fallback["version"]) == (
            "tornado",
            tornado.version,
        )

    def test_health_json_says_the_same(self) -> None:
        response = self.fetch(
            "/second/status", headers={"Accept": "application/health+json"}
        )
        body = json.loads(response.body)
        assert (body["serviceId"], body["version"]) == ("second", "2.0.0")


class TimeTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        watcher = ConsulWatcher(Settings(startup_wait=5), client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = watcher
        return app

    def test_every_check_says_when_it_was_confirmed(self) -> None:
        self.consul.answer(3)
        before = datetime.datetime.now(datetime.timezone.utc)
        response = self.fetch("/status", headers={"Accept": "application/health+json"})
        after = datetime.datetime.now(datetime.timezone.utc)
        checks = json.loads(response.body)["checks"]
        assert set(checks) == {"application:status", "consul-node:maintenance"}
        for (entry,) in checks.values():
            assert entry["time"].endswith("Z")
            moment = datetime.datetime.fromisoformat(
                entry["time"].replace("Z", "+00:00")
            )
            slack = datetime.timedelta(milliseconds=1)
            assert before - slack <= moment <= after + slack

    def test_the_readme_example_has_the_fields_of_a_real_answer(self) -> None:
        self.consul.answer(3)
        response = self.fetch("/status", headers={"Accept": "application/health+json"})
        real = json.loads(response.body)
        readme = (Path(__file__).parent.parent / "README.md").read_text()
        section = readme.split("## `application/health+json`", 1)[1]
        block = section.split("```console\n", 1)[1].split("```", 1)[0]
        example = json.loads(block.split("\n", 1)[1])
        assert set(real) - {"output", "notes"} <= set(example)
        for name, (entry,) in real["checks"].items():
            (shown,) = example["checks"][name]
            assert set(entry) <= set(shown), name

    def test_an_unreachable_source_is_as_old_as_its_answer(self) -> None:
        self.consul.answer(3)
        assert self.fetch("/status").code == 200
        self.consul.fail(ssc.ConsulError("cannot reach http://127.0.0.1:8500"))
        deadline = self.io_loop.time() + 5
        while True:
            body = json.loads(
                self.fetch(
                    "/status", headers={"Accept": "application/health+json"}
                ).body
            )
            node = body["checks"]["consul-node:maintenance"][0]
            if node["status"] == "warn":
                break
            assert self.io_loop.time() < deadline
        notes = dict(note.split(": ", 1) for note in body["notes"])
        age = float(notes["consul_age"])
        moment = datetime.datetime.fromisoformat(node["time"].replace("Z", "+00:00"))
        now = datetime.datetime.now(datetime.timezone.utc)
        assert abs((now - moment).total_seconds() - age) < 0.5


class LogRequestTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return web.Application(
            [(r"/status", ssc.StatusHandler), (r"/other", Unavailable)],
            log_function=ssc.log_request,
        )

    def test_status_503s_are_info_other_5xx_errors(self) -> None:
        self._app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        with self.assertLogs("tornado.access", logging.INFO) as logs:
            assert self.fetch("/status").code == 503
            assert self.fetch("/other").code == 503
            assert self.fetch("/missing").code == 404
        levels = [(r.levelno, r.getMessage().rsplit(" ", 1)[0]) for r in logs.records]
        assert levels == [
            (logging.INFO, "503 GET /status (127.0.0.1)"),
            (logging.ERROR, "503 GET /other (127.0.0.1)"),
            (logging.WARNING, "404 GET /missing (127.0.0.1)"),
        ]
        assert logs.records[0].getMessage().endswith("ms")


class Unavailable(web.RequestHandler):
    def get(self) -> None:
        self.set_status(503)


@pytest.mark.parametrize(
    ("accept", "health"),
    [
        ("", False),
        ("*/*", False),
        ("application/*", False),
        ("application/json", False),
        ("application/health+json", True),
        ("Application/Health+JSON", True),
        ("application/health+json;q=0.1, application/json", False),
        ("application/json;q=0.1, application/health+json", True),
        ("application/health+json, application/json", True),
        ("application/json, application/health+json", True),
        ("application/health+json;q=0.5, application/json;q=0.5", True),
        ("application/health+json, */*;q=0.1", True),
        ("application/health+json;q=0.1, */*", False),
        ("application/health+json;q=0.1, application/*", False),
        ("application/json;q=0.2, */*", True),
        ("application/health+json;q=0", False),
        ("application/health+json;q=0, */*", False),
        ("application/json;q=0, application/health+json;q=0", False),
        ("application/health+json;q=nonsense", False),
        ("application/health+json;q=2", False),
        ("health+json", False),
        ("*/health+json", False),
        ("application/health+json;charset=utf-8;q=0.9, application/json;q=0.8", True),
        ("application/health+json ; q = 0.3 , application/json ; q = 0.4", False),
        (",,;;, application/health+json", True),
    ],
)
def test_accept_negotiation(accept: str, health: bool) -> None:
    assert ssc_health.wanted(accept) is health


def test_a_huge_accept_header_is_not_parsed() -> None:
    """Past the caps plain JSON answers, whatever the header would have said."""
    preferred = "application/health+json"
    longest = preferred.ljust(ssc_health.MAX_ACCEPT_LENGTH - 1) + ",*/*;q=0.1"
    longest = longest[: ssc_health.MAX_ACCEPT_LENGTH]
    assert ssc_health.wanted(longest)
    assert not ssc_health.wanted(longest + " ")
    many = ",".join(["text/plain;q=0.1"] * ssc_health.MAX_MEDIA_RANGES)
    assert len(many) < ssc_health.MAX_ACCEPT_LENGTH
    assert not ssc_health.wanted(f"{preferred},{many}")
    assert ssc_health.wanted(f"{preferred},{many.partition(',')[2]}")
