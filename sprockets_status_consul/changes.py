"""Telling the application when what ``/status`` answers changes.

``on_change(app, callback)`` calls ``callback(old, new)`` on the
application's event loop each time the answer (:class:`~.status.Answer`:
status, source, reason) changes; never per request. The answer is
re-evaluated, from memory, when

* the application's Consul watcher gets an answer or an error (a change
  reaches the listeners within milliseconds; an unchanged answer comes back
  at least once per ``ttl``, so the watcher also re-evaluates that often);
* one of the application's checks finishes a run;
* :func:`~.drain.drain` sets ``application.status`` to draining;
* the application calls :func:`status_changed` (after setting
  ``application.status`` itself).

So a change of ``application.status`` made without :func:`status_changed` is
noticed at the next of these events, at the latest one ``ttl`` later while
a watcher runs. Handler subclasses that compute their own status
(``_application_status``) are not seen: listeners follow
``application.status``, Consul and the checks.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable

from tornado import web

from . import checks
from . import status as st
from . import watcher as watcher_module

LOGGER = logging.getLogger(__name__)

Listener = Callable[[st.Answer, st.Answer], "Awaitable[None] | None"]
"""A callback of :func:`on_change`: ``callback(old, new)``, sync or async."""


class _Listener:
    """One callback, called in order: an async one finishes before the next call."""

    def __init__(self, callback: Listener) -> None:
        self.callback = callback
        self.pending: collections.deque[tuple[st.Answer, st.Answer]] = (
            collections.deque()
        )
        self.task: asyncio.Future[None] | None = None
        self.failing = False

    def call(self, old: st.Answer, new: st.Answer) -> None:
        self.pending.append((old, new))
        if self.task is None:
            self._call_pending()

    def _call_pending(self) -> None:
        while self.pending:
            old, new = self.pending.popleft()
            try:
                result = self.callback(old, new)
            except checks.UNCAUGHT:
                raise
            except BaseException:
                self._failed()
                continue
            if inspect.isawaitable(result):
                self.task = asyncio.ensure_future(self._finish(result))
                return
            self.failing = False

    async def _finish(self, awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
            self.failing = False
        except checks.UNCAUGHT:
            raise
        except BaseException:
            self._failed()
        finally:
            self.task = None
        self._call_pending()

    def _failed(self) -> None:
        """Log a failure once, until the callback succeeds again."""
        if not self.failing:
            self.failing = True
            LOGGER.exception("status change listener %r failed", self.callback)


class _Follower:
    """The listeners of one application and the last answer they were told."""

    def __init__(self, answer: st.Answer) -> None:
        self.answer = answer
        self.listeners: list[_Listener] = []
        self.changes = 0


_FOLLOWERS: weakref.WeakKeyDictionary[web.Application, _Follower] = (
    weakref.WeakKeyDictionary()
)


def own_status(application: web.Application) -> str:
    """``application.status``, :data:`~.status.OK` when unset."""
    return str(getattr(application, "status", st.OK))


def watcher_of(application: web.Application) -> watcher_module.ConsulWatcher | None:
    """The application's Consul watcher if it has one; never makes one."""
    return watcher_module._WATCHERS.get(application)


def current(application: web.Application) -> st.Answer:
    """What ``/status`` answers now, by memory only (see :func:`~.status.answer`)."""
    watcher = watcher_of(application)
    return st.answer(
        own_status(application),
        None if watcher is None else watcher.status(),
        checks.results(application),
    )


def follow(application: web.Application) -> _Follower:
    """The application's follower, made on first use with the answer of now."""
    follower = _FOLLOWERS.get(application)
    if follower is None:
        follower = _FOLLOWERS[application] = _Follower(current(application))
    return follower


def changes(application: web.Application) -> int:
    """How many times the answer changed since the application was followed."""
    follower = _FOLLOWERS.get(application)
    return 0 if follower is None else follower.changes


def on_change(application: web.Application, callback: Listener) -> Callable[[], None]:
    """Call ``callback(old, new)`` each time what ``/status`` answers changes.

    ``old`` and ``new`` are :class:`~.status.Answer` (``status``, ``source``,
    ``reason``). The callback runs on the application's event loop; an async
    one is awaited before the same callback is called again, so it sees the
    changes in order. An exception is logged (once, until the callback
    succeeds again) and changes nothing else. Returns a function that
    removes the callback.
    """
    follower = follow(application)
    listener = _Listener(callback)
    follower.listeners.append(listener)

    def remove() -> None:
        if listener in follower.listeners:
            follower.listeners.remove(listener)

    return remove


def status_changed(application: web.Application) -> None:
    """Re-evaluate the answer now and tell the listeners if it changed.

    Call it on the event loop after setting ``application.status``;
    otherwise the change is noticed at the next watcher or check event.
    """
    follower = _FOLLOWERS.get(application)
    if follower is None:
        return
    new = current(application)
    old = follower.answer
    if new == old:
        return
    follower.answer = new
    follower.changes += 1
    LOGGER.debug("status changed from %s to %s", old, new)
    for listener in list(follower.listeners):
        listener.call(old, new)


def _watcher_changed(watcher: watcher_module.ConsulWatcher) -> None:
    try:
        for application in {*_FOLLOWERS.keys(), *checks.applications()}:
            if watcher_of(application) is watcher:
                checks.start(application)  # checks start with the watcher
                status_changed(application)
    except Exception:  # never into the watcher's loop
        LOGGER.exception("cannot evaluate the status after a Consul answer")


watcher_module.OBSERVERS.append(_watcher_changed)
checks.OBSERVERS.append(status_changed)
