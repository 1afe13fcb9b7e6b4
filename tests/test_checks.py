"""The application's own checks: scheduling, counting, and what /status makes of them.

Each test runs its event loop in debug mode with warnings as errors, and
ends by checking that no task was left behind (see :func:`run_clean`).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import itertools
import json
import logging
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul import checks
from sprockets_status_consul import status as st
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .test_watcher import ScriptedConsul, maint, until

T = TypeVar("T")
HEALTH = {"Accept": "application/health+json"}


def run_clean(main: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run(main())`` in debug mode with warnings as errors.

    Fails when asyncio reports an error (a task destroyed while pending, an
    exception never retrieved) or a coroutine is never awaited.
    """
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    collect = Collect(logging.ERROR)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(collect)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = asyncio.run(main(), debug=True)  # type: ignore[arg-type]
            gc.collect()
    finally:
        asyncio_logger.removeHandler(collect)
    assert not errors, errors
    return result


async def stop_and_check_nothing_is_left(app: web.Application) -> None:
    await asyncio.wait_for(ssc.stop(app), 5)
    assert asyncio.all_tasks() == {asyncio.current_task()}


def result(app: web.Application, name: str) -> st.CheckResult:
    return next(r for r in checks.results(app) if r.name == name)


async def next_result(app: web.Application, name: str) -> st.CheckResult:
    """The next result of check ``name`` (the loop runs first at the await)."""
    last = result(app, name)
    await until(lambda: result(app, name) is not last)
    return result(app, name)


def test_runs_at_start_then_every_interval() -> None:
    async def main() -> list[float]:
        app = web.Application()
        runs: list[float] = []

        async def check() -> None:
            runs.append(time.monotonic())

        started = time.monotonic()
        ssc.add_check(app, "tick", check, interval=0.1)
        await until(lambda: len(runs) >= 4)
        assert runs[0] - started < 0.05  # the first run at once
        await stop_and_check_nothing_is_left(app)
        return runs

    runs = run_clean(main)
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    assert all(gap >= 0.09 for gap in gaps), gaps
    assert sorted(gaps)[len(gaps) // 2] < 0.2, gaps


def test_a_slow_run_is_cancelled_and_fails_with_the_timeout() -> None:
    async def main() -> None:
        app = web.Application()
        cancelled = asyncio.Event()

        async def hangs() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        ssc.add_check(app, "slow", hangs, interval=30, timeout=0.05)
        await until(lambda: result(app, "slow").time is not None)
        assert cancelled.is_set()
        slow = result(app, "slow")
        assert (slow.failing, slow.message) == (True, "timeout after 0.05 s")
        assert slow.duration is not None and 0.05 <= slow.duration < 1
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_fail_after_consecutive_failures_and_one_success_clears() -> None:
    async def main() -> None:
        app = web.Application()
        verdicts: asyncio.Queue[bool] = asyncio.Queue()

        async def scripted() -> bool:
            return await verdicts.get()

        ssc.add_check(app, "db", scripted, interval=0.001, timeout=5, fail_after=3)
        seen = []
        for verdict in (False, False, True, False, False, False, False, True):
            verdicts.put_nowait(verdict)
            seen.append((await next_result(app, "db")).failing)
        # Two failures do not count, the third in a row does, one success clears.
        assert seen == [False, False, False, False, False, True, True, False]
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_reasons_come_from_the_exception_or_false() -> None:
    async def main() -> None:
        app = web.Application()

        async def raises() -> None:
            raise ConnectionError("database at 10.0.0.5:5432\nrefused")

        async def empty() -> None:
            raise RuntimeError

        async def answers_false() -> bool:
            return False

        async def answers_true() -> bool:
            return True

        for name, check in (
            ("raises", raises),
            ("empty", empty),
            ("false", answers_false),
            ("true", answers_true),
        ):
            ssc.add_check(app, name, check)
        await until(lambda: all(r.time is not None for r in checks.results(app)))
        messages = {r.name: (r.failing, r.message) for r in checks.results(app)}
        assert messages == {
            "raises": (True, "database at 10.0.0.5:5432 refused"),
            "empty": (True, "RuntimeError"),
            "false": (True, "returned False"),
            "true": (False, None),
        }
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


class Abort(BaseException):
    """Not an Exception: what ``except Exception`` lets through."""


def test_a_check_raising_a_base_exception_fails_and_runs_again() -> None:
    async def main() -> None:
        app = web.Application()
        runs = 0

        async def aborts() -> None:
            nonlocal runs
            runs += 1
            if runs == 2:
                raise Abort("client gave up")

        def aborts_in_thread() -> None:
            raise Abort("sync client gave up")

        ssc.add_check(app, "db", aborts, interval=0.01)
        ssc.add_check(app, "cache", aborts_in_thread, interval=0.01)
        await until(lambda: result(app, "db").message == "client gave up")
        assert result(app, "db").failing
        await until(lambda: runs > 3 and not result(app, "db").failing)
        await until(lambda: result(app, "cache").message == "sync client gave up")
        assert result(app, "cache").failing
        await next_result(app, "cache")  # it runs again
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_a_sync_check_runs_in_the_executor() -> None:
    async def main() -> None:
        app = web.Application()
        threads: list[threading.Thread] = []

        def blocking() -> None:
            threads.append(threading.current_thread())
            time.sleep(0.05)  # would block the loop if run there

        ssc.add_check(app, "sync", blocking, interval=30)
        await until(lambda: result(app, "sync").time is not None)
        assert threads and threads[0] is not threading.main_thread()
        assert not result(app, "sync").failing
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_a_hung_sync_check_is_not_started_again_until_it_returns() -> None:
    release = threading.Event()
    calls = 0

    def hangs() -> None:
        nonlocal calls
        calls += 1
        release.wait(10)

    async def main() -> None:
        app = web.Application()
        ssc.add_check(app, "sync", hangs, interval=0.02, timeout=0.02)
        await until(lambda: result(app, "sync").time is not None)
        second = await next_result(app, "sync")
        assert calls == 1
        assert second.message == (
            "timeout after 0.02 s (the last run has not returned)"
        )
        release.set()
        await until(lambda: calls == 2, timeout=5)
        await stop_and_check_nothing_is_left(app)

    try:
        run_clean(main)
    finally:
        release.set()


def test_before_the_first_result_passing_unless_fail_closed() -> None:
    async def main() -> None:
        app = web.Application()
        gate = asyncio.Event()

        async def waits() -> None:
            await gate.wait()

        ssc.add_check(app, "open", waits, timeout=5)
        ssc.add_check(app, "closed", waits, timeout=5, fail_closed=True)
        before = {r.name: (r.failing, r.message, r.time) for r in checks.results(app)}
        assert before == {
            "open": (False, None, None),
            "closed": (True, "no result yet", None),
        }
        assert st.answer(st.OK, None, checks.results(app)) == st.Answer(
            st.MAINTENANCE, "check", "closed: no result yet"
        )
        gate.set()
        await until(lambda: not result(app, "closed").failing)
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_fail_closed_fails_until_the_first_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        app = web.Application()
        verdicts: asyncio.Queue[bool] = asyncio.Queue()

        async def scripted() -> bool:
            return await verdicts.get()

        ssc.add_check(
            app, "db", scripted, interval=0.001, fail_after=3, fail_closed=True
        )
        seen = []
        for verdict in (False, True, False):
            verdicts.put_nowait(verdict)
            seen.append((await next_result(app, "db")).failing)
        assert seen == [True, False, False]  # then fail_after counts
        await stop_and_check_nothing_is_left(app)

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        run_clean(main)
    assert [r.getMessage() for r in caplog.records] == [
        "check db failing: returned False",
        "check db passes again",
    ]

    run_clean(main)


def test_stop_cancels_a_run_in_progress() -> None:
    async def main() -> None:
        app = web.Application()
        running = asyncio.Event()
        cancelled = asyncio.Event()

        async def slow() -> None:
            running.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        ssc.add_check(app, "slow", slow, timeout=30)
        await asyncio.wait_for(running.wait(), 2)
        await stop_and_check_nothing_is_left(app)
        assert cancelled.is_set()
        assert result(app, "slow").time is None  # the cancelled run counts for nothing
        checks.start(app)  # a stop sticks
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run_clean(main)


def test_checks_added_before_the_loop_start_with_the_first_request() -> None:
    app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
    ran = threading.Event()
    ssc.add_check(app, "early", ran.set, interval=30)

    async def main() -> None:
        client = ScriptedConsul()
        _WATCHERS[app] = ConsulWatcher(Settings(), client=client)  # type: ignore[arg-type]
        assert not ran.is_set()
        assert checks.results(app)  # what the first request reads
        await until(lambda: ran.is_set())
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_checks_started_by_a_request_run_in_a_context_of_their_own() -> None:
    request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
        "request_id", default=None
    )
    seen: list[str | None] = []

    async def check() -> None:
        seen.append(request_id.get())

    app = web.Application()
    ssc.add_check(app, "db", check, interval=0.01)

    async def main() -> None:
        async def request() -> None:
            request_id.set("request-1")
            checks.results(app)  # what the first request reads

        await asyncio.create_task(request())
        await until(lambda: len(seen) >= 2)
        assert seen[:2] == [None, None]
        await stop_and_check_nothing_is_left(app)

    run_clean(main)


def test_checks_left_on_a_closed_loop_start_on_the_next() -> None:
    app = web.Application()
    ssc.add_check(app, "db", lambda: True, interval=30)

    async def first() -> None:
        await until(lambda: result(app, "db").time is not None)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(first())
    loop.close()  # the check's task still pending, never cancelled

    async def second() -> None:
        before = result(app, "db")
        assert checks.results(app)  # what a request reads
        await until(lambda: result(app, "db") is not before)
        await stop_and_check_nothing_is_left(app)

    asyncio.run(second())


def test_bad_arguments_are_refused_with_the_name() -> None:
    app = web.Application()

    async def check() -> None:
        pass

    ssc.add_check(app, "db", check)
    with pytest.raises(ValueError, match="already a check named 'db'"):
        ssc.add_check(app, "db", check)
    for name in ("", "a:b", "application"):
        with pytest.raises(ValueError, match="name"):
            ssc.add_check(app, name, check)
    with pytest.raises(TypeError, match="not callable"):
        ssc.add_check(app, "x", "SELECT 1")  # type: ignore[arg-type]
    for arguments in ({"interval": 0}, {"timeout": -1}, {"fail_after": 0}):
        with pytest.raises(ValueError, match=next(iter(arguments))):
            ssc.add_check(app, "x", check, **arguments)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="interval"):
        ssc.add_check(app, "x", check, interval="10")  # type: ignore[arg-type]


class CheckedHandlerTests(testing.AsyncHTTPTestCase):
    """ConsulStatusHandler over a scripted Consul, with checks."""

    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        _WATCHERS[app] = ConsulWatcher(Settings(), client=self.consul)  # type: ignore[arg-type]
        self.verdicts: dict[str, Any] = {"db": True, "cache": True}
        for name, critical in (("db", True), ("cache", False)):
            check = self.scripted(name)
            ssc.add_check(app, name, check, interval=0.01, critical=critical)
        return app

    def scripted(self, name: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            verdict = self.verdicts[name]
            if isinstance(verdict, Exception):
                raise verdict
            return bool(verdict)

        return check

    def tearDown(self) -> None:
        self.io_loop.run_sync(lambda: ssc.stop(self._app))
        super().tearDown()

    def get(self, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        response = self.fetch("/status", headers=headers)
        return response.code, json.loads(response.body)

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        self.io_loop.run_sync(lambda: until(predicate))

    def failing(self, name: str) -> bool:
        return result(self._app, name).failing

    def test_a_failing_critical_check_is_503_with_its_name_and_reason(self) -> None:
        self.consul.answer(3)
        assert self.get()[0] == 200
        self.verdicts["db"] = ConnectionError("refused")
        self.wait_for(lambda: self.failing("db"))
        code, body = self.get()
        assert (code, body["status"]) == (503, "maintenance")
        assert (body["source"], body["reason"]) == ("check", "db: refused")

    def test_a_failing_non_critical_check_warns_and_stays_200(self) -> None:
        self.consul.answer(3)
        self.verdicts["cache"] = False
        self.wait_for(lambda: self.failing("cache"))
        code, body = self.get()
        assert (code, body["status"]) == (200, "ok")
        assert "source" not in body
        code, body = self.get(HEALTH)
        assert (code, body["status"]) == (200, "warn")
        cache = body["checks"]["cache:status"][0]
        assert (cache["status"], cache["output"]) == ("warn", "returned False")
        assert body["checks"]["db:status"][0]["status"] == "pass"

    def test_health_json_has_one_entry_per_check_with_time_and_duration(self) -> None:
        self.consul.answer(3)
        self.wait_for(lambda: all(r.time for r in checks.results(self._app)))
        before = time.time()
        code, body = self.get(HEALTH)
        assert code == 200
        for name in ("db", "cache"):
            entry = body["checks"][f"{name}:status"][0]
            assert entry["status"] == "pass"
            assert entry["observedUnit"] == "ms"
            assert 0 <= entry["observedValue"] < 1000
            ran = time.mktime(time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S"))
            assert before - 5 < ran - time.timezone <= before + 1, entry["time"]
            assert entry["time"].endswith("Z")

    def test_consul_and_the_application_come_before_checks(self) -> None:
        self.verdicts["db"] = False
        self.consul.answer(3, maint("deploy 42"))
        self.wait_for(lambda: self.failing("db"))
        code, body = self.get()
        assert (code, body["source"], body["reason"]) == (503, "node", "deploy 42")
        self._app.status = ssc.DRAINING  # type: ignore[attr-defined]
        code, body = self.get()
        assert (code, body["status"]) == (503, "draining")
        assert body["source"] == "application"

    def test_liveness_ignores_checks(self) -> None:
        self._app.add_handlers(r".*", [(r"/live", ssc.LivenessHandler)])
        self.verdicts["db"] = False
        self.wait_for(lambda: self.failing("db"))
        assert self.get()[0] == 503
        response = self.fetch("/live", headers=HEALTH)
        assert response.code == 200
        assert set(json.loads(response.body)["checks"]) == {"process:alive"}


class SlowCheckTests(testing.AsyncHTTPTestCase):
    """A request never waits on a check, not even on the first run."""

    def get_app(self) -> web.Application:
        app = web.Application([(r"/status", ssc.ConsulStatusHandler)])
        self.consul = ScriptedConsul()
        _WATCHERS[app] = ConsulWatcher(Settings(), client=self.consul)  # type: ignore[arg-type]
        self.started = threading.Event()

        async def slow() -> None:
            self.started.set()
            await asyncio.sleep(5)

        ssc.add_check(app, "slow", slow, timeout=10)
        return app

    def tearDown(self) -> None:
        self.io_loop.run_sync(lambda: ssc.stop(self._app))
        super().tearDown()

    def test_the_first_requests_do_not_wait_for_a_slow_check(self) -> None:
        self.consul.answer(3)
        for _ in range(20):
            started = time.monotonic()
            response = self.fetch("/status", headers=HEALTH)
            assert time.monotonic() - started < 1
            assert response.code == 200
        assert self.started.is_set()
        entry = json.loads(response.body)["checks"]["slow:status"][0]
        assert entry == {"status": "pass", "componentType": "component"}
