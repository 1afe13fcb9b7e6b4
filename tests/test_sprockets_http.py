"""The README's sprockets.http wiring: watch on start, drain on shutdown."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .test_watcher import ScriptedConsul

app_module = pytest.importorskip("sprockets.http.app")


def start(app: web.Application, io_loop: Any) -> None:
    ssc.watch(app)
    ssc.track_requests(app)


class SprocketsHttpTests(testing.AsyncHTTPTestCase):
    def get_app(self) -> web.Application:
        app = app_module.Application(
            [(r"/status", ssc.ConsulStatusHandler)],
            service="my-service",
            version="1.2.3",
        )
        self.consul = ScriptedConsul()
        self.watcher = ConsulWatcher(Settings(startup_wait=5), client=self.consul)  # type: ignore[arg-type]
        _WATCHERS[app] = self.watcher
        app.on_start_callbacks.append(start)
        app.on_shutdown_callbacks.append(functools.partial(ssc.drain, grace=0.1))
        return app  # type: ignore[no-any-return]

    def test_started_served_and_drained_by_its_callbacks(self) -> None:
        self._app.start(self.io_loop)
        self.consul.answer(3)
        response = self.fetch("/status")
        body = json.loads(response.body)
        assert response.code == 200
        assert (body["application"], body["version"]) == ("my-service", "1.2.3")
        assert body["consul"] == "connected"
        assert not self.consul.closed

        # What the runner does on SIGTERM, after stopping its server.
        self._app.stop(self.io_loop, 1.0, 0.05)
        self.io_loop.start()  # until the shutdown callbacks are done
        assert self._app.status == ssc.DRAINING
        assert self.consul.closed  # the watcher stopped
