"""The application's own checks: run in the background, read from memory.

A service is ready when Consul says so and when what it depends on answers::

    async def database() -> None:
        await pool.execute("SELECT 1")      # raises when the database is away

    ssc.add_check(app, "database", database, interval=10, timeout=2)

Each check runs on the application's event loop every ``interval`` seconds,
first as soon as the checks start; a request only reads the last result
(:func:`results`), so it never waits on a check, not even the first one.
A failing critical check makes ``/status`` answer 503 (see
:func:`~.status.answer` for where it comes in the order of precedence).

The checks start on the running event loop when a check is added there,
when the application's Consul watcher first answers, or at the first
request, whichever comes first; :func:`stop` (called by
:func:`sprockets_status_consul.stop`) cancels them.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from tornado import web

from . import status as st
from .loops import stop_on_owner

LOGGER = logging.getLogger(__name__)

CheckFunction = Callable[[], Any]
"""A check: an async callable (or a sync one, run in the default executor)
that returns normally (or ``True``) when healthy, and returns ``False`` or
raises when not."""

OBSERVERS: list[Callable[[web.Application], None]] = []
"""Called on the loop with the application after each run of one of its checks."""

RESERVED = frozenset({"application", "process"})
"""Names a check cannot have: health+json already has ``NAME:status`` for them."""

NO_RESULT = "no result yet"
"""The reason a check that fails closed gives before its first result."""

UNCAUGHT = (KeyboardInterrupt, SystemExit, asyncio.CancelledError)
"""What a check, observer or listener may raise through a background task.

Anything else it raises, ``BaseException`` subclasses included, is a failure
of that one call: the task that made it goes on.
"""


class _Check:
    """One check, how to run it, and what it said last."""

    def __init__(
        self,
        name: str,
        function: CheckFunction,
        interval: float,
        timeout: float,
        critical: bool,
        fail_after: int,
        fail_closed: bool,
    ) -> None:
        self.name = name
        self.function = function
        self.interval = interval
        self.timeout = timeout
        self.critical = critical
        self.fail_after = fail_after
        self.is_async = inspect.iscoroutinefunction(function) or (
            inspect.iscoroutinefunction(type(function).__call__)  # async __call__
        )
        self.fail_closed = fail_closed
        self.failures = 0  # consecutive failed runs
        self.passed = False  # at least one run succeeded
        self.reported = False  # whether the log last said it fails
        self.in_thread = False  # a sync run that timed out may still be going
        self.result = st.CheckResult(
            name, critical, fail_closed, NO_RESULT if fail_closed else None
        )

    async def run(self) -> str | None:
        """Run once, within the timeout; the reason it failed, or None."""
        if self.in_thread:
            return f"timeout after {self.timeout:g} s (the last run has not returned)"
        call = asyncio.ensure_future(self._call())
        try:
            done, _ = await asyncio.wait({call}, timeout=self.timeout)
        finally:  # a timeout, or the checks stopping: cancel the run
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        if not done:
            return f"timeout after {self.timeout:g} s"
        if call.cancelled():  # by the check itself
            return "cancelled"
        try:
            healthy = call.result()
        except UNCAUGHT:
            raise
        except BaseException as error:  # whatever it is, the check failed
            return " ".join(str(error).split())[:200] or type(error).__name__
        return "returned False" if healthy is False else None

    async def _call(self) -> Any:
        if self.is_async:
            return await self.function()
        self.in_thread = True
        result = await asyncio.get_running_loop().run_in_executor(None, self._in_thread)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _in_thread(self) -> Any:
        try:
            return self.function()
        finally:
            self.in_thread = False

    def record(self, reason: str | None, duration: float) -> None:
        """Keep one run's outcome; log when whether it counts as failing changes."""
        self.failures = 0 if reason is None else self.failures + 1
        self.passed = self.passed or reason is None
        failing = self.failures >= self.fail_after or (
            self.fail_closed and not self.passed
        )
        self.result = st.CheckResult(
            self.name, self.critical, failing, reason, time.time(), duration
        )
        if failing != self.reported:
            if failing:
                LOGGER.warning("check %s failing: %s", self.name, reason)
            else:
                LOGGER.info("check %s passes again", self.name)
            self.reported = failing


class Checks:
    """The checks of one application and the tasks that run them on its loop."""

    def __init__(self, application: web.Application) -> None:
        self._application = weakref.ref(application)
        self._checks: dict[str, _Check] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.results: tuple[st.CheckResult, ...] = ()
        """The last result of every check, in the order they were added."""

    def add(self, check: _Check) -> None:
        if check.name in self._checks:
            raise ValueError(f"there is already a check named {check.name!r}")
        self._checks[check.name] = check
        self._publish()
        loop = self._loop
        if loop is None or self._stopped or loop.is_closed():
            self.ensure_running()
        elif loop is _running_loop():
            self._start(check)
        else:
            loop.call_soon_threadsafe(self._start, check)

    def ensure_running(self) -> None:
        """Run the checks on the running event loop, unless they run already."""
        loop = _running_loop()
        if loop is None or loop is self._loop or self._stopped or not self._checks:
            return
        owner = self._loop
        if owner is not None and not owner.is_closed() and owner.is_running():
            return  # they run on another thread's loop
        if owner is not None and not owner.is_closed():
            for task in self._tasks:  # left on a loop that will not run again
                task.cancel()
        self._tasks = []
        self._loop = loop
        for check in self._checks.values():
            self._start(check)

    def abandon(self) -> None:
        """Stop without awaiting: for checks whose loop will not run again."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        if self._loop is not None and not self._loop.is_closed():
            for task in tasks:
                task.cancel()

    async def stop(self) -> None:
        """Cancel the checks' runs and wait until they are gone."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, check: _Check) -> None:
        """Run ``check`` in a fresh :class:`contextvars.Context`, as the
        watcher does, not in the context of the request that started it."""
        assert self._loop is not None
        if not self._stopped:
            fresh = contextvars.Context()
            self._tasks.append(fresh.run(self._loop.create_task, self._follow(check)))

    async def _follow(self, check: _Check) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            reason = await check.run()
            check.record(reason, loop.time() - started)
            self._publish()
            application = self._application()
            if application is None:
                return
            for observer in OBSERVERS:
                try:
                    observer(application)
                except UNCAUGHT:
                    raise
                except BaseException:  # never into the check's loop
                    LOGGER.exception("cannot evaluate the status after a check")
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    def _publish(self) -> None:
        self.results = tuple(check.result for check in self._checks.values())


_CHECKS: weakref.WeakKeyDictionary[web.Application, Checks] = (
    weakref.WeakKeyDictionary()
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def add_check(
    application: web.Application,
    name: str,
    check: CheckFunction,
    *,
    interval: float = 10,
    timeout: float = 2,
    critical: bool = True,
    fail_after: int = 1,
    fail_closed: bool = False,
) -> None:
    """Run ``check`` every ``interval`` seconds and let its result count.

    ``check`` is an async callable, or a sync one (run in the loop's default
    executor), that returns normally (or ``True``) when healthy and returns
    ``False`` or raises when not: the exception's text is the reason. A run
    longer than ``timeout`` seconds is cancelled and fails ("timeout after
    2 s"; a sync check's thread cannot be stopped, so it is not started again
    until it returns). It counts as failing after ``fail_after`` failed runs
    in a row, and passing again after one run that succeeds.

    A failing ``critical`` check makes ``/status`` answer 503 with source
    ``check`` and reason ``"NAME: reason"``; a failing non-critical one shows
    as ``warn`` in health+json only. Before its first result a check counts
    as passing; with ``fail_closed`` it counts as failing until a run
    succeeds.
    """
    if not isinstance(name, str) or not name or ":" in name or name in RESERVED:
        raise ValueError(
            f"a check needs a name without ':', other than {sorted(RESERVED)}; "
            f"not {name!r}"
        )
    if not callable(check):
        raise TypeError(f"check {name!r} is not callable: {check!r}")
    for setting, value in (("interval", interval), ("timeout", timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"check {name!r}: {setting} must be a number of seconds")
        if not 0 < value < float("inf"):
            raise ValueError(f"check {name!r}: {setting} must be positive")
    if isinstance(fail_after, bool) or not isinstance(fail_after, int):
        raise TypeError(f"check {name!r}: fail_after must be an int")
    if fail_after < 1:
        raise ValueError(f"check {name!r}: fail_after must be at least 1")
    checks = _CHECKS.get(application)
    if checks is None:
        checks = _CHECKS[application] = Checks(application)
    checks.add(
        _Check(
            name,
            check,
            float(interval),
            float(timeout),
            bool(critical),
            fail_after,
            bool(fail_closed),
        )
    )


def results(application: web.Application) -> tuple[st.CheckResult, ...]:
    """The last result of each of the application's checks, by memory only.

    Within a running event loop it also starts the checks if they do not
    run yet (the first request of a process does); it never waits on one.
    """
    checks = _CHECKS.get(application)
    if checks is None:
        return ()
    if checks._loop is not _running_loop():  # inline: this runs on every request
        checks.ensure_running()
    return checks.results


def start(application: web.Application) -> None:
    """Start the application's checks on the running event loop; idempotent."""
    checks = _CHECKS.get(application)
    if checks is not None:
        checks.ensure_running()


async def stop(application: web.Application) -> None:
    """Stop running the application's checks; their last results remain.

    It may be awaited on any loop (see :func:`.loops.stop_on_owner`).
    """
    checks = _CHECKS.get(application)
    if checks is not None:
        await stop_on_owner(checks._loop, checks.stop, checks.abandon)


def applications() -> Iterator[web.Application]:
    """The applications that have checks."""
    return iter(list(_CHECKS.keys()))
