"""consul_says: testing an application's /status as its authors would.

The application points at a "Consul" that is a bare listening socket: under
``consul_says`` nothing may connect to it, and the answers follow what the
test says instead.
"""

from __future__ import annotations

import asyncio
import gc
import json
import pathlib
import socket
import subprocess
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from tornado import httpclient, httpserver, testing, web

import sprockets_status_consul as ssc
from sprockets_status_consul.testing import consul_says


@pytest.fixture
def fake_consul() -> Iterator[socket.socket]:
    """A listening socket where the application thinks Consul is."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield listener


def connections(listener: socket.socket) -> int:
    """How many connections the listener has waiting (and takes them)."""
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


def make_app(consul_address: str) -> web.Application:
    """The application under test, as its authors build it."""
    return web.Application(
        [(r"/status", ssc.ConsulStatusHandler)],
        consul_status={"address": consul_address, "failure_mode": "closed"},
    )


class StatusTests(testing.AsyncHTTPTestCase):
    @pytest.fixture(autouse=True)
    def _consul(self, fake_consul: socket.socket) -> None:
        self.consul = fake_consul

    def get_app(self) -> web.Application:
        host, port = self.consul.getsockname()
        self.app = make_app(f"{host}:{port}")
        return self.app

    def get_status(self, **headers: str) -> tuple[int, dict[str, Any]]:
        response = self.fetch("/status", headers=headers)
        return response.code, json.loads(response.body)

    def test_maintenance_is_a_503_with_the_reason(self) -> None:
        with consul_says(self.app, maintenance=True, reason="deploy 42"):
            code, body = self.get_status()
        assert code == 503
        assert (body["status"], body["source"], body["reason"]) == (
            "maintenance",
            "node",
            "deploy 42",
        )
        assert body["consul"] == "connected"
        assert connections(self.consul) == 0

    def test_no_maintenance_is_a_200_without_any_consul(self) -> None:
        with consul_says(self.app):
            code, body = self.get_status()
        assert (code, body["status"], body["consul"]) == (200, "ok", "connected")
        assert "reason" not in body
        assert connections(self.consul) == 0

    def test_each_source_and_state_of_consul(self) -> None:
        with consul_says(self.app, maintenance=True, reason="k", source="key"):
            assert self.get_status()[1]["source"] == "key"
        with consul_says(self.app, consul="unreachable"):
            code, body = self.get_status()
            assert (code, body["consul"]) == (200, "unreachable")
        with consul_says(
            self.app,
            maintenance=True,
            reason="no agent",
            source="consul",
            consul="stale",
        ):
            code, body = self.get_status(Accept="application/health+json")
            assert code == 503
            check = body["checks"]["consul-node:maintenance"][0]
            assert check["status"] == "warn"
            assert check["output"] == "no agent"
        assert connections(self.consul) == 0

    def test_the_previous_state_comes_back(self) -> None:
        with consul_says(self.app, maintenance=True, reason="outer"):
            with consul_says(self.app):
                assert self.get_status()[0] == 200
            assert self.get_status()[1]["reason"] == "outer"
        assert connections(self.consul) == 0
        # Out of the block the application's own watcher follows "Consul".
        self.get_status()
        assert connections(self.consul) == 1

    def test_a_stopped_application_stays_stopped(self) -> None:
        self.io_loop.run_sync(lambda: ssc.stop(self.app))
        with consul_says(self.app, maintenance=True, reason="r"):
            assert self.get_status()[0] == 503
        assert self.get_status()[1]["consul"] == "stopped"
        assert connections(self.consul) == 0


def test_consul_says_in_a_plain_pytest_test(fake_consul: socket.socket) -> None:
    host, port = fake_consul.getsockname()
    app = make_app(f"{host}:{port}")

    async def main() -> int:
        sock, port = testing.bind_unused_port()
        server = httpserver.HTTPServer(app)
        server.add_sockets([sock])
        try:
            url = f"http://127.0.0.1:{port}/status"
            with consul_says(app, maintenance=True, reason="deploy 42"):
                response = await httpclient.AsyncHTTPClient().fetch(
                    url, raise_error=False
                )
            return response.code
        finally:
            server.stop()

    assert asyncio.run(main()) == 503
    assert connections(fake_consul) == 0


@pytest.mark.parametrize("arguments", [{"source": "nodes"}, {"consul": "fine"}])
def test_what_cannot_be_said(arguments: dict[str, Any]) -> None:
    with (
        pytest.raises(ValueError, match=r"must be|means"),
        consul_says(web.Application(), **arguments),  # type: ignore[arg-type]
    ):
        pass


def test_the_readme_example_passes(tmp_path: pathlib.Path) -> None:
    """The complete test in README's "Testing your own /status" runs green."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Testing your own `/status`", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    # AsyncHTTPTestCase's _app is Tornado's private attribute
    assert "._app" not in example
    (tmp_path / "test_readme_example.py").write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_requests_under_consul_says_leave_nothing_behind() -> None:
    """However many requests ask, the application gets no finalizer per request."""
    app = web.Application()

    def finalizers() -> int:
        return sum(
            1
            for f in gc.get_objects()
            if isinstance(f, weakref.finalize) and (f.peek() or [None])[0] is app
        )

    async def requests() -> int:
        with consul_says(app):
            for _ in range(100):
                ssc.current(app).status()
            return finalizers()

    assert asyncio.run(requests()) == 0
