"""Helpers for testing an application's ``/status`` without Consul.

::

    from sprockets_status_consul.testing import consul_says

    with consul_says(app, maintenance=True, reason="deploy 42"):
        response = self.fetch("/status")  # 503, "reason": "deploy 42"

Under :func:`consul_says` the application's
:class:`~sprockets_status_consul.ConsulStatusHandler` answers as if Consul
said so: no agent is needed and no connection is opened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tornado import web

from . import status as st
from .watcher import ConsulWatcher, replaced

SOURCES = ("node", "service", "key", "consul")
"""What ``source`` may name: a kind of maintenance, or ``consul`` itself
(maintenance because Consul cannot be reached and the policy is closed)."""

CONSUL_STATES = (st.CONNECTED, st.STARTING, st.UNREACHABLE, st.STALE, st.STOPPED)
"""What ``consul`` may say of the watcher's link to Consul."""


@contextlib.contextmanager
def consul_says(
    application: web.Application,
    *,
    maintenance: bool = False,
    reason: str | None = None,
    source: str = "node",
    consul: str = st.CONNECTED,
) -> Iterator[st.ConsulStatus]:
    """Within the block, Consul says ``application`` is (or is not) in maintenance.

    :param maintenance: whether Consul has it in maintenance (503).
    :param reason: the maintenance reason, as ``consul maint -reason`` gives.
    :param source: what put it in maintenance: ``node``, ``service``, ``key``,
        or ``consul`` (the closed failure policy while Consul is unreachable).
    :param consul: what the watcher knows of Consul, the body's ``consul``;
        with ``source="consul"`` it cannot be ``connected``.

    The application's own watcher (started or not, stopped or not) is put
    back on exit; nested blocks restore each other. Yields the
    :class:`~sprockets_status_consul.ConsulStatus` requests see.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if consul not in CONSUL_STATES:
        raise ValueError(
            f"consul must be one of {', '.join(CONSUL_STATES)}, got {consul!r}"
        )
    if maintenance and source == "consul" and consul == st.CONNECTED:
        raise ValueError(
            "source 'consul' means Consul cannot be reached: say consul='stale' "
            "(or 'starting', 'unreachable') too"
        )
    followed = "node" if source == "consul" else source
    in_maintenance = maintenance and source != "consul"
    said = st.ConsulStatus(
        status=st.MAINTENANCE if maintenance else st.OK,
        consul=consul,
        reason=reason if maintenance else None,
        source=source if maintenance else None,
        sources=(
            st.SourceAnswer(
                followed,
                None,
                in_maintenance,
                reason if in_maintenance else None,
                consul=consul,
                error=reason if maintenance and source == "consul" else None,
            ),
        ),
    )
    with replaced(application, ConsulWatcher.answering(said)):
        yield said


__all__ = ["consul_says"]
