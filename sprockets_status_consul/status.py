"""The status values and the watcher's answer, shared by the handler and watcher."""

from __future__ import annotations

import dataclasses

OK = "ok"
"""The application can take traffic: ``/status`` answers 200."""

MAINTENANCE = "maintenance"
"""The application should get no traffic: ``/status`` answers 503."""

UNKNOWN = "unknown"
"""Neither of the above: ``/status`` answers 500, as the original handler did."""

DRAINING = "draining"
"""The process is shutting down and lets load balancers notice: 503."""

# What the watcher knows of Consul, reported as the ``consul`` field of the body.
STARTING = "starting"
"""No answer from Consul yet and no error either."""

CONNECTED = "connected"
"""The last exchange with Consul succeeded; the answer is current."""

UNREACHABLE = "unreachable"
"""The last exchange failed; the last known answer is younger than the TTL."""

STALE = "stale"
"""The last exchange failed and the last known answer is older than the TTL."""

STOPPED = "stopped"
"""The watcher was stopped (:func:`~.watcher.stop`): the last known answer stays."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one source of maintenance says: in maintenance or not, and why.

    ``source`` names the source when one query answers for several (the
    node's checks hold both node and service maintenance).
    """

    maintenance: bool
    reason: str | None = None
    source: str | None = None


NOT_IN_MAINTENANCE = Verdict(maintenance=False)


@dataclasses.dataclass(frozen=True)
class SourceStatus:
    """What the watcher knows of one source: ``node``, ``service`` or ``key``.

    ``consul`` is the state of the query that follows it (as in
    :class:`ConsulStatus`), ``error`` the last error while it is not
    connected, ``subject`` the node name, service ID or key followed.
    """

    name: str
    subject: str | None
    maintenance: bool
    consul: str
    reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ConsulStatus:
    """The watcher's answer at one moment, as the handler reports it.

    ``status`` is :data:`OK` or :data:`MAINTENANCE`; ``source`` names what put
    the application in maintenance (``"node"``, ``"service"``, ``"key"``, or
    ``"consul"`` when the failure policy is closed and Consul cannot be
    reached) and ``reason`` says why. ``consul`` is one of :data:`STARTING`,
    :data:`CONNECTED`, :data:`UNREACHABLE`, :data:`STALE` or :data:`STOPPED`;
    ``age`` is how many seconds ago Consul last confirmed the answer, ``None``
    while it is connected or when it never has. ``sources`` has one entry per source.
    """

    status: str
    consul: str
    reason: str | None = None
    source: str | None = None
    age: float | None = None
    sources: tuple[SourceStatus, ...] = ()
