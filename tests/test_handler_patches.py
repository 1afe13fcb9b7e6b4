"""The answer read from its sources is the one the hooks and values would
make: after a value or hook is patched on an intermediate class, a mixin or a
later base once the classes are made, after a value is read early, and after
each of the sources changes."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import checks
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.status import ConsulStatus
from sprockets_status_consul.testing import consul_says
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .test_watcher import ScriptedConsul, until


class Base(ssc.ConsulStatusHandler):
    """An application's base handler, defining nothing (yet)."""


class Leaf(Base):
    """The handler routed; its base gets a value patched later."""


class Mixin:
    pass


class Mixed(Mixin, ssc.ConsulStatusHandler):
    pass


class Extra(ssc.StatusHandler):
    pass


class ExtraAfter(ssc.ConsulStatusHandler, Extra):
    pass


SAID = ConsulStatus(ssc.MAINTENANCE, st.CONNECTED, "patched", "node")


def _application(routes: list[tuple[str, type[web.RequestHandler]]]) -> web.Application:
    """An application whose watcher never hears from Consul (and waits not)."""
    app = web.Application(routes)
    _WATCHERS[app] = ConsulWatcher(
        Settings(startup_wait=0.0),
        client=ScriptedConsul(),  # type: ignore[arg-type]
    )
    return app


class PatchedAfterTheClassIsMade(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return _application(
            [(r"/leaf", Leaf), (r"/mixed", Mixed), (r"/after", ExtraAfter)]
        )

    def test_patch_on_intermediate_class(self) -> None:
        assert self.fetch("/leaf").code == 200
        with mock.patch.object(
            Base, "consul_status", new_callable=mock.PropertyMock
        ) as p:
            p.return_value = SAID
            response = self.fetch("/leaf")
        assert response.code == 503, response.body

    def test_patch_own_status_on_intermediate_class(self) -> None:
        with mock.patch.object(Base, "own_status", new_callable=mock.PropertyMock) as p:
            p.return_value = ssc.MAINTENANCE
            response = self.fetch("/leaf")
        assert response.code == 503, response.body

    def test_value_added_to_mixin_after_class_made(self) -> None:
        with mock.patch.object(
            Mixin, "own_status", new=property(lambda s: ssc.MAINTENANCE), create=True
        ):
            response = self.fetch("/mixed")
        assert response.code == 503, response.body

    def test_application_status_patched_on_base_reached_by_super(self) -> None:
        # own_status is super()._application_status(): Extra's, once patched.
        with mock.patch.object(
            Extra, "_application_status", return_value=ssc.MAINTENANCE
        ):
            response = self.fetch("/after")
        assert response.code == 503, response.body


class SaysMaintenance(ssc.ConsulStatusHandler):
    @property
    def own_status(self) -> str:  # type: ignore[override]
        return ssc.MAINTENANCE


class InheritsMaintenance(SaysMaintenance):
    pass


class Inherited(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        return _application([(r"/i", InheritsMaintenance)])

    def test_value_defined_on_an_intermediate_class(self) -> None:
        assert self.fetch("/i").code == 503


class Later(ssc.StatusHandler):
    """Defines nothing when the handler below is made."""


class LaterAfter(ssc.ConsulStatusHandler, Later):
    """``Later`` comes between the handler and ``StatusHandler`` in the MRO."""


class ReadsAnswerFirst(ssc.ConsulStatusHandler):
    """Reads the answer in ``prepare``; the application's status then changes."""

    def prepare(self) -> Any:
        self.set_header("X-Seen", self.answer.status)
        then = self.get_query_argument("then")
        self.application.status = {"maintenance": ssc.MAINTENANCE}.get(then, then)  # type: ignore[attr-defined]
        return super().prepare()


class SkipsPrepare(ssc.ConsulStatusHandler):
    """A ``prepare`` that does not call ``super().prepare()``."""

    def prepare(self) -> None:
        pass


@pytest.fixture(autouse=True)
def application_name() -> Any:
    ssc.set_application("tornado")  # an installed distribution with a version
    yield
    ssc.set_application(None)  # type: ignore[arg-type]


class Said:
    """A value whose text changes in place."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __str__(self) -> str:
        return self.value


async def _fails() -> bool:
    return False


class ReadFromTheSources(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application(
            [
                (r"/status", ssc.ConsulStatusHandler),
                (r"/later", LaterAfter),
                (r"/reads-first", ReadsAnswerFirst),
                (r"/skips-prepare", SkipsPrepare),
                (r"/says-maintenance", SaysMaintenance),
            ]
        )
        _WATCHERS[app] = ConsulWatcher.answering(
            ConsulStatus(ssc.OK, st.CONNECTED, sources=())
        )
        return app

    def body(self, path: str = "/status") -> tuple[int, dict[str, Any]]:
        """The answer, asked twice: the second is the one kept from the first."""
        first = self.fetch(path)
        second = self.fetch(path)
        assert (first.code, first.body) == (second.code, second.body), path
        return second.code, json.loads(second.body)

    def test_each_source_changes_the_answer(self) -> None:
        assert self.body() == (
            200,
            {
                "application": "tornado",
                "status": "ok",
                "version": tornado_version(),
                "consul": "connected",
            },
        )
        with consul_says(self._app, maintenance=True, reason="deploy 42"):
            code, body = self.body()
            assert (code, body["source"], body["reason"]) == (503, "node", "deploy 42")
        assert self.body()[0] == 200
        self._app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        code, body = self.body()
        assert (code, body["source"]) == (503, "application")
        self._app.status = "broken"  # type: ignore[attr-defined]
        assert self.body()[0] == 500
        self._app.status = ssc.OK  # type: ignore[attr-defined]
        self._app.settings["service"] = "renamed"
        self._app.settings["version"] = "9.9"
        body = self.body()[1]
        assert (body["application"], body["version"]) == ("renamed", "9.9")
        del self._app.settings["service"], self._app.settings["version"]
        ssc.set_application("other-name")
        assert self.body()[1]["application"] == "other-name"
        ssc.add_check(self._app, "db", _fails)
        self.fetch("/status")  # starts the checks
        self.io_loop.run_sync(
            lambda: until(lambda: any(r.failing for r in checks.results(self._app)))
        )
        code, body = self.body()
        assert (code, body["source"], body["reason"]) == (
            503,
            "check",
            "db: returned False",
        )

    def test_each_of_name_version_and_application_name_alone(self) -> None:
        assert self.body()[1]["application"] == "tornado"
        self._app.settings["service"] = "renamed"
        assert self.body()[1]["application"] == "renamed"
        self._app.settings["version"] = "9.9"
        assert self.body()[1]["version"] == "9.9"
        del self._app.settings["service"]
        assert self.body()[1]["application"] == "tornado"
        ssc.set_application("other-name")
        assert self.body()[1]["application"] == "other-name"

    def test_an_accept_header_that_does_not_ask_health_json(self) -> None:
        plain = self.fetch("/status")
        with mock.patch.object(
            ssc.ConsulStatusHandler,
            "_rendered",
            autospec=True,
            side_effect=ssc.ConsulStatusHandler._rendered,
        ) as rendered:
            for accept in ("*/*", "text/plain, text/*, */*", "application/json"):
                answer = self.fetch("/status", headers={"Accept": accept})
                assert (answer.code, answer.body) == (plain.code, plain.body)
            health = self.fetch(
                "/status", headers={"Accept": "application/health+json"}
            )
        assert health.headers["Content-Type"] == "application/health+json"
        assert rendered.call_count == 1  # health+json only: the rest were kept

    def test_a_status_that_changes_in_place_is_read_again(self) -> None:
        status = Said(ssc.OK)
        self._app.status = status  # type: ignore[attr-defined]
        try:
            assert self.body()[0] == 200
            status.value = ssc.MAINTENANCE
            assert self.body()[0] == 503
        finally:
            self._app.status = ssc.OK  # type: ignore[attr-defined]

    def test_a_name_that_changes_in_place_is_read_again(self) -> None:
        service = self._app.settings["service"] = Said("first")
        try:
            assert self.body()[1]["application"] == "first"
            service.value = "second"
            assert self.body()[1]["application"] == "second"
        finally:
            del self._app.settings["service"]

    def test_a_value_read_before_the_body_is_what_the_body_says(self) -> None:
        self.body()
        try:  # the second request reads what the first one set
            for seen, code in ((ssc.OK, 200), (ssc.MAINTENANCE, 503)):
                response = self.fetch("/reads-first?then=maintenance")
                assert (response.code, response.headers["X-Seen"]) == (code, seen)
                assert json.loads(response.body)["status"] == seen
        finally:
            self._app.status = ssc.OK  # type: ignore[attr-defined]

    def test_a_prepare_that_skips_super_still_answers(self) -> None:
        assert self.body("/skips-prepare")[0] == 200
        with consul_says(self._app, maintenance=True, reason="r"):
            assert self.body("/skips-prepare")[0] == 503
        assert self.body("/skips-prepare")[0] == 200

    def test_a_subclass_value_is_read_for_the_body(self) -> None:
        code, body = self.body("/says-maintenance")
        assert (code, body["status"], body["source"]) == (
            503,
            "maintenance",
            "application",
        )

    def test_a_hook_patched_on_a_later_base_shapes_the_body(self) -> None:
        assert "extra" not in self.body("/later")[1]

        def extra(handler: Any) -> dict[str, Any]:
            return {**ssc.StatusHandler._status_response(handler), "extra": True}

        with mock.patch.object(Later, "_status_response", extra, create=True):
            assert self.body("/later")[1]["extra"] is True
        assert "extra" not in self.body("/later")[1]

    def test_a_value_patched_on_the_handler_is_read(self) -> None:
        assert self.body()[0] == 200
        with mock.patch.object(
            ssc.ConsulStatusHandler, "own_status", new_callable=mock.PropertyMock
        ) as own:
            own.return_value = ssc.MAINTENANCE
            assert self.body()[0] == 503
        assert self.body()[0] == 200


def tornado_version() -> str:
    import tornado

    return tornado.version
