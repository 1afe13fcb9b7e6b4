"""The status values and the watcher's answer, shared by the handler and watcher."""

from __future__ import annotations

import dataclasses

OK = "ok"
"""The application can take traffic: ``/status`` answers 200."""

MAINTENANCE = "maintenance"
"""The application should get no traffic: ``/status`` answers 503."""

UNKNOWN = "unknown"
"""Neither of the above: ``/status`` answers 500, as the original handler did."""

# What the watcher knows of Consul, reported as the ``consul`` field of the body.
STARTING = "starting"
"""No answer from Consul yet and no error either."""

CONNECTED = "connected"
"""The last exchange with Consul succeeded; the answer is current."""

UNREACHABLE = "unreachable"
"""The last exchange failed; the last known answer is younger than the TTL."""

STALE = "stale"
"""The last exchange failed and the last known answer is older than the TTL."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one source of maintenance says: in maintenance or not, and why."""

    maintenance: bool
    reason: str | None = None


NOT_IN_MAINTENANCE = Verdict(maintenance=False)


@dataclasses.dataclass(frozen=True)
class ConsulStatus:
    """The watcher's answer at one moment, as the handler reports it.

    ``status`` is :data:`OK` or :data:`MAINTENANCE`; ``source`` names what put
    the application in maintenance (``"node"``, or ``"consul"`` when the
    failure policy is closed and Consul cannot be reached) and ``reason`` says
    why. ``consul`` is one of :data:`STARTING`, :data:`CONNECTED`,
    :data:`UNREACHABLE` or :data:`STALE`; ``age`` is how many seconds ago
    Consul last confirmed the answer, ``None`` when it never has.
    """

    status: str
    consul: str
    reason: str | None = None
    source: str | None = None
    age: float | None = None
