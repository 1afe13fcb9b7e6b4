"""The ``/status`` request handlers.

:class:`StatusHandler` is the original ``sprockets.handlers.status`` handler:
it reports ``application.status``. :class:`ConsulStatusHandler` adds what
Consul says, read from the application's watcher (:mod:`.watcher`) in memory,
so a request never waits on Consul once its first answer is in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
from collections.abc import Awaitable
from typing import Any

from tornado import escape, web

from . import checks as checks_module
from . import health
from . import status as st
from .settings import SettingsError
from .status import CONNECTED, DRAINING, MAINTENANCE, OK, ConsulStatus
from .watcher import ConsulWatcher, current

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


_ENCODED: dict[tuple[tuple[str, Any], ...], bytes] = {}


def _encoded(body: dict[str, Any]) -> bytes:
    """``body`` as JSON bytes, as ``RequestHandler.write`` would encode it.

    Status answers repeat: while nothing changes every request has the same
    body, so the encoding is remembered (for a few hundred distinct bodies;
    bodies with values that cannot be hashed are encoded every time).
    """
    try:
        key = tuple(body.items())
        return _ENCODED[key]
    except KeyError:
        pass
    except TypeError:
        return escape.utf8(escape.json_encode(body))
    if len(_ENCODED) >= 256:
        _ENCODED.clear()
    encoded = _ENCODED[key] = escape.utf8(escape.json_encode(body))
    return encoded


def _application_check(status: str) -> list[dict[str, Any]]:
    """The health+json check of the application's own status."""
    return health.check(health.PASS if status == OK else health.FAIL, status)


class StatusHandler(web.RequestHandler):
    """Reports the application's status: 200 for ok, 503 for maintenance.

    The status is ``application.status`` (:data:`~.status.OK` when unset);
    :data:`~.status.DRAINING` answers 503 too, anything else 500. The body is
    a JSON object with ``application``, ``status`` and ``version``, or the
    ``application/health+json`` format when the request asks for it.
    Subclasses change the answer through :meth:`_application_status`,
    :meth:`_status_response` and :meth:`_status_response_code`, as with the
    original handler.
    """

    SUPPORTED_METHODS = ("GET", "HEAD")

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Vary", "Accept")

    def compute_etag(self) -> None:
        """No ETag, so no 304: a status is never "not modified"."""
        return None

    def get(self, *args: Any, **kwargs: Any) -> None:
        self.set_status(self._status_response_code())
        if health.wanted(self.request.headers.get("Accept", "")):
            self.set_header("Content-Type", health.MEDIA_TYPE)
            self.write(json.dumps(self._health_response()))
        else:
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.write(_encoded(self._status_response()))

    head = get

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors (405 for other methods, say) answer JSON too."""
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.SUPPORTED_METHODS))
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
        if status in (MAINTENANCE, DRAINING):
            return 503
        return 500

    def _health_checks(self) -> dict[str, list[dict[str, Any]]]:
        """The ``checks`` of the health+json answer: here, the application's."""
        return {"application:status": _application_check(self._application_status())}

    def _health_response(self) -> dict[str, Any]:
        """The answer in the ``application/health+json`` format."""
        body = self._status_response()
        checks = self._health_checks()
        status = health.worst(
            health.PASS if body["status"] == OK else health.FAIL,
            *(entry[0]["status"] for entry in checks.values()),
        )
        answer: dict[str, Any] = {
            "status": status,
            "version": body["version"],
            "serviceId": body["application"],
            "description": f"status of {body['application']}",
            "checks": checks,
        }
        notes = [
            f"{key}: {value}"
            for key, value in body.items()
            if key not in ("application", "status", "version")
        ]
        if notes:
            answer["notes"] = notes
        if body.get("reason"):
            answer["output"] = body["reason"]
        return answer


class LivenessHandler(StatusHandler):
    """Answers 200 while the process serves, whatever its status.

    The liveness probe beside the readiness probe (the status handler): an
    orchestrator that restarts processes failing liveness leaves alone a
    healthy process that is in maintenance or draining.
    """

    def _application_status(self) -> str:
        return OK

    def _health_checks(self) -> dict[str, list[dict[str, Any]]]:
        return {"process:alive": health.check(health.PASS, "alive")}


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
    """What the application's watcher said when the request came in."""

    own_status: str
    """What the application itself says (``application.status``)."""

    def prepare(self) -> Awaitable[None] | None:
        self.own_status = super()._application_status()
        try:
            watcher = current(self.application)
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

    # The application's checks, and the answer they make with the rest ----

    @functools.cached_property
    def check_results(self) -> tuple[st.CheckResult, ...]:
        """What the application's checks said when the request came in."""
        return checks_module.results(self.application)

    @functools.cached_property
    def answer(self) -> st.Answer:
        """What this request answers, in the order of :func:`~.status.answer`."""
        return st.answer(self.own_status, self.consul_status, self.check_results)

    def _application_status(self) -> str:
        return self.answer.status

    def _status_response(self) -> dict[str, Any]:
        body = super()._status_response()
        consul = self.consul_status
        body["consul"] = consul.consul
        if self.answer.source is not None:
            body["source"] = self.answer.source
        if self.answer.reason is not None:
            body["reason"] = self.answer.reason
        if consul.age is not None:
            body["consul_age"] = consul.age
        return body

    def _health_checks(self) -> dict[str, list[dict[str, Any]]]:
        checks = {"application:status": _application_check(self.own_status)}
        for source in self.consul_status.sources:
            if source.maintenance:
                status = health.FAIL
            elif source.consul == CONNECTED:
                status = health.PASS
            else:
                status = health.WARN
            checks[f"consul-{source.name}:maintenance"] = health.check(
                status,
                MAINTENANCE if source.maintenance else OK,
                source.subject,
                source.reason if source.maintenance else source.error,
            )
        for result in self.check_results:
            checks[f"{result.name}:status"] = health.check_result(result)
        return checks
