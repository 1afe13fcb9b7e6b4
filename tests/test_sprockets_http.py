"""The README's sprockets.http wiring: watch on start, drain on shutdown."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado import testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul.settings import Settings
from sprockets_status_consul.watcher import _WATCHERS, ConsulWatcher

from .consul_agent import free_port, wait_for
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


# ---------------------------------------------------------------------------
# The README's snippet run by sprockets.http's own runner, signalled as a
# container runtime signals it.

README = Path(__file__).resolve().parent.parent / "README.md"
HOST = "127.0.0.1"


def readme_snippet(tmp_path: Path, grace: float, procs: int) -> Path:
    """README's sprockets.http example, with a short grace and ``procs``."""
    section = README.read_text().split("### With sprockets.http, and forking")[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "grace=10" in code and '{"number_of_procs": 1}' in code
    code = code.replace("grace=10", f"grace={grace}")
    code = code.replace('{"number_of_procs": 1}', f'{{"number_of_procs": {procs}}}')
    script = tmp_path / "service.py"
    script.write_text(code)
    return script


def status_on(conn: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    conn.request("GET", "/status")
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@contextlib.contextmanager
def runner(script: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The script in its own session, Consul unreachable (fail open: 200)."""
    env = {
        **os.environ,
        "PORT": str(port),
        "CONSUL_HTTP_ADDR": f"{HOST}:{free_port(HOST)}",
        "DEBUG": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its children too
        proc.wait(10)


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection that has had one 200 from /status."""

    def answered() -> http.client.HTTPConnection | None:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            code, _ = status_on(conn)
        except OSError:
            conn.close()
            return None
        return conn if code == 200 else None

    conn: http.client.HTTPConnection = wait_for(answered, timeout=20, interval=0.05)
    return conn


def test_one_process_drains_open_connections_and_refuses_new_ones(
    tmp_path: Path,
) -> None:
    port = free_port(HOST)
    with runner(readme_snippet(tmp_path, grace=2, procs=1), port) as proc:
        conn = connect(port)
        proc.send_signal(signal.SIGTERM)

        def draining() -> dict[str, Any] | None:
            code, body = status_on(conn)
            return body if code == 503 else None

        body = wait_for(draining, timeout=5, message="no 503 on the open connection")
        assert body["status"] == ssc.DRAINING
        with pytest.raises(ConnectionRefusedError):
            status_on(http.client.HTTPConnection(HOST, port, timeout=5))
        assert proc.wait(15) == 0


def test_forked_children_do_not_get_the_parents_sigterm(tmp_path: Path) -> None:
    port = free_port(HOST)
    with runner(readme_snippet(tmp_path, grace=1, procs=2), port) as proc:
        conn = connect(port)
        proc.send_signal(signal.SIGTERM)
        # Nothing is to happen: wait well past the grace, then look. The
        # children still answer 200 and the parent still runs.
        time.sleep(3)
        assert status_on(conn)[0] == 200
        assert status_on(http.client.HTTPConnection(HOST, port, timeout=5))[0] == 200
        assert proc.poll() is None
