"""Prometheus metrics of what ``/status`` answers (the ``prometheus`` extra).

::

    pip install 'sprockets-status-consul[prometheus]'

    from sprockets_status_consul import metrics

    metrics.register(app)          # into prometheus_client's default registry
    app.add_handlers(r".*", [(r"/metrics", metrics.MetricsHandler)])

Every value is read from memory when the metrics are collected, so a scrape
shows what ``/status`` answers at that moment, with the watcher's and the
checks' counters:

* ``sprockets_status_up``: 1 when ``/status`` answers 200;
* ``sprockets_status_maintenance{source}``: 1 while ``/status`` answers 503
  (maintenance or draining) because of ``source``: ``application``, ``node``,
  ``service``, ``key``, ``consul`` (fail closed) or ``check``;
* ``sprockets_status_consul_connected``: 1 while the watcher's last exchange
  with Consul succeeded;
* ``sprockets_status_consul_requests_total{outcome}``: the watcher's queries
  by outcome, ``ok``, ``error`` or ``timeout``;
* ``sprockets_status_changes_total``: how often the answer changed (as
  :func:`~.changes.on_change` listeners are told);
* ``sprockets_status_check_up{check}`` and
  ``sprockets_status_check_duration_seconds{check}``: per check, whether it
  counts as passing and how long its last run took.

This module imports ``prometheus_client``; the rest of the package does not.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

from tornado import web

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sprockets_status_consul.metrics needs prometheus_client: "
        "pip install 'sprockets-status-consul[prometheus]'"
    ) from error

from . import changes, checks
from . import status as st

PREFIX = "sprockets_status_"

SOURCES = ("application", "node", "service", "key", "consul", "check")
"""The values of the ``source`` label of ``sprockets_status_maintenance``."""

OUTCOMES = ("ok", "error", "timeout")
"""The values of the ``outcome`` label of ``sprockets_status_consul_requests_total``."""


class StatusCollector:
    """Collects the metrics of one application (a ``prometheus_client`` collector)."""

    def __init__(self, application: web.Application) -> None:
        self._application = weakref.ref(application)
        changes.follow(application)  # so that changes are counted

    @property
    def application(self) -> web.Application | None:
        """The application, while it is alive."""
        return self._application()

    def collect(self) -> Iterator[Metric]:
        application = self.application
        if application is None:
            return
        answer = changes.current(application)
        yield GaugeMetricFamily(
            f"{PREFIX}up",
            "1 when /status answers 200.",
            value=float(answer.status == st.OK),
        )
        maintenance = GaugeMetricFamily(
            f"{PREFIX}maintenance",
            "1 while /status answers 503 (maintenance, draining) because of source.",
            labels=["source"],
        )
        unavailable = answer.status in (st.MAINTENANCE, st.DRAINING)
        for source in SOURCES:
            value = unavailable and answer.source == source
            maintenance.add_metric([source], float(value))
        yield maintenance

        watcher = changes.watcher_of(application)
        consul = None if watcher is None else watcher.status()
        yield GaugeMetricFamily(
            f"{PREFIX}consul_connected",
            "1 while the watcher's last exchange with Consul succeeded.",
            value=float(consul is not None and consul.consul == st.CONNECTED),
        )
        requests = CounterMetricFamily(
            f"{PREFIX}consul_requests",
            "Queries of the watcher to Consul, by outcome.",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            count = 0 if watcher is None else watcher.queries[outcome]
            requests.add_metric([outcome], float(count))
        yield requests
        yield CounterMetricFamily(
            f"{PREFIX}changes",
            "How many times what /status answers changed.",
            value=float(changes.changes(application)),
        )

        check_up = GaugeMetricFamily(
            f"{PREFIX}check_up",
            "1 while the check counts as passing.",
            labels=["check"],
        )
        duration = GaugeMetricFamily(
            f"{PREFIX}check_duration_seconds",
            "How long the check's last run took.",
            labels=["check"],
        )
        for result in checks.results(application):
            check_up.add_metric([result.name], float(not result.failing))
            if result.duration is not None:
                duration.add_metric([result.name], result.duration)
        yield check_up
        yield duration


_EXPORTED: weakref.WeakKeyDictionary[CollectorRegistry, StatusCollector] = (
    weakref.WeakKeyDictionary()
)
"""The collector each registry exports: one application per registry."""


def register(
    application: web.Application, registry: CollectorRegistry | None = None
) -> None:
    """Export the application's metrics in ``registry`` (by default
    ``prometheus_client``'s); idempotent.

    One application per registry: the metrics have no label to tell two
    apart. An application's metrics leave the registry when it is
    garbage-collected, so the next application (the next test's, say) can
    register there.

    :raises ValueError: when another application, still alive, exports its
        metrics in ``registry``.
    """
    registry = prometheus_client.REGISTRY if registry is None else registry
    exported = _EXPORTED.get(registry)
    if exported is not None and exported.application is not application:
        # An application from a finished test may wait for the cycle collector.
        gc.collect()
        exported = _EXPORTED.get(registry)
    if exported is not None:
        if exported.application is application:
            return
        raise ValueError(
            "the registry already exports the metrics of another application; "
            "give each application its own CollectorRegistry"
        )
    collector = StatusCollector(application)
    registry.register(collector)
    _EXPORTED[registry] = collector
    weakref.finalize(application, _unregister, weakref.ref(registry), collector)


def _unregister(
    registry_ref: weakref.ref[CollectorRegistry], collector: StatusCollector
) -> None:
    """Take a collected application's metrics out of its registry."""
    registry = registry_ref()
    if registry is None or _EXPORTED.get(registry) is not collector:
        return
    del _EXPORTED[registry]
    registry.unregister(collector)


class MetricsHandler(web.RequestHandler):
    """Serves a registry in Prometheus's text format, for an application
    that has no metrics endpoint yet; the application's metrics are
    registered there on the first request.

    ``(r"/metrics", MetricsHandler)``, or with ``{"registry": registry}``.
    """

    SUPPORTED_METHODS = ("GET",)

    def initialize(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = prometheus_client.REGISTRY if registry is None else registry

    def get(self, *args: Any, **kwargs: Any) -> None:
        register(self.application, self.registry)
        encode, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.write(encode(self.registry))
