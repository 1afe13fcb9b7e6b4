"""A ``/status`` handler for Tornado services that follows Consul maintenance.

``StatusHandler`` is the original ``sprockets.handlers.status`` handler;
``ConsulStatusHandler`` answers 503 while Consul has the node in maintenance
(``consul maint -enable``), following Consul from one watcher per application so
that a request never waits on Consul.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ below
    from .changes import on_change, status_changed
    from .checks import add_check
    from .drain import (
        drain,
        requests_in_flight,
        serve_until_signalled,
        track_requests,
    )
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

_MODULES = {
    "changes": ("on_change", "status_changed"),
    "checks": ("add_check",),
    "drain": ("drain", "requests_in_flight", "serve_until_signalled", "track_requests"),
    "handler": (
        "ConsulStatusHandler",
        "LivenessHandler",
        "StatusHandler",
        "application_identity",
        "log_request",
        "set_application",
    ),
    "settings": ("FAIL_CLOSED", "FAIL_OPEN", "Settings", "SettingsError"),
    "status": (
        "DRAINING",
        "MAINTENANCE",
        "OK",
        "UNKNOWN",
        "Answer",
        "CheckResult",
        "ConsulStatus",
    ),
    "transport": ("ConsulError", "ConsulTimeout"),
    "watcher": ("ConsulWatcher", "current", "stop", "watch"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
"""The module each name is imported from, on first use: importing the package
(as the pytest plugin does for every test run where it is installed) loads
neither Tornado nor the ``consul`` package until a name is used."""

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


def __getattr__(name: str) -> Any:
    """The names of ``__all__``, imported on first use; and ``APPLICATION``.

    ``APPLICATION`` is the :func:`set_application` name, as in the original:
    ``sprockets.handlers.status`` kept it in a module global; reading it
    still gives it (``unknown`` before ``set_application``). Assigning to it
    changes nothing: call :func:`set_application`.
    """
    if name == "APPLICATION":
        handler = importlib.import_module(".handler", __name__)
        return handler._application_name or handler.UNKNOWN
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{home}", __name__)
    # All of the module's names at once: importing ``.drain`` binds the
    # package's ``drain`` to the module, and the function must win.
    for exported in _MODULES[home]:
        globals()[exported] = getattr(module, exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
