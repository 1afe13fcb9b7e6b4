"""The watcher's state machine, driven by a scripted transport.

These are unit tests of the loop's decisions (index handling, backoff, the
failure policy, logging once per change of state). What Consul really answers
is covered by the integration tests against a real agent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado import web

from sprockets_status_consul import status as st
from sprockets_status_consul import watcher as watcher_module
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.transport import Check, ConsulError
from sprockets_status_consul.watcher import ConsulWatcher

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
            st.SourceStatus("node", "node-1", False, st.CONNECTED),
        )
        assert watcher.node == "node-1"

    consul = run(test, ttl=3.0)
    assert [(c[1], c[2]) for c in consul.calls] == [(0, None), (7, 3.0)]
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

    consul = run(test)
    assert [c[1] for c in consul.calls] == [0, 5, 9, 12]


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


def test_an_unchanged_early_answer_is_not_asked_again_at_once() -> None:
    async def test(watcher: ConsulWatcher, consul: ScriptedConsul) -> None:
        consul.answer(5)
        consul.answer(5)
        consul.answer(5)
        await until(lambda: len(consul.calls) == 4)

    consul = run(test)
    gaps = [b[3] - a[3] for a, b in itertools.pairwise(consul.calls[1:])]
    assert min(gaps) >= watcher_module.MIN_INTERVAL * 0.9


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
