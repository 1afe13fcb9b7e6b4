"""Following Consul: one watcher per application, answers kept in memory.

The watcher runs one loop per source of maintenance: the node's checks (node
and service maintenance) and, when configured, a fleet-wide KV key. Each
loop asks Consul with a blocking query: Consul holds the request until the
answer changes or ``wait`` passes, so a change reaches the process within
milliseconds while an idle process sends one request per TTL. The index
handling follows Consul's rules for blocking queries (and HashiCorp's Go
``api`` package):

* the first query, and the first after an error, does not block;
* when ``X-Consul-Index`` goes backwards (a restarted agent) the index resets;
* an index of 0 is never blocked on;
* a query never starts sooner than :data:`MIN_QUERY_INTERVAL` after the
  start of the blocking query before it, whatever the index did (as
  consul-template does), so a busy Consul cannot spin a backend;
* each blocking ``wait`` is shortened by a random part of up to
  :data:`WAIT_JITTER`, so backends started together drift apart.

Errors are retried with capped exponential backoff and jitter, logged
once per change of state, and never reach a request: :meth:`ConsulWatcher.status`
only reads memory. What a request reports while Consul cannot be reached is
the failure policy (:data:`~.settings.FAIL_OPEN` or
:data:`~.settings.FAIL_CLOSED`).

An application has one watcher: :func:`watch` starts it at start-up,
:func:`current` is what a request asks (it starts the watcher on first use),
and :func:`stop` ends it for good. A watcher whose application is
garbage-collected without :func:`stop` ends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tornado import web

from . import checks
from . import status as st
from .loops import stop_on_owner
from .registration import Registrar
from .settings import FAIL_CLOSED, SETTING, Settings, SettingsError, resolve
from .transport import Check, ConsulClient, ConsulError, ConsulTimeout

LOGGER = logging.getLogger(__name__)

NODE_MAINTENANCE_CHECK = "_node_maintenance"
"""The check ``consul maint -enable`` sets critical on the node."""

SERVICE_MAINTENANCE_CHECK = "_service_maintenance:"
"""The prefix of the check ``consul maint -enable -service ID`` sets critical."""

RETRY_MIN = 0.05
"""First retry delay after an error, in seconds; it doubles up to ``retry_max``."""

MIN_QUERY_INTERVAL = 0.1
"""Least time, in seconds, from the start of a blocking query to the next query.

A blocking query returns whenever its index moves, and on Consul 1.8 the
index of a missing KV key moves with every write to any key: without this
floor a busy Consul makes each backend query it as fast as it answers. The
number is consul-template's (``minDelayBetweenUpdates``); a change still
reaches the backend at once unless another one came less than this before.
"""

QUERY_DITHER = 0.02
"""Up to this many seconds, at random, added to a wait for :data:`MIN_QUERY_INTERVAL`,
so backends woken by the same write do not query again in step
(consul-template's dither)."""

WAIT_JITTER = 0.1
"""Each blocking query's ``wait`` is the TTL shortened by a random fraction up to this.

Backends started together would otherwise keep returning from their idle
blocking queries within the same few milliseconds; Consul adds up to
``wait``/16 of its own, and this spreads them further, whatever the agent.
An idle backend sends Consul about one request per 0.95 TTL on average.
"""

OBSERVERS: list[Callable[[ConsulWatcher], None]] = []
"""Called on the loop after each answer or error of a watcher (see :mod:`.changes`)."""


class Source:
    """One place maintenance can come from, followed by its own query loop."""

    name = "source"

    def quiet(self) -> tuple[st.SourceAnswer, ...]:
        """What it says before Consul answers: no maintenance, one per kind."""
        raise NotImplementedError

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, tuple[st.SourceAnswer, ...]]:
        """Ask Consul once; return the index to block on next and the answers."""
        raise NotImplementedError


class NodeSource(Source):
    """Node and service maintenance, from the checks of the agent's node.

    ``consul maint -enable`` sets the node's ``_node_maintenance`` check
    critical; ``consul maint -enable -service ID`` sets the check
    ``_service_maintenance:ID``. Both are checks of the node, so one blocking
    query follows both, and answers for each: ``node`` then ``service``.

    Without a ``node`` setting the node is the one of the agent the watcher
    talks to, asked once; the process's host name is not used, since it is
    wrong whenever the application and the agent run in different containers.
    """

    name = "node"

    def __init__(
        self,
        node: str | None,
        service: str | None = None,
        on_checks: Callable[[Sequence[Check]], None] | None = None,
    ) -> None:
        self.node = node
        self.service = service
        self.on_checks = on_checks
        """Given every answer's checks: how a registration learns it was lost."""

    def quiet(self) -> tuple[st.SourceAnswer, ...]:
        return self._answers({})

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, tuple[st.SourceAnswer, ...]]:
        if self.node is None:
            self.node = await client.node_name()
            LOGGER.info("following Consul node %r", self.node)
        consul_index, checks = await client.node_checks(self.node, index, wait)
        if not checks:
            # Every node Consul knows has at least its serfHealth check.
            raise ConsulError(
                f"Consul knows no node named {self.node!r}, or the ACL token "
                "may not read it (it needs node:read)"
            )
        if self.on_checks is not None:
            self.on_checks(checks)
        critical = {
            check["CheckID"]: check.get("Notes") or ""
            for check in checks
            if check.get("Status") == "critical"
        }
        return consul_index, self._answers(critical)

    def _answers(self, critical: dict[str, str]) -> tuple[st.SourceAnswer, ...]:
        """The node's answer and the service's, from the notes of critical checks."""
        kinds = [("node", self.node, NODE_MAINTENANCE_CHECK)]
        if self.service is not None:
            check = f"{SERVICE_MAINTENANCE_CHECK}{self.service}"
            kinds.append(("service", self.service, check))
        answers = []
        for name, subject, check in kinds:
            if check in critical:
                reason = critical[check] or f"{name} maintenance"
                answers.append(st.SourceAnswer(name, subject, True, reason))
            else:
                answers.append(st.SourceAnswer(name, subject))
        return tuple(answers)


class KeySource(Source):
    """The fleet-wide switch: while a Consul KV key exists, every backend that
    follows it is in maintenance, and the key's value is the reason::

        consul kv put service/my-service/maintenance "deploy 42"
        consul kv delete service/my-service/maintenance
    """

    name = "key"

    def __init__(self, key: str) -> None:
        self.key = key

    def quiet(self) -> tuple[st.SourceAnswer, ...]:
        return (st.SourceAnswer("key", self.key),)

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, tuple[st.SourceAnswer, ...]]:
        consul_index, value = await client.kv_value(self.key, index, wait)
        if value is None:
            return consul_index, self.quiet()
        reason = value.decode("utf-8", "replace").strip()
        reason = reason or f"key {self.key} is set"
        return consul_index, (st.SourceAnswer("key", self.key, True, reason),)


class _Followed:
    """What the watcher last learned from one source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.answers: tuple[st.SourceAnswer, ...] | None = None  # until the first
        self.error: str | None = None
        self.answered_at: float | None = None  # time.monotonic() of last answer
        self.failed_at: float | None = None
        self.client: ConsulClient | None = None  # its own: one connection each


class ConsulWatcher:
    """Follows Consul for one application and keeps the answer in memory.

    Create it with :func:`watch` (or let the first request do so through
    :func:`current`); it runs on the event loop it was started on until
    :meth:`stop`, until that loop cancels its tasks, or until its application
    is garbage-collected. :meth:`status` never waits and never fails; once
    stopped it answers what the watcher last knew, with ``consul``
    :data:`~.status.STOPPED`.

    :param settings: resolved settings, see :class:`~.settings.Settings`.
    :param client: the Consul client of every source; when omitted, each
        source gets its own, made from ``settings`` (one connection each).
    """

    def __init__(self, settings: Settings, client: ConsulClient | None = None) -> None:
        self.settings = settings
        self._client = client
        # Registration: registers at start, again when the node's checks show
        # it lost, and deregisters first thing at stop (see .registration).
        self.registrar = (
            None
            if settings.register is None
            else Registrar(settings.register, settings.retry_max, settings.address)
        )
        on_checks = None if self.registrar is None else self.registrar.checks_seen
        sources: list[Source] = [NodeSource(settings.node, settings.service, on_checks)]
        if settings.key is not None:
            sources.append(KeySource(settings.key))
        self._followed = [_Followed(source) for source in sources]
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._snapshot: st.ConsulStatus | None = None
        self._stopped = False
        self._orphaned: weakref.finalize[Any, Any] | None = None
        self._tracebacks: set[type[BaseException]] = set()
        self.ready = False
        """Whether every source has answered or failed at least once, or the
        watcher is stopped: nothing more is worth waiting for."""
        self.queries = {"ok": 0, "error": 0, "timeout": 0}
        """How many queries to Consul ended in each outcome (see :mod:`.metrics`)."""

    @classmethod
    def answering(cls, status: st.ConsulStatus) -> ConsulWatcher:
        """A watcher that follows nothing and always answers ``status``.

        What :func:`~sprockets_status_consul.testing.consul_says` puts in an
        application's place (see :func:`replaced`): it opens no connection.
        """
        watcher = cls(Settings())
        watcher._followed = []
        watcher._snapshot = status
        watcher.ready = True
        watcher._ready.set()
        return watcher

    @property
    def node(self) -> str | None:
        """The Consul node followed, once known."""
        source = self._followed[0].source if self._followed else None
        return source.node if isinstance(source, NodeSource) else None

    @property
    def running(self) -> bool:
        """Whether the watcher follows Consul on the current event loop."""
        if self._loop is None or self._stopped or self._loop.is_closed():
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def start(self) -> None:
        """Start following Consul on the running event loop; idempotent.

        The tasks run in a fresh :class:`contextvars.Context`, not in the
        context of whatever (a request, say) started them. A start that
        raises changes nothing, so it can be tried again.
        """
        if self._tasks or not self._followed:
            return
        if self._stopped:
            raise RuntimeError("a stopped ConsulWatcher cannot be started again")
        loop = asyncio.get_running_loop()
        for followed in self._followed:
            followed.client = self._client or ConsulClient(self.settings)
        fresh = contextvars.Context()
        self._tasks = [
            fresh.run(loop.create_task, self._follow(followed))
            for followed in self._followed
        ]
        self._loop = loop
        if self.registrar is not None:
            # Its own client: a registration must not queue behind a
            # blocking query.
            fresh.run(self.registrar.start, self._client or ConsulClient(self.settings))

    def abandon(self) -> None:
        """Stop without awaiting: for a watcher whose loop will not run again.

        Safe on a closed loop: its tasks will never run, so only the client
        is closed.
        """
        tasks, self._tasks = self._tasks, []
        if self._loop is not None and not self._loop.is_closed():
            for task in tasks:
                task.cancel()
        if self.registrar is not None:
            self.registrar.abandon()
        self._halt()

    async def deregister(self) -> None:
        """Withdraw the service's registration for good, if there is one."""
        if self.registrar is not None and self._loop is not None:
            await self.registrar.withdraw()

    async def stop(self) -> None:
        """Deregister, stop following Consul and close its connections."""
        await self.deregister()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        self._halt()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _halt(self) -> None:
        """Keep the last answer, marked stopped; wake waiters; close the client."""
        if self._stopped:
            return
        self._stopped = True
        last = self.status()
        self._snapshot = dataclasses.replace(
            last,
            consul=st.STOPPED,
            sources=tuple(
                dataclasses.replace(source, consul=st.STOPPED)
                for source in last.sources
            ),
        )
        self.ready = True
        if self._loop is None or not self._loop.is_closed():
            self._ready.set()  # wakes the requests waiting for a first answer
        if self._orphaned is not None:
            self._orphaned.detach()
        for followed in self._followed:
            if followed.client is not None:
                followed.client.close()
        if self.registrar is not None:
            self.registrar.close()

    def _abandon_from_any_thread(self) -> None:
        """Abandon on the watcher's own loop, from whatever thread runs this."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._abandon_orphan)
                return
            except RuntimeError:  # closed in between
                pass
        self._abandon_orphan()

    def _abandon_orphan(self) -> None:
        if not self._stopped:
            LOGGER.info("the application is gone without stop(): stopping its watcher")
        self.abandon()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first answers; True when ready."""
        if self.ready:
            return True
        if timeout <= 0 or self._loop is not asyncio.get_running_loop():
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def status(self) -> st.ConsulStatus:
        """What Consul says now, by memory only: never waits, never fails."""
        snapshot = self._snapshot
        if snapshot is not None:
            return snapshot
        return self._compute(time.monotonic())

    # The loop -----------------------------------------------------------

    async def _follow(self, followed: _Followed) -> None:
        """Query one source for ever: answer, decide the next query, wait."""
        client = followed.client
        assert client is not None
        settings = self.settings
        index = 0
        failures = 0
        try:
            while True:
                started = time.monotonic()
                blocking = index != 0
                try:
                    new_index, answers = await followed.source.query(
                        client, index, self._wait() if blocking else None
                    )
                except Exception as error:  # a bug here must not stop the loop
                    failures += 1
                    timeout = isinstance(error, ConsulTimeout)
                    self.queries["timeout" if timeout else "error"] += 1
                    self._failed(followed, error)
                    index, delay = 0, _backoff(failures, settings.retry_max)
                else:
                    self.queries["ok"] += 1
                    failures = 0
                    self._answered(followed, answers)
                    index, delay = self._next(index, new_index)
                if blocking:
                    delay = max(delay, _rate_limit(started))
                await asyncio.sleep(delay)
        finally:
            # Cancelled by the loop rather than by stop(), or ended by what it
            # let through: close anyway, and end the other sources' loops.
            self._halt()
            loop = self._loop
            if loop is not None and not loop.is_closed():
                for task in self._tasks:
                    if task is not asyncio.current_task(loop):
                        task.cancel()

    def _wait(self) -> float:
        """The ``wait`` of the next blocking query: the TTL, less some jitter."""
        return self.settings.wait * (1 - random.uniform(0, WAIT_JITTER))

    def _next(self, index: int, new_index: int) -> tuple[int, float]:
        """The index to ask with next, and how long to wait before asking."""
        if not self.settings.blocking:
            return 0, self.settings.ttl
        if new_index < index:
            LOGGER.info(
                "Consul index went back from %d to %d: resetting", index, new_index
            )
            return 0, 0.0
        # Index 0 would never block: Consul's advice is to use 1.
        return max(new_index, 1), 0.0

    def _answered(
        self, followed: _Followed, answers: tuple[st.SourceAnswer, ...]
    ) -> None:
        now = time.monotonic()
        if followed.error is not None:
            down = now - (followed.failed_at or now)
            LOGGER.info(
                "Consul %s answers again after %.1f s", self.settings.address, down
            )
        previous = followed.answers or followed.source.quiet()
        for before, after in zip(previous, answers, strict=True):
            if after.maintenance and after != before:
                LOGGER.info("%s maintenance enabled: %s", after.name, after.reason)
            elif before.maintenance and not after.maintenance:
                LOGGER.info("%s maintenance disabled", after.name)
        followed.answers = answers
        followed.error = None
        followed.failed_at = None
        followed.answered_at = now
        self._changed(now)

    def _failed(self, followed: _Followed, error: Exception) -> None:
        if isinstance(error, ConsulError):
            message = str(error)
        else:
            message = f"unexpected error: {type(error).__name__}"
            if type(error) not in self._tracebacks:
                # The first of each kind, whatever failed before it.
                self._tracebacks.add(type(error))
                LOGGER.error("unexpected error following Consul", exc_info=error)
        now = time.monotonic()
        if message != followed.error:
            LOGGER.warning(
                "cannot follow %s maintenance (%s); %s",
                followed.source.name,
                message,
                "serving maintenance once the last answer is older than the TTL"
                if self.settings.failure_mode == FAIL_CLOSED
                else "serving the last known status",
            )
        if followed.error is None:
            followed.failed_at = now
        followed.error = message
        self._changed(now)

    def _changed(self, now: float) -> None:
        if self._stopped:
            return
        snapshot = self._compute(now)
        # Only an answer with no error in it is the same whatever the time.
        self._snapshot = snapshot if snapshot.consul == st.CONNECTED else None
        if not self.ready:
            self.ready = all(
                f.answers is not None or f.error is not None for f in self._followed
            )
        if self.ready:
            self._ready.set()
        for observer in OBSERVERS:  # what /status answers may have changed
            try:
                observer(self)
            except checks.UNCAUGHT:
                raise
            except BaseException as error:  # never into the watcher's loop
                if type(error) not in self._tracebacks:
                    self._tracebacks.add(type(error))
                    LOGGER.error("a watcher observer failed", exc_info=error)

    def _compute(self, now: float) -> st.ConsulStatus:
        settings = self.settings
        states = []
        ages = []
        sources: list[st.SourceAnswer] = []
        source: str | None
        reason: str | None
        for followed in self._followed:
            age = None if followed.answered_at is None else now - followed.answered_at
            answers = followed.answers
            if followed.error is None:
                state = st.CONNECTED if answers is not None else st.STARTING
            elif (
                answers is not None
                and followed.failed_at is not None
                and now - followed.failed_at <= settings.ttl
            ):
                # An outage shorter than one TTL is tolerated, whatever the
                # phase of the blocking wait it interrupted.
                state = st.UNREACHABLE
            else:
                state = st.STALE
            states.append(state)
            if state != st.CONNECTED:
                ages.append(age)
            sources.extend(
                dataclasses.replace(answer, consul=state, error=followed.error)
                for answer in answers or followed.source.quiet()
            )
        consul = max(states, key=_SEVERITY.index)
        age = max(ages, key=lambda a: float("inf") if a is None else a, default=None)
        if age is not None:
            age = round(age, 3)
        maintenance = next((answer for answer in sources if answer.maintenance), None)
        if maintenance is not None:
            source, reason = maintenance.name, maintenance.reason
            status = st.MAINTENANCE
        elif settings.failure_mode == FAIL_CLOSED and consul in (st.STARTING, st.STALE):
            source = "consul"
            reason = next(
                (f.error for f in self._followed if f.error),
                "no answer from Consul yet",
            )
            status = st.MAINTENANCE
        else:
            source = reason = None
            status = st.OK
        return st.ConsulStatus(status, consul, reason, source, age, tuple(sources))


_SEVERITY = [st.CONNECTED, st.STARTING, st.UNREACHABLE, st.STALE]


def _rate_limit(started: float) -> float:
    """How long to wait so that the next query starts MIN_QUERY_INTERVAL after
    the one that started at ``started``, with a little dither; 0 when it has."""
    remaining = MIN_QUERY_INTERVAL - (time.monotonic() - started)
    return remaining + random.uniform(0, QUERY_DITHER) if remaining > 0 else 0.0


def _backoff(failures: int, cap: float) -> float:
    """Capped exponential backoff with jitter: between half and all of it."""
    ceiling = min(cap, RETRY_MIN * 2 ** min(failures - 1, 32))
    return random.uniform(ceiling / 2, ceiling)


_WATCHERS: weakref.WeakKeyDictionary[web.Application, ConsulWatcher] = (
    weakref.WeakKeyDictionary()
)
"""Each application's watcher: running, not started yet, or stopped."""


class _Application:
    """What is remembered of one application besides its watcher."""

    def __init__(self) -> None:
        self.settings: Settings | SettingsError | None = None
        self.stopped = False  # stop() was called: current() starts nothing
        self.start_error: str | None = None  # the start failure last logged

    def resolved(self, application: web.Application) -> Settings:
        """The application's settings, resolved once, good or bad."""
        if self.settings is None:
            try:
                self.settings = resolve(application.settings.get(SETTING))
            except SettingsError as error:
                self.settings = error
        if isinstance(self.settings, SettingsError):
            # A new exception each time: re-raising one would grow its traceback.
            raise SettingsError(str(self.settings))
        return self.settings


_APPLICATIONS: weakref.WeakKeyDictionary[web.Application, _Application] = (
    weakref.WeakKeyDictionary()
)


def _state(application: web.Application) -> _Application:
    state = _APPLICATIONS.get(application)
    if state is None:
        state = _APPLICATIONS[application] = _Application()
    return state


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current(application: web.Application) -> ConsulWatcher:
    """The watcher a request of ``application`` reads: what a handler calls.

    It is made and started on first use. After :func:`stop` it is the stopped
    watcher, answering its last known state, and nothing is started again.
    A watcher that fails to start is logged (once) and returned unstarted,
    answering ``starting``; the next call tries again.

    :raises SettingsError: when the ``consul_status`` setting is unusable
        (found once per application, then remembered).
    """
    try:  # inline: this runs on every request
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    watcher = _WATCHERS.get(application)
    if (
        watcher is not None
        and loop is not None
        and watcher._loop is loop
        and not watcher._stopped
    ):
        return watcher  # the hot path
    return _resolve(application, watcher, loop, explicit=False)


def watch(application: web.Application) -> ConsulWatcher:
    """Start following Consul for ``application``: the start-up call.

    Call it once at start-up so a bad ``consul_status`` setting fails there
    (:class:`~.settings.SettingsError`) and Consul's first answer is in memory
    before the first request; otherwise the first request starts the watcher
    (see :func:`current`). Within a running event loop the watcher starts at
    once; before one runs, it starts when the first request arrives. After
    :func:`stop` it starts a new watcher.
    """
    return _resolve(
        application, _WATCHERS.get(application), _running_loop(), explicit=True
    )


def _resolve(
    application: web.Application,
    watcher: ConsulWatcher | None,
    loop: asyncio.AbstractEventLoop | None,
    explicit: bool,
) -> ConsulWatcher:
    """:func:`current` and :func:`watch` beyond the hot path."""
    state = _state(application)
    if explicit:
        state.stopped = False
    if watcher is not None and state.stopped:
        return watcher
    if watcher is not None and not watcher._stopped:
        owner = watcher._loop
        if owner is None:  # made before any loop ran, or not started yet
            if loop is not None:
                _start(application, state, watcher)
            return watcher
        if owner is loop or (
            not owner.is_closed() and (loop is None or owner.is_running())
        ):
            # Asked from another thread, or outside the loop: share the
            # watcher that follows Consul; never replace (and orphan) it.
            return watcher
        watcher.abandon()  # its loop is closed or will not run again
    watcher = ConsulWatcher(state.resolved(application))
    if state.stopped:
        watcher._halt()  # stopped before it ever ran: it answers "stopped"
    elif loop is not None and not _start(application, state, watcher):
        return watcher  # not kept: the next call tries again
    _WATCHERS[application] = watcher
    return watcher


def _start(
    application: web.Application, state: _Application, watcher: ConsulWatcher
) -> bool:
    """Start ``watcher`` for ``application``; False (logged once) if it fails."""
    try:
        watcher.start()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        if message != state.start_error:
            state.start_error = message
            LOGGER.error(
                "cannot start following Consul (trying again on the next request)",
                exc_info=error,
            )
        return False
    state.start_error = None
    if watcher._tasks and watcher._orphaned is None:
        # Ends the watcher if the application goes without stop(); it holds
        # only a weak reference to the application, and the watcher none.
        orphaned = weakref.finalize(application, watcher._abandon_from_any_thread)
        orphaned.atexit = False
        watcher._orphaned = orphaned
    return True


async def deregister(application: web.Application) -> None:
    """Withdraw the application's registration in Consul, if it has one.

    Consul stops routing to the process at once; the watcher keeps following
    maintenance, and never registers again.
    """
    watcher = _WATCHERS.get(application)
    if watcher is not None:
        await watcher.deregister()


async def stop(application: web.Application) -> None:
    """Stop the application's watcher for good; for a clean shutdown.

    Requests go on answering the last known state, with ``consul``
    :data:`~.status.STOPPED`; only :func:`watch` starts a new watcher.
    It may be awaited on any loop: the watcher stops on its own (on a loop
    that is closed or not running it is abandoned, without deregistering).
    """
    state = _state(application)
    state.stopped = True
    watcher = _WATCHERS.get(application)
    if watcher is not None:
        await stop_on_owner(watcher._loop, watcher.stop, watcher.abandon)
    await checks.stop(application)


@contextlib.contextmanager
def replaced(
    application: web.Application, watcher: ConsulWatcher
) -> Iterator[ConsulWatcher]:
    """Within the block, ``watcher`` is the one ``application`` reads.

    Afterwards the application's own watcher (or none) is back, stopped or
    not as it was. The public seam for tests, as in
    :func:`~sprockets_status_consul.testing.consul_says`; ``watcher`` is
    started on first use if it was not, and stopping it is the caller's.
    """
    state = _state(application)
    previous, was_stopped = _WATCHERS.get(application), state.stopped
    _WATCHERS[application], state.stopped = watcher, False
    try:
        yield watcher
    finally:
        state.stopped = was_stopped
        if previous is None:
            _WATCHERS.pop(application, None)
        else:
            _WATCHERS[application] = previous
