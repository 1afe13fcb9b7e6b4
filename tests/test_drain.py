"""Draining: requests in flight when serving stops finish instead of failing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

from tornado import httpclient, testing, web

import sprockets_status_consul as ssc


class Slow(web.RequestHandler):
    def initialize(self, started: asyncio.Event, release: asyncio.Event) -> None:
        self.started = started
        self.release = release

    async def get(self) -> None:
        self.started.set()
        await self.release.wait()
        self.write("finished")


async def outcome(url: str) -> tuple[int, bytes]:
    """The code and body of a GET, 599 when the connection fails."""
    try:
        response = await httpclient.AsyncHTTPClient().fetch(url, raise_error=False)
    except (OSError, httpclient.HTTPClientError):
        return 599, b""
    return response.code, response.body


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class DrainTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        events = {"started": self.started, "release": self.release}
        return web.Application([(r"/slow", Slow, events)])

    async def slow_request_mid_drain(
        self, begin_draining: Callable[[], asyncio.Future[None]]
    ) -> None:
        slow = asyncio.ensure_future(outcome(self.get_url("/slow")))
        await asyncio.wait_for(self.started.wait(), 5)
        assert ssc.requests_in_flight(self._app) == 1
        drained = begin_draining()
        await until(lambda: getattr(self._app, "status", None) == ssc.DRAINING)
        await asyncio.sleep(0.05)  # the grace (0) is over; the server stopped
        assert (await outcome(self.get_url("/slow")))[0] == 599  # not accepted
        assert not drained.done()  # waiting for the request in flight
        self.release.set()
        assert await slow == (200, b"finished")
        await asyncio.wait_for(drained, 5)
        assert ssc.requests_in_flight(self._app) == 0

    @testing.gen_test(timeout=15)
    async def test_serve_until_signalled_lets_the_request_finish(self) -> None:
        served = asyncio.ensure_future(
            ssc.serve_until_signalled(self._app, self.http_server, grace=0)
        )

        def signalled() -> asyncio.Future[None]:
            os.kill(os.getpid(), signal.SIGTERM)
            return served

        await asyncio.sleep(0)  # let it install its signal handlers
        await self.slow_request_mid_drain(signalled)

    @testing.gen_test(timeout=15)
    async def test_drain_lets_a_tracked_request_finish(self) -> None:
        ssc.track_requests(self._app)
        await self.slow_request_mid_drain(
            lambda: asyncio.ensure_future(
                ssc.drain(self._app, self.http_server, grace=0)
            )
        )

    @testing.gen_test(timeout=15)
    async def test_a_request_that_never_finishes_is_cut(self) -> None:
        ssc.track_requests(self._app)
        slow = asyncio.ensure_future(outcome(self.get_url("/slow")))
        await asyncio.wait_for(self.started.wait(), 5)
        started = time.monotonic()
        await ssc.drain(self._app, self.http_server, grace=0, finish_timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 3
        assert (await slow)[0] == 599
        self.release.set()
