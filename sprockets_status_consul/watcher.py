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
* an unchanged answer that comes back early is not asked again at once.

Errors are retried with capped exponential backoff and jitter, logged
once per change of state, and never reach a request: :meth:`ConsulWatcher.status`
only reads memory. What a request reports while Consul cannot be reached is
the failure policy (:data:`~.settings.FAIL_OPEN` or
:data:`~.settings.FAIL_CLOSED`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

from tornado import web

from . import checks
from . import status as st
from .settings import FAIL_CLOSED, SETTING, Settings
from .transport import ConsulClient, ConsulError, ConsulTimeout

LOGGER = logging.getLogger(__name__)

NODE_MAINTENANCE_CHECK = "_node_maintenance"
"""The check ``consul maint -enable`` sets critical on the node."""

SERVICE_MAINTENANCE_CHECK = "_service_maintenance:"
"""The prefix of the check ``consul maint -enable -service ID`` sets critical."""

RETRY_MIN = 0.05
"""First retry delay after an error, in seconds; it doubles up to ``retry_max``."""

MIN_INTERVAL = 0.05
"""An unchanged answer that came back sooner than this is not asked again at once."""

OBSERVERS: list[Callable[[ConsulWatcher], None]] = []
"""Called on the loop after each answer or error of a watcher (see :mod:`.changes`)."""


class Source:
    """One place maintenance can come from, followed by its own query loop."""

    name = "source"

    def describe(
        self, verdict: st.Verdict | None, consul: str, error: str | None
    ) -> list[st.SourceStatus]:
        """What this source reports, one entry per kind of maintenance."""
        maintenance = verdict is not None and verdict.maintenance
        reason = verdict.reason if verdict is not None else None
        return [
            st.SourceStatus(self.name, self.subject, maintenance, consul, reason, error)
        ]

    @property
    def subject(self) -> str | None:
        """What is followed: a node name, a key."""
        return None

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, st.Verdict]:
        """Ask Consul once; return the index to block on next and the verdict."""
        raise NotImplementedError


class NodeSource(Source):
    """Node and service maintenance, from the checks of the agent's node.

    ``consul maint -enable`` sets the node's ``_node_maintenance`` check
    critical; ``consul maint -enable -service ID`` sets the check
    ``_service_maintenance:ID``. Both are checks of the node, so one blocking
    query follows both; node maintenance comes first.

    Without a ``node`` setting the node is the one of the agent the watcher
    talks to, asked once; the process's host name is not used, since it is
    wrong whenever the application and the agent run in different containers.
    """

    name = "node"

    def __init__(self, node: str | None, service: str | None = None) -> None:
        self.node = node
        self.service = service
        self.service_check = (
            None if service is None else f"{SERVICE_MAINTENANCE_CHECK}{service}"
        )

    @property
    def subject(self) -> str | None:
        return self.node

    def describe(
        self, verdict: st.Verdict | None, consul: str, error: str | None
    ) -> list[st.SourceStatus]:
        source = verdict.source if verdict is not None else None
        reason = verdict.reason if verdict is not None else None
        entries = [
            st.SourceStatus(
                "node",
                self.node,
                source == "node",
                consul,
                reason if source == "node" else None,
                error,
            )
        ]
        if self.service is not None:
            entries.append(
                st.SourceStatus(
                    "service",
                    self.service,
                    source == "service",
                    consul,
                    reason if source == "service" else None,
                    error,
                )
            )
        return entries

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, st.Verdict]:
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
        critical = {
            check["CheckID"]: check.get("Notes") or ""
            for check in checks
            if check.get("Status") == "critical"
        }
        if NODE_MAINTENANCE_CHECK in critical:
            reason = critical[NODE_MAINTENANCE_CHECK] or "node maintenance"
            return consul_index, st.Verdict(True, reason, "node")
        if self.service_check in critical:
            reason = critical[self.service_check] or "service maintenance"
            return consul_index, st.Verdict(True, reason, "service")
        return consul_index, st.NOT_IN_MAINTENANCE


class KeySource(Source):
    """The fleet-wide switch: while a Consul KV key exists, every backend that
    follows it is in maintenance, and the key's value is the reason::

        consul kv put service/my-service/maintenance "deploy 42"
        consul kv delete service/my-service/maintenance
    """

    name = "key"

    def __init__(self, key: str) -> None:
        self.key = key

    @property
    def subject(self) -> str | None:
        return self.key

    async def query(
        self, client: ConsulClient, index: int, wait: float | None
    ) -> tuple[int, st.Verdict]:
        consul_index, value = await client.kv_value(self.key, index, wait)
        if value is None:
            return consul_index, st.NOT_IN_MAINTENANCE
        reason = value.decode("utf-8", "replace").strip()
        return consul_index, st.Verdict(True, reason or f"key {self.key} is set")


class _Followed:
    """What the watcher last learned from one source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.verdict: st.Verdict | None = None  # None until the first answer
        self.error: str | None = None
        self.answered_at: float | None = None  # time.monotonic() of last answer
        self.failed_at: float | None = None


class ConsulWatcher:
    """Follows Consul for one application and keeps the answer in memory.

    Create it with :func:`watch` (or let the first request do so); it runs
    on the IOLoop it was started on until :meth:`stop`, or until that loop
    cancels its tasks. :meth:`status` never waits and never fails.

    :param settings: resolved settings, see :class:`~.settings.Settings`.
    :param client: the Consul client, made from ``settings`` when omitted.
    """

    def __init__(self, settings: Settings, client: ConsulClient | None = None) -> None:
        self.settings = settings
        self._client = client
        sources: list[Source] = [NodeSource(settings.node, settings.service)]
        if settings.key is not None:
            sources.append(KeySource(settings.key))
        self._followed = [_Followed(source) for source in sources]
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._snapshot: st.ConsulStatus | None = None
        self._stopped = False
        self.ready = False
        """Whether every source has answered or failed at least once."""
        self.queries = {"ok": 0, "error": 0, "timeout": 0}
        """How many queries to Consul ended in each outcome (see :mod:`.metrics`)."""

    @property
    def node(self) -> str | None:
        """The Consul node followed, once known."""
        source = self._followed[0].source
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
        """Start following Consul on the running event loop; idempotent."""
        if self._tasks:
            return
        if self._stopped:
            raise RuntimeError("a stopped ConsulWatcher cannot be started again")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        if self._client is None:
            self._client = ConsulClient(self.settings)
        for followed in self._followed:
            task = self._loop.create_task(self._follow(followed))
            self._tasks.append(task)

    def abandon(self) -> None:
        """Stop without awaiting: for a watcher whose loop will not run again."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._client is not None:
            self._client.close()

    async def stop(self) -> None:
        """Stop following Consul and close its connections."""
        self._stopped = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            self._client.close()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the first answers; True when ready."""
        if self.ready:
            return True
        if (
            self._ready is None
            or timeout <= 0
            or self._loop is not asyncio.get_running_loop()
        ):
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
        client = self._client
        assert client is not None
        settings = self.settings
        wait = settings.wait if settings.blocking else None
        index = 0
        failures = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    new_index, verdict = await followed.source.query(
                        client, index, wait if index else None
                    )
                except ConsulError as error:
                    timeout = isinstance(error, ConsulTimeout)
                    self.queries["timeout" if timeout else "error"] += 1
                    failures += 1
                    self._failed(followed, str(error))
                    index = 0
                    await asyncio.sleep(_backoff(failures, settings.retry_max))
                    continue
                except Exception as error:  # a bug here must not stop the loop
                    self.queries["error"] += 1
                    failures += 1
                    if failures == 1:
                        LOGGER.exception("unexpected error following Consul")
                    self._failed(followed, f"unexpected error: {type(error).__name__}")
                    index = 0
                    await asyncio.sleep(_backoff(failures, settings.retry_max))
                    continue
                self.queries["ok"] += 1
                failures = 0
                self._answered(followed, verdict)
                if not settings.blocking:
                    await asyncio.sleep(settings.ttl)
                    continue
                if new_index < index:
                    LOGGER.info(
                        "Consul index went back from %d to %d: resetting",
                        index,
                        new_index,
                    )
                    index = 0
                    continue
                if new_index == index and time.monotonic() - started < MIN_INTERVAL:
                    await asyncio.sleep(MIN_INTERVAL)
                # Index 0 would never block: Consul's advice is to use 1.
                index = max(new_index, 1)
        finally:
            if not self._stopped and self._client is not None:
                # Cancelled by the loop rather than by stop(): close anyway.
                self._stopped = True
                self._client.close()

    def _answered(self, followed: _Followed, verdict: st.Verdict) -> None:
        now = time.monotonic()
        if followed.error is not None:
            down = now - (followed.failed_at or now)
            LOGGER.info(
                "Consul %s answers again after %.1f s", self.settings.address, down
            )
        if verdict != followed.verdict:
            if verdict.maintenance:
                name = verdict.source or followed.source.name
                LOGGER.info("%s maintenance enabled: %s", name, verdict.reason)
            elif followed.verdict is not None and followed.verdict.maintenance:
                name = followed.verdict.source or followed.source.name
                LOGGER.info("%s maintenance disabled", name)
        followed.verdict = verdict
        followed.error = None
        followed.failed_at = None
        followed.answered_at = now
        self._changed(now)

    def _failed(self, followed: _Followed, error: str) -> None:
        now = time.monotonic()
        if error != followed.error:
            LOGGER.warning(
                "cannot follow %s maintenance (%s); %s",
                followed.source.name,
                error,
                "serving maintenance once the last answer is older than the TTL"
                if self.settings.failure_mode == FAIL_CLOSED
                else "serving the last known status",
            )
        if followed.error is None:
            followed.failed_at = now
        followed.error = error
        self._changed(now)

    def _changed(self, now: float) -> None:
        snapshot = self._compute(now)
        # Only an answer with no error in it is the same whatever the time.
        self._snapshot = snapshot if snapshot.consul == st.CONNECTED else None
        if not self.ready:
            self.ready = all(
                f.verdict is not None or f.error is not None for f in self._followed
            )
        if self.ready and self._ready is not None:
            self._ready.set()
        for observer in OBSERVERS:  # what /status answers may have changed
            observer(self)

    def _compute(self, now: float) -> st.ConsulStatus:
        settings = self.settings
        states = []
        ages = []
        sources: list[st.SourceStatus] = []
        maintenance: tuple[str, str | None] | None = None
        source: str | None
        reason: str | None
        for followed in self._followed:
            age = None if followed.answered_at is None else now - followed.answered_at
            if followed.error is None:
                state = st.CONNECTED if followed.verdict is not None else st.STARTING
            elif (
                followed.verdict is not None
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
            verdict = followed.verdict
            if maintenance is None and verdict is not None and verdict.maintenance:
                maintenance = (verdict.source or followed.source.name, verdict.reason)
            sources.extend(followed.source.describe(verdict, state, followed.error))
        consul = max(states, key=_SEVERITY.index)
        age = max(ages, key=lambda a: float("inf") if a is None else a, default=None)
        if age is not None:
            age = round(age, 3)
        if maintenance is not None:
            source, reason = maintenance
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


def _backoff(failures: int, cap: float) -> float:
    """Capped exponential backoff with jitter: between half and all of it."""
    ceiling = min(cap, RETRY_MIN * 2 ** min(failures - 1, 32))
    return random.uniform(ceiling / 2, ceiling)


_WATCHERS: weakref.WeakKeyDictionary[web.Application, ConsulWatcher] = (
    weakref.WeakKeyDictionary()
)


def watch(application: web.Application) -> ConsulWatcher:
    """The application's watcher, made and started on first use.

    Call it once at start-up so a bad ``consul_status`` setting fails there
    (:class:`~.settings.SettingsError`) and Consul's first answer is in memory
    before the first request; otherwise the first request calls it. Within a
    running event loop the watcher starts at once; before one runs, it starts
    when the first request arrives.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    watcher = _WATCHERS.get(application)
    if watcher is not None and not watcher._stopped:
        owner = watcher._loop
        if owner is loop and loop is not None:
            return watcher  # the hot path
        if owner is None:  # made before any loop ran
            if loop is not None:
                watcher.start()
            return watcher
        if not owner.is_closed() and (loop is None or owner.is_running()):
            # Asked from another thread, or outside the loop: share the
            # watcher that follows Consul; never replace (and orphan) it.
            return watcher
        watcher.abandon()  # its loop is closed or will not run again
    config: Any = application.settings.get(SETTING)
    watcher = ConsulWatcher(Settings.from_mapping(config))
    _WATCHERS[application] = watcher
    if loop is not None:
        watcher.start()
    return watcher


async def stop(application: web.Application) -> None:
    """Stop the application's watcher and checks, if any; for a clean shutdown."""
    watcher = _WATCHERS.pop(application, None)
    if watcher is not None:
        await watcher.stop()
    await checks.stop(application)
