"""Draining on shutdown: let load balancers stop routing before the process stops.

A process that stops serving the moment it gets SIGTERM fails the requests a
load balancer still sends it until its next health check. :func:`drain`
reports 503 ``draining`` at ``/status`` for a grace period while the process
keeps serving, then stops the server and the watcher.
:func:`serve_until_signalled` does that on SIGTERM or SIGINT::

    server = app.listen(8000)
    await ssc.serve_until_signalled(app, server, grace=10)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

from tornado import httpserver, web

from .changes import status_changed
from .status import DRAINING
from .watcher import deregister, stop

LOGGER = logging.getLogger(__name__)


async def drain(
    application: web.Application,
    server: httpserver.HTTPServer | None,
    grace: float,
    cut_short: asyncio.Event | None = None,
) -> None:
    """Deregister, report ``draining`` for ``grace`` seconds, then stop serving.

    Withdraws the service's registration in Consul, if any (so Consul stops
    routing here at once), sets ``application.status`` to
    :data:`~.status.DRAINING` (503 at ``/status``, liveness stays 200),
    waits ``grace`` seconds (or until ``cut_short`` is set), stops ``server``
    from accepting connections, closes the open ones and stops the
    application's Consul watcher.
    """
    await deregister(application)
    application.status = DRAINING  # type: ignore[attr-defined]
    status_changed(application)
    LOGGER.info("draining: /status answers 503 for %.1f s before stopping", grace)
    if cut_short is None:
        cut_short = asyncio.Event()
    try:
        await asyncio.wait_for(cut_short.wait(), grace)
        LOGGER.info("draining cut short")
    except asyncio.TimeoutError:
        pass
    if server is not None:
        server.stop()
        await server.close_all_connections()
    await stop(application)
    LOGGER.info("drained")


async def serve_until_signalled(
    application: web.Application,
    server: httpserver.HTTPServer | None,
    grace: float = 10.0,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until one of ``signals`` arrives, then :func:`drain`.

    A second signal during the grace period ends it at once. Must run on the
    main thread's event loop (where signal handlers can be installed).
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    cut_short = asyncio.Event()
    installed = list(signals)

    def on_signal(signum: signal.Signals) -> None:
        if signalled.is_set():
            cut_short.set()
        else:
            LOGGER.info("%s received", signum.name)
            signalled.set()

    for signum in installed:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await signalled.wait()
        await drain(application, server, grace, cut_short)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
