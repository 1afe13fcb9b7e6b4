"""The watcher's state machine, driven by a scripted transport.

These are unit tests of the loop's decisions (index handling, backoff, the
failure policy, logging once per change of state). What Consul really answers
is covered by the integration tests against a real agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import itertools
import logging
import os
import pathlib
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado import web

from sprockets_status_consul import checks
from sprockets_status_consul import status as st
from sprockets_status_consul import watcher as watcher_module
from sprockets_status_consul.settings import Settings, SettingsError
from sprockets_status_consul.transport import Check, ConsulClient, ConsulError
from sprockets_status_consul.watcher import ConsulWatcher

from .consul_agent import AgentBase, free_port

SERF = {"CheckID": "serfHealth", "Status": "passing", "Notes": ""}


def maint(reason: str = "deploy 42") -> Check:
    return {"CheckID": "_node_maintenance", "Status": "critical", "Notes": reason}


class ScriptedConsul:
    """Answers the watcher's queries from a script, one item per query."""

    def __init__(self, node: str = "node-1") -> None:
        self.node = node
        self.name_calls = 0
        self.calls: list[tuple[str, int, float | None, float]] = []
        self.answers: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    async def node_name(self) -> str:
        self.name_calls += 1
        return self.node

    async def node_checks(
        self, node: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, list[Check]]:
        self.calls.append((node, index, wait, time.monotonic()))
        answer = await self.answers.get()
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    def answer(self, index: int, *checks: Check) -> None:
        self.answers.put_nowait((index, [SERF, *checks]))

    def fail(self, error: BaseException) -> None:
        self.answers.put_nowait(error)

    def close(self) -> None:
        self.closed = True


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


def run(
    test: Callable[[ConsulWatcher, ScriptedConsul], Awaitable[None]],
    **settings: Any,
) -> ScriptedConsul:
    """Run ``test`` with a started watcher over a scripted transport."""

    async def main() -> ScriptedConsul:
        client = ScriptedConsul()
        watcher = ConsulWatcher(Settings(**settings), client=client)  # type: ignore[arg-type]
        watcher.start()
        try:
            await test(watcher, client)
        finally:
            await watcher.stop()
        return client

    return asyncio.run(main())


def test_first_query_does_not_block_then_blocks_on_the_index() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(7)
        await until(lambda: len(consul.calls) == 2)
        status = watcher.status()
        assert (status.status, status.consul, status.age) == (st.OK, st.CONNECTED, None)
        assert status.sources == (
            st.SourceAnswer("node", "node-1", False, consul=st.CONNECTED),
        )
        assert watcher.node == "node-1"

    consul = run(test, ttl=3.0)
    assert [c[1] for c in consul.calls] == [0, 7]
    assert consul.calls[0][2] is None
    wait = consul.calls[1][2]
    assert wait is not None
    assert 3.0 * (1 - watcher_module.WAIT_JITTER) <= wait <= 3.0
    assert consul.name_calls == 1
    assert consul.closed


def test_node_setting_is_not_asked_of_the_agent() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(3)
        await until(lambda: len(consul.calls) == 2)

    consul = run(test, node="configured")
    assert consul.name_calls == 0
    assert consul.calls[0][0] == "configured"


def test_maintenance_follows_the_check_with_its_reason() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(5)
        await until(lambda: len(consul.calls) == 2)
        assert watcher.status().status == st.OK
        consul.answer(9, maint("deploy 42"))
        await until(lambda: watcher.status().status == st.MAINTENANCE)
        status = watcher.status()
        assert (status.source, status.reason) == ("node", "deploy 42")
        consul.answer(12, {**maint(), "Status": "passing"})
        await until(lambda: watcher.status().status == st.OK)
        await until(lambda: len(consul.calls) == 4)

    consul = run(test)
    assert [c[1] for c in consul.calls] == [0, 5, 9, 12]


def test_node_and_service_maintenance_each_show_in_their_own_source() -> None:
    service = {"CheckID": "_service_maintenance:web-1", "Status": "critical"}

    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(5, maint("node down"), {**service, "Notes": "canary bad"})
        await until(lambda: watcher.status().status == st.MAINTENANCE)
        status = watcher.status()
        assert (status.source, status.reason) == ("node", "node down")
        assert status.sources == (
            st.SourceAnswer("node", "node-1", True, "node down"),
            st.SourceAnswer("service", "web-1", True, "canary bad"),
        )
        consul.answer(7, service)  # no notes: the reason says what it is
        await until(lambda: watcher.status().source == "service")
        assert watcher.status().reason == "service maintenance"

    run(test, service="web-1")


def test_index_going_backwards_resets_to_a_non_blocking_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(100)
        consul.answer(4)  # a restarted agent
        consul.answer(6)
        await until(lambda: len(consul.calls) == 4)

    with caplog.at_level(logging.INFO):
        consul = run(test)
    assert [(c[1], c[2] is not None) for c in consul.calls] == [
        (0, False),
        (100, True),
        (0, False),
        (6, True),
    ]
    assert "index went back from 100 to 4" in caplog.text


def test_index_zero_is_never_blocked_on() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(0)
        await until(lambda: len(consul.calls) == 2)

    consul = run(test)
    assert consul.calls[1][1] == 1


@pytest.mark.parametrize("indexes", [(5, 5, 5, 5), (5, 6, 7, 8)])
def test_blocking_queries_of_a_source_are_never_closer_than_the_interval(
    indexes: tuple[int, ...],
) -> None:
    """Unchanged or not, an early answer is not followed by a query at once."""

    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        for index in indexes:
            consul.answer(index)
        await until(lambda: len(consul.calls) == len(indexes) + 1)

    consul = run(test)
    # From the first blocking query on (the first, not blocking, is let go).
    starts = [c[3] for c in consul.calls[1:]]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= watcher_module.MIN_QUERY_INTERVAL
    assert max(gaps) < 1.0


def test_the_blocking_wait_is_jittered_below_the_ttl() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        for index in range(5, 10):
            consul.answer(index)
        await until(lambda: len(consul.calls) == 6)

    consul = run(test, ttl=10.0)
    waits = [c[2] for c in consul.calls[1:]]
    assert all(w is not None and 9.0 <= w <= 10.0 for w in waits), waits
    assert len(set(waits)) == len(waits)


def test_errors_keep_the_last_answer_then_go_stale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(5, maint("before the outage"))
        await until(lambda: watcher.status().status == st.MAINTENANCE)
        for _ in range(5):
            consul.fail(ConsulError("cannot reach http://127.0.0.1:1: refused"))
        await until(lambda: watcher.status().consul == st.UNREACHABLE)
        status = watcher.status()
        assert (status.status, status.reason) == (st.MAINTENANCE, "before the outage")
        assert status.age is not None
        await until(lambda: watcher.status().consul == st.STALE)
        assert watcher.status().status == st.MAINTENANCE
        await until(lambda: consul.answers.empty() and len(consul.calls) >= 7)
        consul.answer(8)
        await until(lambda: watcher.status().consul == st.CONNECTED)
        assert watcher.status().status == st.OK

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        consul = run(test, ttl=0.2, retry_max=0.02)
    # After an error the next query does not block: the agent may be new.
    assert [c[1] for c in consul.calls[:8]] == [0, 5, 0, 0, 0, 0, 0, 8]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "refused" in warnings[0].getMessage()
    assert "answers again" in caplog.text


def test_fail_open_reports_ok_when_nothing_was_ever_known() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.fail(ConsulError("nope"))
        await until(lambda: watcher.ready)
        status = watcher.status()
        assert (status.status, status.consul, status.age) == (st.OK, st.STALE, None)

    run(test, retry_max=10.0)


def test_fail_closed_reports_maintenance_once_stale() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        assert watcher.status().status == st.MAINTENANCE  # no answer yet
        consul.answer(5)
        await until(lambda: watcher.status().status == st.OK)
        consul.fail(ConsulError("answered 500"))
        await until(lambda: watcher.status().consul == st.UNREACHABLE)
        assert watcher.status().status == st.OK  # within the TTL
        await until(lambda: watcher.status().consul == st.STALE)
        status = watcher.status()
        assert (status.status, status.source) == (st.MAINTENANCE, "consul")
        assert status.reason is not None and "answered 500" in status.reason

    run(test, ttl=0.1, retry_max=10.0, failure_mode="closed")


def test_unknown_node_is_an_error() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answers.put_nowait((3, []))
        await until(lambda: watcher.ready)
        assert watcher.status().consul == st.STALE

    run(test, retry_max=10.0)


def test_a_bug_is_logged_once_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        for _ in range(3):
            consul.fail(RuntimeError("surprise"))
        consul.answer(4)
        await until(lambda: watcher.status().consul == st.CONNECTED)

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        run(test, retry_max=0.01)
    assert caplog.text.count("Traceback") == 1


def test_the_first_bug_of_each_kind_is_logged_even_after_consul_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.fail(ConsulError("cannot reach the agent"))
        consul.fail(RuntimeError("surprise"))
        consul.fail(RuntimeError("surprise again"))
        consul.fail(KeyError("Checks"))
        consul.answer(4)
        await until(lambda: watcher.status().consul == st.CONNECTED)

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        run(test, retry_max=0.01)
    tracebacks = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [type(e) for e in tracebacks] == [RuntimeError, KeyError]
    assert str(tracebacks[0]) == "surprise"


def test_ttl_polling_without_blocking_queries() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        for index in (5, 6, 7):
            consul.answer(index)
        await until(lambda: len(consul.calls) == 4)

    consul = run(test, blocking=False, ttl=0.05)
    assert all((c[1], c[2]) == (0, None) for c in consul.calls)
    gaps = [b[3] - a[3] for a, b in itertools.pairwise(consul.calls)]
    assert min(gaps) >= 0.045


@pytest.mark.parametrize("failures", [1, 2, 5, 10, 100])
def test_backoff_is_capped_with_jitter(failures: int) -> None:
    delays = {watcher_module._backoff(failures, 3.0) for _ in range(50)}
    ceiling = min(3.0, watcher_module.RETRY_MIN * 2 ** (failures - 1))
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(delays) > 1


def test_stop_ends_the_loop_and_closes_the_client() -> None:
    async def main() -> None:
        consul = ScriptedConsul()
        watcher = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
        watcher.start()
        await until(lambda: len(consul.calls) == 1)  # a query waits forever
        tasks = list(watcher._tasks)
        await watcher.stop()
        assert all(t.done() for t in tasks)
        assert consul.closed
        assert not watcher.running

    asyncio.run(main())


def test_a_cancelled_loop_closes_the_client() -> None:
    """asyncio.run cancels what is left: the watcher closes its connections."""

    async def main() -> ScriptedConsul:
        consul = ScriptedConsul()
        watcher = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
        watcher.start()
        await until(lambda: len(consul.calls) == 1)
        return consul

    consul = asyncio.run(main())
    assert consul.closed


class Abort(BaseException):
    """Not an Exception: what ``except Exception`` lets through."""


class ScriptedKeyConsul(ScriptedConsul):
    """Also answers the key source, with a query that never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.key_calls = 0

    async def kv_value(
        self, key: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, bytes | None]:
        self.key_calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_source_loop_that_ends_ends_the_others() -> None:
    async def main() -> None:
        consul = ScriptedKeyConsul()
        watcher = ConsulWatcher(Settings(key="k"), client=consul)  # type: ignore[arg-type]
        watcher.start()
        tasks = list(watcher._tasks)
        await until(lambda: consul.key_calls == 1)
        consul.fail(Abort())
        await until(lambda: all(task.done() for task in tasks))
        assert watcher.status().consul == st.STOPPED
        await watcher.stop()

    asyncio.run(main())


def test_an_observer_raising_a_base_exception_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def observer(watcher: ConsulWatcher) -> None:
        raise Abort("observer bug")

    monkeypatch.setattr(watcher_module, "OBSERVERS", [observer])

    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(3)
        consul.answer(4, maint())
        await until(lambda: watcher.status().status == st.MAINTENANCE)
        assert watcher.running

    with caplog.at_level(logging.ERROR, logger="sprockets_status_consul"):
        run(test)
    assert [str(r.exc_info[1]) for r in caplog.records if r.exc_info] == [
        "observer bug"
    ]


def test_fail_closed_tolerates_one_ttl_from_the_start_of_the_outage() -> None:
    """However late in a blocking wait Consul fails, the grace is a whole TTL."""

    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(5)
        await until(lambda: watcher.status().consul == st.CONNECTED)
        await asyncio.sleep(0.25)  # the blocking query has waited most of a TTL
        consul.fail(ConsulError("cannot reach the agent"))
        await until(lambda: watcher.status().consul == st.UNREACHABLE)
        failed = time.monotonic()
        assert watcher.status().status == st.OK
        await until(lambda: watcher.status().consul == st.STALE, timeout=2)
        assert time.monotonic() - failed >= 0.3 * 0.9
        assert watcher.status().status == st.MAINTENANCE

    run(test, ttl=0.3, retry_max=30.0, failure_mode="closed")


def test_a_stopped_watcher_cannot_start_again() -> None:
    async def main() -> None:
        watcher = ConsulWatcher(Settings(), client=ScriptedConsul())  # type: ignore[arg-type]
        watcher.start()
        await watcher.stop()
        with pytest.raises(RuntimeError, match="cannot be started again"):
            watcher.start()

    asyncio.run(main())


def test_watch_outside_the_loop_shares_the_running_watcher() -> None:
    """Asked from another thread, watch() neither replaces nor orphans it."""

    async def main() -> None:
        app = web.Application(consul_status={"address": "127.0.0.1:1"})
        watcher = watcher_module.watch(app)
        from_thread = await asyncio.to_thread(watcher_module.watch, app)
        assert from_thread is watcher
        assert watcher_module.watch(app) is watcher
        await watcher_module.stop(app)
        assert not watcher._tasks

    asyncio.run(main())


def test_watch_replaces_a_watcher_whose_loop_is_gone() -> None:
    app = web.Application(consul_status={"address": "127.0.0.1:1"})

    async def first() -> ConsulWatcher:
        return watcher_module.watch(app)

    old = asyncio.run(first())
    new = asyncio.run(first())
    assert new is not old
    assert old._stopped


# The lifecycle: watch(), current(), stop() ----------------------------------


def dead_end_app(**settings: Any) -> web.Application:
    """An application whose Consul address has nothing listening."""
    return web.Application(
        consul_status={"address": f"127.0.0.1:{free_port()}", **settings}
    )


def test_a_watcher_that_fails_to_start_is_logged_once_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on Tornado 6.1, where making the client raised: never a dead watcher."""

    class Unbuildable:
        def __init__(self, settings: Settings) -> None:
            raise AttributeError("module 'tornado.netutil' has no attribute 'X'")

    async def main() -> None:
        app = dead_end_app(failure_mode="closed")
        monkeypatch.setattr(watcher_module, "ConsulClient", Unbuildable)
        for _ in range(3):
            watcher = watcher_module.current(app)
            assert not watcher.running
            assert watcher.status().consul == st.STARTING
            assert await watcher.wait_ready(5) is False  # at once, no wait
        monkeypatch.undo()
        watcher = watcher_module.current(app)
        assert watcher.running
        assert watcher_module.current(app) is watcher
        await watcher_module.stop(app)

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        asyncio.run(asyncio.wait_for(main(), 2))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "cannot start following Consul" in errors[0].getMessage()


def scripted_app_with_a_check(consul: ScriptedConsul) -> web.Application:
    app = web.Application()
    watcher_module._WATCHERS[app] = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
    checks.add_check(app, "db", lambda: True, interval=30)
    return app


async def started(app: web.Application, consul: ScriptedConsul) -> ConsulWatcher:
    """The app's watcher and checks, once a query waits and the check ran."""
    watcher = watcher_module.current(app)
    checks.start(app)
    await until(lambda: bool(consul.calls) and checks.results(app)[0].time is not None)
    return watcher


def test_stop_after_the_loop_closed_abandons_the_watcher_and_checks() -> None:
    app = dead_end_app()
    checks.add_check(app, "db", lambda: True, interval=30)

    async def start() -> ConsulWatcher:
        watcher = watcher_module.current(app)
        checks.start(app)
        await watcher.wait_ready(5)
        await until(lambda: checks.results(app)[0].time is not None)
        return watcher

    loop = asyncio.new_event_loop()
    watcher = loop.run_until_complete(start())
    loop.close()  # as an IOLoop does: its tasks are never cancelled
    asyncio.run(watcher_module.stop(app))
    assert watcher.status().consul == st.STOPPED
    assert not checks._CHECKS[app]._tasks


def test_stop_on_another_loop_stops_on_the_watchers_own() -> None:
    consul = ScriptedConsul()
    app = scripted_app_with_a_check(consul)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        watcher = asyncio.run_coroutine_threadsafe(started(app, consul), loop).result(5)
        tasks = [*watcher._tasks, *checks._CHECKS[app]._tasks]
        asyncio.run(asyncio.wait_for(watcher_module.stop(app), 5))
        assert all(task.done() for task in tasks)
        assert consul.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_after_stop_the_last_state_is_answered_and_nothing_starts() -> None:
    async def main() -> None:
        consul = ScriptedConsul()
        app = web.Application()
        with watcher_module.replaced(app, ConsulWatcher(Settings(), client=consul)):  # type: ignore[arg-type]
            watcher = watcher_module.current(app)
            consul.answer(5, maint("deploy 42"))
            await until(lambda: watcher.status().status == st.MAINTENANCE)
            await watcher_module.stop(app)
            for _ in range(3):
                assert watcher_module.current(app) is watcher
            status = watcher.status()
            assert (status.status, status.consul, status.reason) == (
                st.MAINTENANCE,
                st.STOPPED,
                "deploy 42",
            )
            assert {s.consul for s in status.sources} == {st.STOPPED}
            assert watcher.ready and await watcher.wait_ready(5)
            assert not watcher.running and not watcher._tasks
            assert len(consul.calls) == 2

    asyncio.run(main())


def test_stop_before_the_first_request_sticks_and_watch_starts_again() -> None:
    async def main() -> None:
        app = dead_end_app()
        await watcher_module.stop(app)
        stopped = watcher_module.current(app)
        assert stopped.status().consul == st.STOPPED
        assert not stopped.running
        assert watcher_module.current(app) is stopped
        started = watcher_module.watch(app)  # the explicit start-up call
        assert started is not stopped and started.running
        assert watcher_module.current(app) is started
        await watcher_module.stop(app)

    asyncio.run(main())


def reuse_after_closing_the_loop(app: web.Application) -> None:
    """An application reused after a fixture closed its loop, tasks pending."""

    async def current() -> ConsulWatcher:
        watcher = watcher_module.current(app)
        await watcher.wait_ready(5)
        return watcher

    loop = asyncio.new_event_loop()
    old = loop.run_until_complete(current())
    assert old._tasks
    loop.close()  # as an IOLoop does: its tasks are never cancelled
    new = asyncio.run(current())
    assert new is not old and new.ready
    assert old.status().consul == st.STOPPED


def test_abandon_on_a_closed_loop_does_not_raise() -> None:
    reuse_after_closing_the_loop(dead_end_app())


def test_abandon_on_a_closed_loop_with_a_query_waiting(
    consul_agent: AgentBase,
) -> None:
    app = web.Application(consul_status={"address": consul_agent.http_addr})
    reuse_after_closing_the_loop(app)


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


def test_the_watcher_runs_in_a_context_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request's contextvars stay out of the watcher's tasks and log lines."""
    seen: list[str | None] = []

    class Seeing(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(REQUEST_ID.get(None))
            return True

    class ContextScriptedConsul(ScriptedConsul):
        async def node_name(self) -> str:
            seen.append(REQUEST_ID.get(None))
            return await super().node_name()

    async def request(app: web.Application) -> ConsulWatcher:
        REQUEST_ID.set("request-1")  # as a request's logging context does
        return watcher_module.current(app)

    async def main() -> None:
        consul = ContextScriptedConsul()
        app = web.Application()
        watcher = ConsulWatcher(Settings(), client=consul)  # type: ignore[arg-type]
        with watcher_module.replaced(app, watcher):
            await asyncio.create_task(request(app))
            consul.answer(5)
            await until(lambda: watcher.status().consul == st.CONNECTED)
            await watcher.stop()

    seeing = Seeing()
    watcher_module.LOGGER.addFilter(seeing)
    try:
        with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
            asyncio.run(main())
    finally:
        watcher_module.LOGGER.removeFilter(seeing)
    assert len(seen) >= 2  # the node_name query, the "following" line
    assert seen == [None] * len(seen)


def test_a_bad_setting_is_found_once_and_remembered(tmp_path: pathlib.Path) -> None:
    """The token file is read once; every later call raises the same error."""
    token_file = tmp_path / "token"
    token_file.write_text("")
    app = web.Application(consul_status={"token_file": str(token_file)})
    with pytest.raises(SettingsError, match="is empty") as first:
        watcher_module.current(app)
    token_file.unlink()  # read again, it would be "cannot read"
    for call in (watcher_module.current, watcher_module.watch):
        with pytest.raises(SettingsError) as again:
            call(app)
        assert str(again.value) == str(first.value)


def test_good_settings_are_resolved_once_per_application(
    tmp_path: pathlib.Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("the-token")
    app = dead_end_app(token_file=str(token_file))

    async def main() -> None:
        first = watcher_module.watch(app)
        await watcher_module.stop(app)
        token_file.unlink()
        second = watcher_module.watch(app)
        assert second is not first and second.settings.token == "the-token"
        await watcher_module.stop(app)

    asyncio.run(main())


def test_a_settings_object_is_a_consul_status_value() -> None:
    settings = Settings(port=free_port(), failure_mode="closed", ttl=2)
    app = web.Application(consul_status=settings)
    assert watcher_module.watch(app).settings is settings


def connections_to(port: int) -> int:
    """This process's established TCP connections to ``port``."""
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                established = state == "01"
                if established and inode in sockets:
                    count += int(remote.rsplit(":", 1)[1], 16) == port
    return count


def test_a_collected_application_ends_its_watcher(consul_agent: AgentBase) -> None:
    """Without stop(): its tasks end and its connection to the agent closes."""
    port = int(consul_agent.http_addr.rsplit(":", 1)[1])

    async def main() -> None:
        app = web.Application(consul_status={"address": consul_agent.http_addr})
        before = connections_to(port)
        watcher = watcher_module.watch(app)
        await watcher.wait_ready(5)
        await until(lambda: connections_to(port) > before)  # a query waits
        tasks = list(watcher._tasks)
        del app
        gc.collect()
        await until(lambda: all(task.done() for task in tasks), timeout=5)
        await until(lambda: connections_to(port) == before, timeout=5)
        assert watcher.status().consul == st.STOPPED

    asyncio.run(main())


def test_an_application_its_check_refers_to_needs_stop() -> None:
    """What the README says: a check closing over the application keeps it
    alive, so only stop(app) ends its watcher."""

    async def main() -> None:
        app = dead_end_app()

        def check(application: web.Application) -> bool:
            return bool(application.settings)

        checks.add_check(app, "self", functools.partial(check, app), interval=30)
        watcher = watcher_module.watch(app)
        alive = weakref.ref(app)
        del app
        gc.collect()
        application = alive()
        assert application is not None and watcher.running
        await watcher_module.stop(application)
        assert not watcher.running

    asyncio.run(main())


def test_an_application_collected_in_another_thread_ends_its_watcher() -> None:
    """The loop runs in one thread, the garbage collector in another."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        app = dead_end_app()

        async def start(application: web.Application) -> ConsulWatcher:
            return watcher_module.watch(application)

        watcher = asyncio.run_coroutine_threadsafe(start(app), loop).result(5)
        tasks = list(watcher._tasks)
        del app
        gc.collect()
        deadline = time.monotonic() + 5
        while not all(task.done() for task in tasks):
            assert time.monotonic() < deadline, "the watcher still runs"
            time.sleep(0.005)
        assert watcher.status().consul == st.STOPPED
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class CountingClient(ConsulClient):
    """The real client, counting the KV queries it sends."""

    kv_queries = 0

    async def kv_value(
        self, key: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, bytes | None]:
        self.kv_queries += 1
        return await super().kv_value(key, index, wait)


def test_writes_to_other_keys_do_not_spin_a_watcher_of_a_missing_key(
    consul_agent: AgentBase,
) -> None:
    """On Consul 1.8 a missing key's index moves with every KV write anywhere."""
    prefix = f"ssc-test/{uuid.uuid4().hex}"
    settings = Settings.from_mapping(
        {"address": consul_agent.http_addr, "key": f"{prefix}/maintenance"}
    )
    writes = 200

    def write_other_keys() -> float:
        started = time.monotonic()
        for n in range(writes):
            answer = consul_agent.request("PUT", f"/v1/kv/{prefix}/other/{n}", body=n)
            assert answer.status == 200
        return time.monotonic() - started

    async def main() -> tuple[int, float]:
        client = CountingClient(settings)
        watcher = ConsulWatcher(settings, client=client)
        watcher.start()
        try:
            await watcher.wait_ready(5)
            await until(lambda: client.kv_queries == 2)  # now blocking
            seconds = await asyncio.to_thread(write_other_keys)
            queries = client.kv_queries - 2
            assert watcher.status().status == st.OK
        finally:
            await watcher.stop()
            consul_agent.request("DELETE", f"/v1/kv/{prefix}", params={"recurse": ""})
        return queries, seconds

    queries, seconds = asyncio.run(main())
    print(f"\n{writes} writes to other keys in {seconds:.2f} s: {queries} queries")
    assert queries <= seconds / watcher_module.MIN_QUERY_INTERVAL + 2
    assert queries < writes / 4
