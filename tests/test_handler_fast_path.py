"""The answer read from its sources (a request without ``Accept``) is the one
the values compose (``Accept: application/json`` takes that path): with values
assigned before ``get``, a ``_consul`` of a subclass, ``__bases__`` assigned,
a status that changes in place, the functions the answer comes from patched,
and ``__getattribute__`` overridden (from an outside review)."""

from __future__ import annotations

import enum
import functools
import json
from typing import Any, ClassVar
from unittest import mock

from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import handler as handler_module
from sprockets_status_consul import status as st
from sprockets_status_consul.status import ConsulStatus
from sprockets_status_consul.testing import consul_says
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

CONNECTED = ConsulStatus(ssc.OK, st.CONNECTED, sources=())


# 1. a value *assigned* (not read) before get
class ForcedByPrepare(ssc.ConsulStatusHandler):
    def prepare(self) -> Any:
        self.own_status = ssc.MAINTENANCE  # e.g. a "maintenance switch" mixin
        return super().prepare()


class ForcedByInitialize(ssc.ConsulStatusHandler):
    def initialize(self, forced: str | None = None) -> None:
        if forced is not None:
            self.own_status = forced


# 2. an answer assigned for some requests only: cross-request contamination
class ForcesOnQuery(ssc.ConsulStatusHandler):
    def prepare(self) -> Any:
        if self.get_query_argument("force", None):
            self.answer = st.Answer(ssc.MAINTENANCE, "manual", "forced")
        return super().prepare()


# 3. _consul given by a subclass
FAKE = ConsulStatus(ssc.MAINTENANCE, st.CONNECTED, "from subclass", "node")


class OwnWatcherProperty(ssc.ConsulStatusHandler):
    @property
    def _consul(self) -> Any:  # type: ignore[override]
        return ConsulWatcher.answering(FAKE)


class OwnWatcherCached(ssc.ConsulStatusHandler):
    @functools.cached_property
    def _consul(self) -> Any:  # type: ignore[override]
        return ConsulWatcher.answering(FAKE)


# 4. __bases__ reassignment
class Plain:
    pass


class Switchable(Plain, ssc.ConsulStatusHandler):
    pass


class SaysMaintenanceMixin:
    @property
    def own_status(self) -> str:
        return ssc.MAINTENANCE


# 5. mutable application.status
class State:
    def __init__(self) -> None:
        self.value = ssc.OK

    def __str__(self) -> str:
        return self.value


# 7. __getattribute__
class Intercepts(ssc.ConsulStatusHandler):
    def __getattribute__(self, name: str) -> Any:
        if name == "answer" and object.__getattribute__(self, "request").query == "x":
            return st.Answer(ssc.MAINTENANCE, "intercepted", "x")
        return super().__getattribute__(name)


class AnswersAlike(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application(
            [
                (r"/status", ssc.ConsulStatusHandler),
                (r"/forced-prepare", ForcedByPrepare),
                (r"/forced-init", ForcedByInitialize, {"forced": ssc.MAINTENANCE}),
                (r"/forces", ForcesOnQuery),
                (r"/own-prop", OwnWatcherProperty),
                (r"/own-cached", OwnWatcherCached),
                (r"/switch", Switchable),
                (r"/intercepts", Intercepts),
            ]
        )
        _WATCHERS[app] = ConsulWatcher.answering(CONNECTED)
        return app

    def both(self, path: str) -> tuple[tuple[int, Any], tuple[int, Any]]:
        fast = self.fetch(path)
        slow = self.fetch(path, headers={"Accept": "application/json"})
        return (fast.code, json.loads(fast.body)), (slow.code, json.loads(slow.body))

    def test_1_assigned_in_prepare(self) -> None:
        fast, slow = self.both("/forced-prepare")
        assert fast == slow

    def test_1b_assigned_in_initialize(self) -> None:
        fast, slow = self.both("/forced-init")
        assert fast == slow

    def test_2_contamination(self) -> None:
        r1 = self.fetch("/forces?force=1")
        r2 = self.fetch("/forces")
        r3 = self.fetch("/forces?force=1")
        assert r2.code == 200 and r1.code == 503 and r3.code == 503

    def test_3_consul_property(self) -> None:
        r = self.fetch("/own-prop")
        assert r.code == 503

    def test_3b_consul_cached_property(self) -> None:
        r = self.fetch("/own-cached")
        assert r.code == 503

    def test_4_bases_reassigned(self) -> None:
        assert self.fetch("/switch").code == 200
        Switchable.__bases__ = (SaysMaintenanceMixin, ssc.ConsulStatusHandler)
        try:
            fast, slow = self.both("/switch")
            assert fast == slow
        finally:
            Switchable.__bases__ = (Plain, ssc.ConsulStatusHandler)

    def test_5_mutable_status(self) -> None:
        state = State()
        self._app.status = state
        assert self.fetch("/status").code == 200
        state.value = ssc.MAINTENANCE
        fast, slow = self.both("/status")
        assert fast == slow

    def test_6_identity_patched(self) -> None:
        assert self.fetch("/status").code == 200
        with mock.patch.object(
            handler_module, "application_identity", return_value=("patched", "0.0")
        ):
            fast, slow = self.both("/status")
        assert fast == slow

    def test_6b_answer_patched(self) -> None:
        assert self.fetch("/status").code == 200
        with mock.patch.object(
            st, "answer", return_value=st.Answer(ssc.MAINTENANCE, "patched", "p")
        ):
            fast, slow = self.both("/status")
        assert fast == slow

    def test_7_getattribute(self) -> None:
        assert self.fetch("/intercepts").code == 200
        r = self.fetch("/intercepts?x")
        assert r.code == 503


class Registry(ssc.ConsulStatusHandler):
    registered: ClassVar[list[type]] = []

    def __init_subclass__(
        cls, **kwargs: Any
    ) -> None:  # forgets super().__init_subclass__
        Registry.registered.append(cls)


class ChildSaysMaintenance(Registry):
    @property
    def own_status(self) -> str:  # type: ignore[override]
        return ssc.MAINTENANCE


class ChildPerRequest(Registry):
    @ssc.handler._per_request
    def own_status(self) -> str:  # type: ignore[override]
        return ssc.MAINTENANCE


class Seen(ssc.ConsulStatusHandler):
    seen: ClassVar[list[tuple[str, ...]]] = []

    def on_finish(self) -> None:
        Seen.seen.append(
            (self.answer.status, self.own_status, self.consul_status.consul)
        )


class S(str, enum.Enum):
    OK = "ok"
    MAINT = "maintenance"


class SubclassesAndOddValues(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = web.Application(
            [
                (r"/status", ssc.ConsulStatusHandler),
                (r"/child-prop", ChildSaysMaintenance),
                (r"/child-pr", ChildPerRequest),
                (r"/seen", Seen),
            ]
        )
        _WATCHERS[app] = ConsulWatcher.answering(ConsulStatus(ssc.OK, st.CONNECTED))
        return app

    def both(self, path: str, **kw: Any) -> Any:
        fast = self.fetch(path, **kw)
        slow = self.fetch(path, headers={"Accept": "application/json"}, **kw)
        return (fast.code, fast.body), (slow.code, slow.body)

    def test_init_subclass_without_super_property(self) -> None:
        fast, slow = self.both("/child-prop")
        assert fast == slow

    def test_init_subclass_without_super_per_request(self) -> None:
        fast, slow = self.both("/child-pr")
        assert fast == slow

    # --- things expected to be right ---
    def test_head(self) -> None:
        self.fetch("/status")
        h = self.fetch("/status", method="HEAD")
        g = self.fetch("/status")
        assert (
            h.code == g.code
            and h.body == b""
            and h.headers["Content-Length"] == g.headers["Content-Length"]
        )

    def test_stale_age(self) -> None:
        with consul_says(self._app, consul=st.STALE):
            pass
        watcher = ConsulWatcher.answering(ConsulStatus(ssc.OK, st.STALE, age=3.5))
        _WATCHERS[self._app] = watcher
        fast, slow = self.both("/status")
        assert fast == slow and b"consul_age" in fast[1]

    def test_enum_and_int_status(self) -> None:
        for value in (S.OK, S.MAINT, 500, 0, None, ""):
            self._app.status = value
            fast, slow = self.both("/status")
            fast2, _ = self.both("/status")
            assert fast == slow == fast2, (value, fast, slow)

    def test_on_finish_reads_values(self) -> None:
        self.fetch("/seen")
        self.fetch("/seen")
        with consul_says(self._app, maintenance=True):
            self.fetch("/seen")
        assert Seen.seen == [("ok", "ok", "connected")] * 2 + [
            ("maintenance", "ok", "connected")
        ], Seen.seen

    def test_two_apps_one_class(self) -> None:
        other = web.Application(
            [(r"/status", ssc.ConsulStatusHandler)], service="other", version="2"
        )
        _WATCHERS[other] = ConsulWatcher.answering(
            ConsulStatus(ssc.MAINTENANCE, st.CONNECTED, "x", "node")
        )
        from tornado import httputil

        from bench.handler_cost import Connection as _Connection
        from bench.handler_cost import serve as _serve

        async def one(app):
            c = _Connection()
            await _serve(app, c, httputil.HTTPHeaders({"Host": "x"}))
            return c.written

        for _ in range(3):
            a = self.io_loop.run_sync(lambda: one(self._app))
            b = self.io_loop.run_sync(lambda: one(other))
            assert a[0] == b"200" and b[0] == b"503" and b'"other"' in b[-1], (a, b)
