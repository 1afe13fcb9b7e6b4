"""The ``/status`` request handlers.

:class:`StatusHandler` is the original ``sprockets.handlers.status`` handler:
it reports ``application.status``. :class:`ConsulStatusHandler` adds what
Consul says, read from the application's watcher (:mod:`.watcher`) in memory,
so a request never waits on Consul once its first answer is in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Awaitable
from typing import Any

from tornado import web

from .settings import SettingsError
from .status import MAINTENANCE, OK, ConsulStatus
from .watcher import ConsulWatcher, watch

LOGGER = logging.getLogger(__name__)

_application_name: str | None = None
_logged_errors: set[str] = set()


def set_application(name: str) -> None:
    """Set the application name reported by every status handler.

    The reported ``version`` is the version of the installed distribution of
    that name.
    """
    global _application_name
    _application_name = name


@functools.lru_cache(maxsize=16)
def _version(name: str | None) -> str:
    if not name:
        return "unknown"
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "unknown"


class StatusHandler(web.RequestHandler):
    """Reports the application's status: 200 for ok, 503 for maintenance.

    The status is ``application.status`` (:data:`~.status.OK` when unset);
    anything but ok and maintenance answers 500. The body is a JSON object
    with ``application``, ``status`` and ``version``. Subclasses change the
    answer through :meth:`_application_status`, :meth:`_status_response` and
    :meth:`_status_response_code`, as with the original handler.
    """

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def get(self, *args: Any, **kwargs: Any) -> None:
        self.set_status(self._status_response_code())
        self.write(self._status_response())

    head = get

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors (405 for other methods, say) answer JSON too."""
        self.finish({"error": self._reason, "code": status_code})

    def _application_status(self) -> str:
        """The status to report, by default ``application.status``."""
        return str(getattr(self.application, "status", OK))

    def _status_response(self) -> dict[str, Any]:
        """The body of the answer."""
        return {
            "application": _application_name or "unknown",
            "status": self._application_status(),
            "version": _version(_application_name),
        }

    def _status_response_code(self) -> int:
        """The HTTP status code of the answer."""
        status = self._application_status()
        if status == OK:
            return 200
        if status == MAINTENANCE:
            return 503
        return 500


class ConsulStatusHandler(StatusHandler):
    """Reports maintenance while Consul says so, else the application's status.

    A status the application sets itself that is not ok wins; otherwise the
    status comes from the application's :class:`~.watcher.ConsulWatcher`,
    configured by the ``consul_status`` application setting. The body adds
    ``consul`` (what the watcher knows of Consul: ``connected``,
    ``starting``, ``unreachable`` or ``stale``) and, in maintenance,
    ``source`` and ``reason``.

    Only the first requests of a process may wait, at most ``startup_wait``
    seconds, for Consul's first answer; every other request reads memory.
    """

    consul_status: ConsulStatus

    def prepare(self) -> Awaitable[None] | None:
        try:
            watcher = watch(self.application)
        except SettingsError as error:
            if str(error) not in _logged_errors:
                _logged_errors.add(str(error))
                LOGGER.error("cannot follow Consul: %s", error)
            raise web.HTTPError(500, reason="Bad consul_status setting") from None
        if watcher.ready:
            self.consul_status = watcher.status()
            return None
        return self._wait_for_first_answer(watcher)

    async def _wait_for_first_answer(self, watcher: ConsulWatcher) -> None:
        await watcher.wait_ready(watcher.settings.startup_wait)
        self.consul_status = watcher.status()

    def _application_status(self) -> str:
        status = super()._application_status()
        if status != OK:
            return status
        return self.consul_status.status

    def _status_response(self) -> dict[str, Any]:
        body = super()._status_response()
        consul = self.consul_status
        body["consul"] = consul.consul
        if super()._application_status() != OK:
            body["source"] = "application"
        elif consul.status != OK:
            body["source"] = consul.source
            body["reason"] = consul.reason
        if consul.age is not None:
            body["consul_age"] = consul.age
        return body
