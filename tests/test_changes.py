"""What /status answers, composed from its sources; the listeners told of changes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from tornado import httpclient, web

import sprockets_status_consul as ssc
from sprockets_status_consul import changes
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .consul_agent import free_port
from .test_checks import run_clean
from .test_watcher import ScriptedConsul, maint, until

OK = st.ANSWER_OK
NODE = st.ConsulStatus(st.MAINTENANCE, st.CONNECTED, "deploy 42", "node")
CONNECTED = st.ConsulStatus(st.OK, st.CONNECTED)
DB_DOWN = st.CheckResult("db", critical=True, failing=True, message="refused")
CACHE_DOWN = st.CheckResult("cache", critical=False, failing=True, message="slow")
DB_UP = st.CheckResult("db", critical=True, failing=False)
DB_ANSWER = st.Answer(st.MAINTENANCE, "check", "db: refused")


@pytest.mark.parametrize(
    ("own", "consul", "results", "expected"),
    [
        (st.OK, None, (), OK),
        (st.OK, CONNECTED, (DB_UP, CACHE_DOWN), OK),
        (st.OK, CONNECTED, (CACHE_DOWN, DB_DOWN), DB_ANSWER),
        (st.OK, NODE, (DB_DOWN,), st.Answer(st.MAINTENANCE, "node", "deploy 42")),
        (st.MAINTENANCE, NODE, (DB_DOWN,), st.Answer(st.MAINTENANCE, "application")),
        (st.DRAINING, CONNECTED, (), st.Answer(st.DRAINING, "application")),
        ("broken", None, (), st.Answer("broken", "application")),
    ],
)
def test_the_order_of_precedence(
    own: str,
    consul: st.ConsulStatus | None,
    results: tuple[st.CheckResult, ...],
    expected: st.Answer,
) -> None:
    assert st.answer(own, consul, results) == expected


class Recorder:
    """A listener that keeps what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[st.Answer, st.Answer]] = []

    def __call__(self, old: st.Answer, new: st.Answer) -> None:
        self.calls.append((old, new))

    def statuses(self) -> list[tuple[str | None, str | None]]:
        return [(new.status, new.source) for _, new in self.calls]


def scripted_app() -> tuple[web.Application, ScriptedConsul, ConsulWatcher]:
    app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
    consul = ScriptedConsul()
    watcher = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
    _WATCHERS[app] = watcher
    return app, consul, watcher


def test_listeners_are_told_once_per_change_never_per_request() -> None:
    async def main() -> None:
        app, consul, _ = scripted_app()
        recorder = Recorder()
        ssc.on_change(app, recorder)
        server = app.listen(port := free_port(), address="127.0.0.1")
        client = httpclient.AsyncHTTPClient()
        url = f"http://127.0.0.1:{port}/status"

        async def requests(code: int) -> None:
            for _ in range(20):
                response = await client.fetch(url, raise_error=False)
                assert response.code == code

        try:
            consul.answer(3)
            await requests(200)
            assert recorder.calls == []  # starting -> connected: the answer is ok
            consul.answer(4, maint("deploy 42"))
            await until(lambda: len(recorder.calls) == 1)
            await requests(503)
            consul.answer(5, maint("deploy 42"))  # the same answer again
            await until(lambda: len(consul.calls) == 4)
            await requests(503)
            consul.answer(6)
            await until(lambda: len(recorder.calls) == 2)
            await requests(200)
            assert recorder.calls == [
                (OK, st.Answer(st.MAINTENANCE, "node", "deploy 42")),
                (st.Answer(st.MAINTENANCE, "node", "deploy 42"), OK),
            ]
            assert changes.changes(app) == 2
        finally:
            server.stop()
            await ssc.stop(app)

    run_clean(main)


def test_a_failing_listener_is_logged_once_and_changes_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        app, consul, watcher = scripted_app()

        def broken(old: st.Answer, new: st.Answer) -> None:
            raise RuntimeError("listener bug")

        async_calls = 0

        async def broken_async(old: st.Answer, new: st.Answer) -> None:
            nonlocal async_calls
            async_calls += 1
            raise RuntimeError("async listener bug")

        recorder = Recorder()
        ssc.on_change(app, broken)
        ssc.on_change(app, broken_async)
        ssc.on_change(app, recorder)
        watcher.start()
        for told in range(1, 5):
            consul.answer(told + 2, *([maint()] if told % 2 else []))
            await until(lambda: len(recorder.calls) == told)  # noqa: B023
        await until(lambda: async_calls == 4)
        assert recorder.statuses() == [("maintenance", "node"), ("ok", None)] * 2
        assert watcher.status().status == st.OK
        await ssc.stop(app)

    with caplog.at_level(logging.ERROR, logger="sprockets_status_consul"):
        run_clean(main)
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == 2, [r.getMessage() for r in failures]
    assert {str(r.exc_info[1]) for r in failures if r.exc_info} == {
        "listener bug",
        "async listener bug",
    }


def test_an_async_listener_sees_the_changes_in_order() -> None:
    async def main() -> None:
        app, consul, watcher = scripted_app()
        seen: list[str | None] = []
        active = 0

        async def slow(old: st.Answer, new: st.Answer) -> None:
            nonlocal active
            active += 1
            assert active == 1, "called again before the last call finished"
            await asyncio.sleep(0.02)
            seen.append(new.reason)
            active -= 1

        ssc.on_change(app, slow)
        watcher.start()
        reasons = ["one", None, "two", None, "three"]
        for index, reason in enumerate(reasons):
            consul.answer(index + 3, *([maint(reason)] if reason else []))
        await until(lambda: len(seen) == len(reasons))
        assert seen == reasons
        await ssc.stop(app)

    run_clean(main)


def test_the_applications_own_status_drain_and_checks_are_noticed() -> None:
    async def main() -> None:
        app, consul, watcher = scripted_app()
        recorder = Recorder()
        remove = ssc.on_change(app, recorder)
        verdict: dict[str, Any] = {"db": True}

        async def database() -> bool:
            return bool(verdict["db"])

        ssc.add_check(app, "db", database, interval=0.005)
        watcher.start()
        consul.answer(3)
        app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        assert recorder.calls == []
        ssc.status_changed(app)
        app.status = ssc.OK  # type: ignore[attr-defined]
        ssc.status_changed(app)
        verdict["db"] = False
        await until(lambda: len(recorder.calls) == 3)
        assert recorder.statuses() == [
            ("maintenance", "application"),
            ("ok", None),
            ("maintenance", "check"),
        ]
        assert recorder.calls[2][1].reason == "db: returned False"
        remove()
        app.status = ssc.MAINTENANCE  # type: ignore[attr-defined]
        ssc.status_changed(app)
        assert len(recorder.calls) == 3
        await ssc.stop(app)

    run_clean(main)


def test_drain_tells_the_listeners_at_once() -> None:
    async def main() -> None:
        app, consul, watcher = scripted_app()
        recorder = Recorder()
        ssc.on_change(app, recorder)
        watcher.start()
        consul.answer(3)
        await until(lambda: watcher.ready)
        done = asyncio.Event()
        draining = asyncio.ensure_future(ssc.drain(app, None, grace=30, cut_short=done))
        await until(lambda: bool(recorder.calls))  # well before the grace ends
        assert recorder.calls == [(OK, st.Answer(st.DRAINING, "application"))]
        done.set()
        await draining

    run_clean(main)


def test_fail_closed_going_stale_is_noticed_at_a_retry() -> None:
    async def main() -> None:
        app = web.Application()
        consul = ScriptedConsul()
        settings = Settings(ttl=0.2, failure_mode="closed", retry_max=0.05)
        watcher = ConsulWatcher(settings, client=consul)  # type: ignore[arg-type]
        _WATCHERS[app] = watcher
        recorder = Recorder()
        ssc.on_change(app, recorder)
        watcher.start()
        consul.answer(3)
        await until(lambda: recorder.statuses() == [("ok", None)])  # from starting
        for _ in range(200):
            consul.fail(ssc.ConsulError("cannot reach http://127.0.0.1:8500"))
        await until(lambda: len(recorder.calls) == 2)  # one ttl later
        assert recorder.calls[1] == (
            OK,
            st.Answer(st.MAINTENANCE, "consul", "cannot reach http://127.0.0.1:8500"),
        )
        await ssc.stop(app)

    run_clean(main)


class Abort(BaseException):
    """Not an Exception: what ``except Exception`` lets through."""


def test_a_listener_raising_a_base_exception_stops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        app, consul, watcher = scripted_app()

        def broken(old: st.Answer, new: st.Answer) -> None:
            raise Abort("listener bug")

        recorder = Recorder()
        ssc.on_change(app, broken)
        ssc.on_change(app, recorder)
        watcher.start()
        for told in range(1, 3):
            consul.answer(told + 2, *([maint()] if told % 2 else []))
            await until(lambda: len(recorder.calls) == told)  # noqa: B023
        assert watcher.running
        assert watcher.status().consul == st.CONNECTED
        await ssc.stop(app)

    with caplog.at_level(logging.ERROR, logger="sprockets_status_consul"):
        run_clean(main)
    failures = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
