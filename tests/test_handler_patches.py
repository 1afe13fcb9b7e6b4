"""A per-request value or hook patched on an intermediate class, a mixin or a
later base after the classes are made is what the answer says."""

from __future__ import annotations

from unittest import mock

from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.status import ConsulStatus
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .test_watcher import ScriptedConsul


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
