"""A ``/status`` handler for Tornado services that follows Consul maintenance.

``StatusHandler`` is the original ``sprockets.handlers.status`` handler;
``ConsulStatusHandler`` answers 503 while Consul has the node in maintenance
(``consul maint -enable``), following Consul from one watcher per application so
that a request never waits on Consul.
"""

from . import handler as _handler
from .changes import on_change, status_changed
from .checks import add_check
from .drain import drain, requests_in_flight, serve_until_signalled, track_requests
from .handler import (
    ConsulStatusHandler,
    LivenessHandler,
    StatusHandler,
    application_identity,
    log_request,
    set_application,
)
from .settings import FAIL_CLOSED, FAIL_OPEN, Settings, SettingsError
from .status import (
    DRAINING,
    MAINTENANCE,
    OK,
    UNKNOWN,
    Answer,
    CheckResult,
    ConsulStatus,
)
from .transport import ConsulError, ConsulTimeout
from .watcher import ConsulWatcher, current, stop, watch

__all__ = [
    "DRAINING",
    "FAIL_CLOSED",
    "FAIL_OPEN",
    "MAINTENANCE",
    "OK",
    "UNKNOWN",
    "Answer",
    "CheckResult",
    "ConsulError",
    "ConsulStatus",
    "ConsulStatusHandler",
    "ConsulTimeout",
    "ConsulWatcher",
    "LivenessHandler",
    "Settings",
    "SettingsError",
    "StatusHandler",
    "add_check",
    "application_identity",
    "current",
    "drain",
    "log_request",
    "on_change",
    "requests_in_flight",
    "serve_until_signalled",
    "set_application",
    "status_changed",
    "stop",
    "track_requests",
    "watch",
]


def __getattr__(name: str) -> str:
    """``APPLICATION``: the :func:`set_application` name, as in the original.

    ``sprockets.handlers.status`` kept the name in a module global; reading
    ``APPLICATION`` still gives it (``unknown`` before ``set_application``).
    Assigning to it changes nothing: call :func:`set_application`.
    """
    if name == "APPLICATION":
        return _handler._application_name or UNKNOWN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
