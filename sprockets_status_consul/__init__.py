"""A ``/status`` handler for Tornado services that follows Consul maintenance.

``StatusHandler`` is the original ``sprockets.handlers.status`` handler;
``ConsulStatusHandler`` answers 503 while Consul has the node in maintenance
(``consul maint -enable``), following Consul from one watcher per process so
that a request never waits on Consul.
"""

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
from .status import DRAINING, MAINTENANCE, OK, UNKNOWN, ConsulStatus
from .transport import ConsulError
from .watcher import ConsulWatcher, stop, watch

__all__ = [
    "DRAINING",
    "FAIL_CLOSED",
    "FAIL_OPEN",
    "MAINTENANCE",
    "OK",
    "UNKNOWN",
    "ConsulError",
    "ConsulStatus",
    "ConsulStatusHandler",
    "ConsulWatcher",
    "LivenessHandler",
    "Settings",
    "SettingsError",
    "StatusHandler",
    "application_identity",
    "drain",
    "log_request",
    "requests_in_flight",
    "serve_until_signalled",
    "set_application",
    "stop",
    "track_requests",
    "watch",
]
