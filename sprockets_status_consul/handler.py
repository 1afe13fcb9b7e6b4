"""The ``/status`` request handlers.

:class:`StatusHandler` is the original ``sprockets.handlers.status`` handler:
it reports ``application.status``. :class:`ConsulStatusHandler` adds what
Consul says, read from the application's watcher (:mod:`.watcher`) in memory,
so a request never waits on Consul once its first answer is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import importlib.metadata
import json
import logging
import operator
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, NamedTuple, TypeVar, overload

from tornado import escape, httputil, web
from tornado.log import access_log

from . import checks as checks_module
from . import health
from . import status as st
from .settings import SettingsError
from .status import CONNECTED, DRAINING, MAINTENANCE, OK, UNKNOWN, ConsulStatus
from .watcher import ConsulWatcher, current

LOGGER = logging.getLogger(__name__)

_application_name: str | None = None
_logged_errors: set[str] = set()


UNAVAILABLE = "unavailable"
"""The ``consul`` field when the application has no watcher to ask: its
``consul_status`` setting is bad, or the watcher could not be had."""


BAD_SETTING = "bad consul_status setting (see the log)"
"""The ``reason`` of the status body when the ``consul_status`` setting is bad.

The body is for whoever can reach ``/status``; the error names the setting's
value, so it goes to the log only."""


def set_application(name: str) -> None:
    """Set the application name reported by status handlers of every application.

    An application's own ``service`` and ``version`` settings (the
    ``sprockets.http`` convention) win over it. The reported ``version`` is
    the ``version`` setting, else the version of the installed distribution
    of that name.
    """
    global _application_name
    _application_name = name


def application_identity(application: web.Application) -> tuple[str, str]:
    """The name and version a status handler reports for ``application``.

    The ``service`` and ``version`` application settings come first, so two
    applications in one process can differ; then :func:`set_application`
    and the installed distribution's version; else ``"unknown"``.
    """
    settings = application.settings
    name = str(settings.get("service") or _application_name or "unknown")
    version = settings.get("version") or _version(name)
    return name, str(version)


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log line, with the status handlers' 503s at INFO.

    Tornado logs every 5xx at ERROR, so a load balancer polling a backend in
    maintenance or draining fills the log with errors. Pass it as the
    ``log_function`` application setting; the line is Tornado's own
    (``503 GET /status (10.0.0.1) 0.42ms``).
    """
    status = handler.get_status()
    if status < 400 or (status == 503 and isinstance(handler, StatusHandler)):
        log = access_log.info
    elif status < 500:
        log = access_log.warning
    else:
        log = access_log.error
    request = handler.request
    log(
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        request.uri,
        request.remote_ip,
        1000.0 * request.request_time(),
    )


_T = TypeVar("_T")


class _per_request(Generic[_T]):
    """A value computed once per handler, at first use: each request has its
    own handler, so it is read once per request.

    :func:`functools.cached_property` without its lock, which before Python
    3.12 cost a request about 2 µs for the five values of
    :class:`ConsulStatusHandler`. The value is kept in an attribute of its
    own (``_value_NAME``), so later reads find it, ``super()``'s from a
    subclass's override included; assigning the value sets it. Computing or
    assigning one (but ``_consul``, the watcher) marks the handler
    (``_read_through_values``): it then answers through its values.
    """

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name: str | None = None
        self.slot = ""
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        if self.name is not None and self.name != name:
            raise TypeError(f"one _per_request cannot be both {self.name} and {name}")
        self.name, self.slot = name, f"_value_{name}"

    @overload
    def __get__(
        self, instance: None, owner: type | None = None
    ) -> _per_request[_T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        if not self.slot:
            raise TypeError("a _per_request value must be set in a class body")
        value = getattr(instance, self.slot, _UNSET)
        if value is _UNSET:
            value = self.func(instance)
            self.__set__(instance, value)
        return value

    def __set__(self, instance: object, value: _T) -> None:
        setattr(instance, self.slot, value)
        if self.name != "_consul":
            setattr(instance, "_read_through_values", True)  # noqa: B010

    def __delete__(self, instance: object) -> None:
        with contextlib.suppress(AttributeError):
            delattr(instance, self.slot)


_UNSET: Any = object()


@functools.lru_cache(maxsize=16)
def _version(name: str | None) -> str:
    if not name or name == "unknown":
        return "unknown"
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "unknown"


def _application_check(status: str) -> list[dict[str, Any]]:
    """The health+json check of the application's own status."""
    return health.check(
        health.PASS if status == OK else health.FAIL, status, time=health.timestamp()
    )


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

    def get(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        self.set_status(self._status_response_code())
        if _wants_health(self.request):
            self.set_header("Content-Type", health.MEDIA_TYPE)
            self.write(json.dumps(self._health_response()))
        else:
            self.write(self._status_response())
        return None

    def head(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        """What :meth:`get` answers, without the body (Tornado drops it).

        Calls ``self.get`` when the request comes, so a subclass that
        overrides ``get`` answers ``HEAD`` with its own code and headers.
        """
        return self.get(*args, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors (405 for other methods, say) answer JSON too.

        ``error`` is the :class:`~tornado.web.HTTPError`'s reason when it has
        one, else the standard phrase of the code.
        """
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.SUPPORTED_METHODS))
        error = kwargs.get("exc_info", (None, None, None))[1]
        reason = error.reason if isinstance(error, web.HTTPError) else None
        self.finish(
            {
                "error": reason or http.client.responses.get(status_code, "Unknown"),
                "code": status_code,
            }
        )

    @staticmethod
    def _package_version() -> str:
        """The version of the :func:`set_application` distribution, or ``unknown``.

        Kept from ``sprockets.handlers.status`` for code that calls it; the
        answer's ``version`` comes from :func:`application_identity`, which
        does not call this method.
        """
        return _version(_application_name)

    def _application_status(self) -> str:
        """The status to report, by default ``application.status``."""
        return str(getattr(self.application, "status", OK))

    def _status_response(self) -> dict[str, Any]:
        """The body of the answer."""
        name, version = application_identity(self.application)
        return {
            "application": name,
            "status": self._application_status(),
            "version": version,
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
        """The answer in the ``application/health+json`` format.

        Built from :meth:`_status_response`; keys a subclass's body leaves
        out (``application``, ``status``, ``version``) come from
        :func:`application_identity` and :meth:`_application_status`.
        """
        body = self._status_response()
        checks = self._health_checks()
        name, version = application_identity(self.application)
        name = str(body.get("application", name))
        own = body.get("status", self._application_status())
        status = health.worst(
            health.PASS if own == OK else health.FAIL,
            *(entry[0]["status"] for entry in checks.values()),
        )
        answer: dict[str, Any] = {
            "status": status,
            "version": str(body.get("version", version)),
            "serviceId": name,
            "description": f"status of {name}",
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
        return {
            "process:alive": health.check(health.PASS, "alive", time=health.timestamp())
        }


class ConsulStatusHandler(StatusHandler):
    """Reports maintenance while Consul says so, else the application's status.

    A status the application sets itself that is not ok wins; otherwise the
    status comes from the application's :class:`~.watcher.ConsulWatcher`,
    configured by the ``consul_status`` application setting. The body adds
    ``consul`` (what the watcher knows of Consul: ``connected``,
    ``starting``, ``unreachable`` or ``stale``; ``unavailable`` when there is
    no watcher to ask) and, in maintenance, ``source`` and ``reason``.

    Only the first requests of a process may wait, at most ``startup_wait``
    seconds, for Consul's first answer: :meth:`prepare` then returns a future
    to await, and ``None`` from then on. The status is read from memory
    where it is used (:attr:`consul_status`, :attr:`own_status`), not set by
    :meth:`prepare`, so a subclass or mixin whose ``prepare`` calls
    ``super().prepare()`` without awaiting it still answers correctly; it
    only forgoes that first wait.

    The JSON body is encoded once per answer, not once per request: while
    the answer (status, source, reason, ``consul``) and the application's
    name and version stay the same, a request writes the bytes it wrote last
    time. That holds only for a class that keeps the hooks the body comes
    from (:meth:`_status_response`, :meth:`_status_response_code`,
    :meth:`_application_status` and ``write``, and no ``get`` reached
    through ``super()``); one that overrides any of them, when it is made or
    later (a class decorator, a patch), is asked on every request. A class
    that also keeps the per-request values (:attr:`consul_status`,
    :attr:`own_status`, :attr:`check_results`, :attr:`answer`) does not
    even compose the answer while its sources stay the same objects (see
    :meth:`_answered`), unless one of the values was computed or assigned
    before :meth:`get` (then it is what the body says) or the request's
    ``Accept`` prefers health+json.

    The watcher is asked for once per request. When there is none to ask,
    the answer is still a status body: a bad ``consul_status`` setting
    answers 500 with status ``unknown``, ``source: "settings"`` and
    :data:`BAD_SETTING` as ``reason`` (the error itself, which may quote the
    setting, goes to the log only); any other failure to get the watcher
    answers as Consul being unreachable with the failure policy open would
    (the application's own status, ``consul: "unavailable"``), so a failure
    of this library never takes a fleet out of rotation. Each kind of
    failure is logged once, an unexpected one with its traceback.
    """

    _read_through_values = False
    """Whether a per-request value has been computed or assigned (see
    :class:`_per_request`)."""

    _value__consul: ConsulWatcher | ConsulStatus
    _value_consul_status: ConsulStatus
    _value_own_status: str
    _value_check_results: tuple[st.CheckResult, ...]

    def get(self, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        cls = type(self)
        shape = vars(cls).get(_SHAPE)
        if shape is None or shape.mro is not cls.__mro__:
            shape = _Shape.of(cls)
        if (
            shape.reads_sources
            and _as_made(cls, shape)
            and not self._read_through_values
        ):
            rendered = self._answered()
        elif shape.renders_default_body and _hooks_kept(cls, shape):
            rendered = self._rendered()
        else:
            rendered = None
        if rendered is None:
            return super().get(*args, **kwargs)
        self.set_status(rendered[0])
        self.set_header("Content-Type", _JSON_MEDIA_TYPE)
        self.write(rendered[1])
        return None

    def _answered(self) -> tuple[int, bytes] | None:
        """This request's status code and JSON body, read from the answer's
        sources: for a class that keeps the library's hooks and values, and
        a request that has neither computed nor assigned one of them.

        The answer is a function of the watcher's snapshot, the checks'
        results, ``application.status`` and the name and version settings.
        While each is the very object the last request answered this way
        read, and a str (or ``None``), the body is the same and nothing is
        composed. The values (:attr:`consul_status`, :attr:`check_results`,
        :attr:`own_status`) are then what was read. A request whose
        ``Accept`` prefers health+json is :meth:`_rendered`'s.
        """
        global _LAST
        watcher = self._consul
        accept = self.request.headers.get_list("Accept")
        if isinstance(watcher, ConsulStatus) or (accept and _prefers_health(accept)):
            return self._rendered()
        application = self.application
        settings = application.settings
        own = self._value_own_status = str(getattr(application, "status", OK))
        read = (
            watcher.status(),
            checks_module.results(application),
            own,
            settings.get("service"),
            settings.get("version"),
            _application_name,
        )
        self._value_consul_status, self._value_check_results = read[0], read[1]
        last = _LAST
        if last is not None and all(map(operator.is_, last[0], read)):
            return last[1]
        rendered = self._rendered()
        # A str is the same while it is the same object; another value may
        # change in place (str() of it is new each time, so it never matches).
        if rendered is not None and all(
            value is None or type(value) is str for value in read[2:]
        ):
            _LAST = (read, rendered)
        return rendered

    def _rendered(self) -> tuple[int, bytes] | None:
        """This request's status code and JSON body, encoded once per answer.

        ``None`` when the request asks for health+json, or when the body
        holds the answer's age, which grows.
        """
        consul, answer = self.consul_status, self.answer
        if consul.age is not None or _wants_health(self.request):
            return None
        name, version = application_identity(self.application)
        key = (
            name,
            version,
            answer.status,
            answer.source,
            answer.reason,
            consul.consul,
        )
        rendered = _RENDERED.get(key)
        if rendered is None:
            if len(_RENDERED) >= _MAX_RENDERED:
                _RENDERED.clear()
            rendered = _RENDERED[key] = (
                self._status_response_code(),
                escape.utf8(escape.json_encode(self._status_response())),
            )
        return rendered

    def prepare(self) -> Awaitable[None] | None:
        if type(self)._consul is _LIBRARY_CONSUL:  # kept, the handler unmarked
            self._value__consul = watcher = _watcher(self.application)
        else:
            watcher = self._consul
        if isinstance(watcher, ConsulStatus) or watcher.ready:
            return None
        # A future rather than a coroutine: left unawaited, it does no harm.
        return asyncio.ensure_future(self._await_first_answer(watcher))

    async def _await_first_answer(self, watcher: ConsulWatcher) -> None:
        """Wait, at most ``startup_wait`` seconds, for the watcher's first
        answer, then forget the values read before it came (a mixin may read
        them before ``super().prepare()``)."""
        await watcher.wait_ready(watcher.settings.startup_wait)
        kept = vars(self)
        for name in ("consul_status", "check_results", "answer"):
            kept.pop(f"_value_{name}", None)

    @_per_request
    def _consul(self) -> ConsulWatcher | ConsulStatus:
        """The application's watcher, or what to report when there is none
        (kept by :meth:`prepare`)."""
        return _watcher(self.application)

    @_per_request
    def consul_status(self) -> ConsulStatus:
        """What the application's watcher says, read from memory at first use."""
        watcher = self._consul
        if isinstance(watcher, ConsulStatus):
            return watcher
        return watcher.status()

    @_per_request
    def own_status(self) -> str:
        """What the application itself says (``application.status``)."""
        return super()._application_status()

    # The application's checks, and the answer they make with the rest ----

    @_per_request
    def check_results(self) -> tuple[st.CheckResult, ...]:
        """What the application's checks said when the request came in."""
        return checks_module.results(self.application)

    @_per_request
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
        consul = self.consul_status
        checks = {"application:status": _application_check(self.own_status)}
        if consul.consul == UNAVAILABLE:
            checks["consul:watcher"] = health.check(
                health.FAIL if consul.status != OK else health.WARN,
                UNAVAILABLE,
                output=consul.reason,
                time=health.timestamp(),
            )
        for source in consul.sources:
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
                _heard_at(source.consul, consul.age),
            )
        for result in self.check_results:
            checks[f"{result.name}:status"] = health.check_result(result)
        return checks


_JSON_MEDIA_TYPE = "application/json; charset=UTF-8"
"""The ``Content-Type`` of the JSON body, as Tornado sets it for a ``dict``."""

_BODY_HOOKS = (
    "_status_response",
    "_status_response_code",
    "_application_status",
    "write",
)
_VALUES = ("_consul", "consul_status", "own_status", "check_results", "answer")
"""The per-request values of :class:`ConsulStatusHandler`."""
_SUPER_HOOKS = frozenset({"_status_response", "_application_status", "get"})
"""What :class:`ConsulStatusHandler` reaches through ``super()``."""
_DEFAULT_BODY_CLASSES = frozenset(
    {ConsulStatusHandler, StatusHandler, web.RequestHandler, object}
)


def _overrides(
    cls: type, names: Iterable[str], bases: Iterable[type] | None = None
) -> bool:
    """Whether a class in ``cls``'s MRO (or in ``bases``) other than this
    module's handlers (and Tornado's) defines one of ``names``."""
    return any(
        name in vars(base)
        for base in (cls.__mro__ if bases is None else bases)
        if base not in _DEFAULT_BODY_CLASSES
        for name in names
    )


_hooks_of = operator.attrgetter(*_BODY_HOOKS)
_reached_through_super = operator.attrgetter("_status_response", "_application_status")
_values_of = operator.itemgetter(*_VALUES)
_LIBRARY_HOOKS = _hooks_of(ConsulStatusHandler)
_LIBRARY_SUPER_HOOKS = _reached_through_super(StatusHandler)
_HANDLER_NAMESPACE = vars(ConsulStatusHandler)
_LIBRARY_VALUES = _values_of(_HANDLER_NAMESPACE)
_LIBRARY_CONSUL = _HANDLER_NAMESPACE["_consul"]
_VALUE_NAMES = frozenset(_VALUES)
_IDENTITY = application_identity
_ANSWER = st.answer
_GETATTRIBUTE = object.__getattribute__

_SHAPE = "_status_handler_shape"
"""The attribute of a handler class that keeps its :class:`_Shape`."""


class _Shape(NamedTuple):
    """What a handler class's MRO makes of the body's hooks and values,
    kept in the class for the MRO it was found in (``__bases__`` may be
    assigned, and a base's ``__init_subclass__`` may not call ``super()``)."""

    mro: tuple[type, ...]
    renders_default_body: bool
    """It keeps the hooks the JSON body comes from (at its making), so the
    body may be encoded once per answer."""
    reads_sources: bool
    """It keeps the per-request values too, so the answer may be read from
    its sources."""
    before: tuple[Mapping[str, Any], ...]
    """The namespaces of the classes before :class:`ConsulStatusHandler`:
    a value given to one later would be read instead of the library's."""
    between: tuple[Mapping[str, Any], ...]
    """The namespaces of the classes between :class:`ConsulStatusHandler`
    and :class:`StatusHandler`, which ``super()`` reaches."""

    @classmethod
    def of(cls, handler: type[ConsulStatusHandler]) -> _Shape:
        mro = handler.__mro__
        at = mro.index(ConsulStatusHandler)
        # A get after the handler in the MRO is reached only through
        # super().get(), which a written body skips: it must be asked.
        renders = not (
            _overrides(handler, _BODY_HOOKS)
            or _overrides(handler, ("get",), mro[at + 1 :])
        )
        shape = cls(
            mro,
            renders,
            renders and not _overrides(handler, _VALUES),
            tuple(vars(base) for base in mro[:at]),
            tuple(vars(base) for base in mro[at + 1 : mro.index(StatusHandler)]),
        )
        setattr(handler, _SHAPE, shape)
        return shape


def _hooks_kept(cls: type[ConsulStatusHandler], shape: _Shape) -> bool:
    """Whether ``cls`` has the body's hooks of this library still, those
    ``super()`` reaches included: a class decorator, or a test's patch, may
    change one after the class is made (and the body is then not kept)."""
    return (
        _hooks_of(cls) == _LIBRARY_HOOKS
        and _reached_through_super(StatusHandler) == _LIBRARY_SUPER_HOOKS
        and all(map(_SUPER_HOOKS.isdisjoint, shape.between))
    )


def _as_made(cls: type[ConsulStatusHandler], shape: _Shape) -> bool:
    """Whether ``cls`` has this library's hooks and per-request values still,
    and what they call (:func:`application_identity`, :func:`.status.answer`,
    attribute lookup), so that the answer may be read from its sources."""
    return (
        _hooks_kept(cls, shape)
        and _values_of(_HANDLER_NAMESPACE) == _LIBRARY_VALUES
        and all(map(_VALUE_NAMES.isdisjoint, shape.before))
        and application_identity is _IDENTITY
        and st.answer is _ANSWER
        and cls.__getattribute__ is _GETATTRIBUTE
    )


_LAST: tuple[tuple[object, ...], tuple[int, bytes]] | None = None
"""What the last request answered from the sources read (see
:meth:`ConsulStatusHandler._answered`), and the status code and body."""

_MAX_WANTED = 64
_WANTED: dict[str, bool] = {}
"""Whether an ``Accept`` header prefers health+json, for the latest headers
seen; cleared when full."""


def _prefers_health(accept: list[str]) -> bool:
    """:func:`.health.wanted` of the ``Accept`` header's values, kept."""
    header = ",".join(accept)
    wanted = _WANTED.get(header)
    if wanted is None:
        if len(_WANTED) >= _MAX_WANTED:
            _WANTED.clear()
        wanted = _WANTED[header] = health.wanted(header)
    return wanted


_MAX_RENDERED = 64
_RENDERED: dict[tuple[str | None, ...], tuple[int, bytes]] = {}
"""The status code and encoded body of the latest answers (name, version,
status, source, reason, ``consul``); cleared when full, as reasons can vary."""


def _watcher(application: web.Application) -> ConsulWatcher | ConsulStatus:
    """``application``'s watcher, or what to report when there is none."""
    try:
        return current(application)
    except SettingsError as error:
        if _first_time(f"settings: {error}"):
            LOGGER.error("cannot follow Consul: %s", error)
        return ConsulStatus(UNKNOWN, UNAVAILABLE, BAD_SETTING, "settings")
    except Exception as error:
        kind = type(error)
        if _first_time(f"{kind.__module__}.{kind.__qualname__}"):
            LOGGER.exception("cannot follow Consul: unexpected error")
        return ConsulStatus(OK, UNAVAILABLE, f"unexpected error: {kind.__name__}", None)


def _wants_health(request: httputil.HTTPServerRequest) -> bool:
    """Whether the request's ``Accept`` prefers health+json (:func:`.health.wanted`).

    ``get_list``: no ``KeyError`` raised and caught when there is no header.
    """
    return health.wanted(",".join(request.headers.get_list("Accept")))


def _first_time(kind: str) -> bool:
    """Whether a failure of this kind is new to the process (and remember it)."""
    if kind in _logged_errors:
        return False
    _logged_errors.add(kind)
    return True


def _heard_at(state: str, age: float | None) -> str | None:
    """When Consul last confirmed a source's answer, as health+json ``time``.

    A connected source is current: its blocking query stands, and Consul
    answers it as soon as anything changes. Otherwise the answer is ``age``
    seconds old, or there never was one.
    """
    if state == CONNECTED:
        return health.timestamp()
    if age is None:
        return None
    return health.timestamp(age)
