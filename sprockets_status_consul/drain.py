"""Draining on shutdown: let load balancers stop routing before the process stops.

A process that stops serving the moment it gets SIGTERM fails the requests a
load balancer still sends it until its next health check. :func:`drain`
reports 503 ``draining`` at ``/status`` for a grace period while the process
keeps serving, then stops accepting connections, lets the requests in flight
finish (for at most ``finish_timeout`` seconds), closes the connections and
stops the watcher. :func:`serve_until_signalled` does that on SIGTERM or
SIGINT::

    server = app.listen(8000)
    await ssc.serve_until_signalled(app, server, grace=10)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import weakref
from collections.abc import Iterable

from tornado import httpserver, httputil, web

from .changes import status_changed
from .status import DRAINING
from .watcher import deregister, stop

LOGGER = logging.getLogger(__name__)


class _InFlight:
    """Counts an application's requests between their start and their finish."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[asyncio.Future[None]] = []

    def started(self) -> None:
        self.count += 1

    def finished(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for no request in flight."""
        if self.count == 0:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(timeout, 0))
        except asyncio.TimeoutError:
            return False
        return True


_IN_FLIGHT: weakref.WeakKeyDictionary[web.Application, _InFlight] = (
    weakref.WeakKeyDictionary()
)


def track_requests(application: web.Application) -> None:
    """Count ``application``'s requests in flight, so :func:`drain` lets them finish.

    :func:`serve_until_signalled` and :func:`drain` call it; call it yourself
    at start-up when :func:`drain` is called from other shutdown code (a
    ``sprockets.http`` shutdown callback, say), so that requests already in
    flight when draining begins are known too. Idempotent. A request counts
    from the moment its handler runs until it finishes (an output transform
    sees its last chunk); a WebSocket never finishes that way, and is closed
    with the connections.
    """
    if application in _IN_FLIGHT:
        return
    in_flight = _IN_FLIGHT[application] = _InFlight()

    class CountInFlight(web.OutputTransform):
        def __init__(self, request: httputil.HTTPServerRequest) -> None:
            super().__init__(request)
            self.finished = False
            in_flight.started()

        def transform_first_chunk(
            self,
            status_code: int,
            headers: httputil.HTTPHeaders,
            chunk: bytes,
            finishing: bool,
        ) -> tuple[int, httputil.HTTPHeaders, bytes]:
            self._finishing(finishing)
            return status_code, headers, chunk

        def transform_chunk(self, chunk: bytes, finishing: bool) -> bytes:
            self._finishing(finishing)
            return chunk

        def _finishing(self, finishing: bool) -> None:
            if finishing and not self.finished:
                self.finished = True
                in_flight.finished()

    application.add_transform(CountInFlight)


def requests_in_flight(application: web.Application) -> int:
    """How many requests of ``application`` are in flight (0 when not tracked)."""
    in_flight = _IN_FLIGHT.get(application)
    return 0 if in_flight is None else in_flight.count


async def drain(
    application: web.Application,
    server: httpserver.HTTPServer | None = None,
    grace: float = 10.0,
    cut_short: asyncio.Event | None = None,
    finish_timeout: float = 5.0,
) -> None:
    """Deregister, report ``draining`` for ``grace`` seconds, then stop serving.

    Withdraws the service's registration in Consul, if any (so Consul stops
    routing here at once), sets ``application.status`` to
    :data:`~.status.DRAINING` (503 at ``/status``, liveness stays 200) and
    keeps serving for ``grace`` seconds (or until ``cut_short`` is set). Then
    ``server`` stops accepting connections, the requests in flight get up to
    ``finish_timeout`` seconds to finish, the connections (idle or not) are
    closed and the application's Consul watcher stops. With ``server`` None
    (a runner that stops its server itself) only the server steps are left
    out.
    """
    track_requests(application)
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
    in_flight = _IN_FLIGHT[application]
    started = time.monotonic()
    if not await in_flight.wait_idle(finish_timeout):
        LOGGER.warning(
            "%d request(s) still in flight after %.1f s: closing their connections",
            in_flight.count,
            time.monotonic() - started,
        )
    if server is not None:
        await server.close_all_connections()
    await stop(application)
    LOGGER.info("drained")


async def serve_until_signalled(
    application: web.Application,
    server: httpserver.HTTPServer | None,
    grace: float = 10.0,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    finish_timeout: float = 5.0,
) -> None:
    """Serve until one of ``signals`` arrives, then :func:`drain`.

    A second signal during the grace period ends it at once; the requests in
    flight still get ``finish_timeout`` seconds. Must run on the main
    thread's event loop (where signal handlers can be installed).
    """
    track_requests(application)
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
        await drain(application, server, grace, cut_short, finish_timeout)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
