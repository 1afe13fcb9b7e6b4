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
class SourceAnswer:
    """What one source of maintenance says: ``node``, ``service`` or ``key``.

    A source's query returns one per kind of maintenance it follows (the
    node's checks answer for both node and service); ``subject`` is the node
    name, service ID or key followed, ``reason`` why it is in maintenance.
    The watcher fills in ``consul``, the state of the query (as in
    :class:`ConsulStatus`), and ``error``, the last error while it is not
    connected: the same answer is what :attr:`ConsulStatus.sources` holds.
    """

    name: str
    subject: str | None
    maintenance: bool = False
    reason: str | None = None
    consul: str = CONNECTED
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
    while it is connected or when it never has. ``sources`` has one
    :class:`SourceAnswer` per kind of maintenance followed.
    """

    status: str
    consul: str
    reason: str | None = None
    source: str | None = None
    age: float | None = None
    sources: tuple[SourceAnswer, ...] = ()


# What /status answers, from all of its sources ---------------------------


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What one of the application's own checks says (see :mod:`.checks`).

    ``failing`` is what counts: true once ``fail_after`` runs in a row have
    failed, or before the first result for a check that fails closed.
    ``message`` is the last failure's reason (also while it does not count
    yet), ``time`` when the last run ended (``time.time()``) and ``duration``
    how many seconds it took; the last three are ``None`` before a result.
    """

    name: str
    critical: bool
    failing: bool
    message: str | None = None
    time: float | None = None
    duration: float | None = None


@dataclasses.dataclass(frozen=True)
class Answer:
    """What ``/status`` answers: the status, what says so, and why."""

    status: str
    source: str | None = None
    reason: str | None = None


ANSWER_OK = Answer(OK)


def answer(
    own_status: str,
    consul: ConsulStatus | None,
    checks: tuple[CheckResult, ...] = (),
) -> Answer:
    """Compose what ``/status`` answers from everything that has a say.

    The first source that is not ok decides, in this order:

    1. the application's own status (``application.status``), source
       ``application``;
    2. Consul, as the watcher reports it: the node's maintenance, then the
       service's, then the key (sources ``node``, ``service``, ``key``), or
       ``consul`` when the failure policy is closed and Consul is away;
    3. the application's critical checks, in the order they were added:
       ``maintenance`` with source ``check`` and reason ``"NAME: message"``.

    Non-critical checks never change the answer (health+json shows them as
    ``warn``). Pure: reads its arguments only.
    """
    if own_status != OK:
        return Answer(own_status, "application")
    if consul is not None and consul.status != OK:
        return Answer(consul.status, consul.source, consul.reason)
    for check in checks:
        if check.failing and check.critical:
            return Answer(MAINTENANCE, "check", f"{check.name}: {check.message}")
    return ANSWER_OK
