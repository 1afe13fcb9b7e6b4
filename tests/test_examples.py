"""The examples and the demo, run as real processes.

Each example runs as ``python examples/<name>.py --port <free port>``; its
``/status`` is asked over HTTP, and it must stop cleanly on SIGTERM or SIGINT
(exit code 0, no traceback). The Consul example and the demo run against a
real Consul agent (``consul_agent`` / ``consul_binary`` fixtures).
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import AgentBase, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
HOST = "127.0.0.1"
APPLICATION = "sprockets-status-consul"
STARTUP_TIMEOUT = 20.0
FLIP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def request(
    port: int, method: str = "GET", path: str = "/status"
) -> tuple[int, dict[str, Any]]:
    """One HTTP request to the example (no proxy); status code and JSON body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        raw = response.read()
        return response.status, (json.loads(raw) if raw else {})
    finally:
        conn.close()


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Consul or port settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CONSUL_") and k not in ("PORT", "ADDRESS", "DEMO_SMOKE")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Example:
    """An example app as a child process, its output kept in files."""

    def __init__(
        self,
        name: str,
        tmp_path: Path,
        env: Mapping[str, str],
        args: tuple[str, ...],
        port: int,
    ) -> None:
        self.name = name
        self.port = port
        self.stdout_path = tmp_path / f"{name}.stdout"
        self.stderr_path = tmp_path / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
                cwd=tmp_path,  # the examples must not need the repository as cwd
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        code = self.proc.poll()
        state = "running" if code is None else f"exited with code {code}"
        return f"{self.name} ({state}); stderr:\n{self.stderr[-4000:]}"

    def wait_answering(self) -> tuple[int, dict[str, Any]]:
        """Wait until ``/status`` answers (any status code); that answer."""

        def answer() -> tuple[int, dict[str, Any]] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the example died: {self.describe()}")
            try:
                return request(self.port)
            except (OSError, http.client.HTTPException):
                return None

        result: tuple[int, dict[str, Any]] | None = wait_for(
            answer,
            timeout=STARTUP_TIMEOUT,
            interval=0.05,
            message=lambda: f"/status never answered: {self.describe()}",
        )
        assert result is not None
        return result

    def wait_status(self, code: int, status: str, **fields: Any) -> dict[str, Any]:
        """Wait until ``/status`` answers ``code`` with ``status`` and ``fields``."""
        last: list[Any] = [None]

        def matches() -> dict[str, Any] | None:
            got, body = request(self.port)
            last[0] = (got, body)
            wanted = {"status": status, **fields}
            if got == code and all(body.get(k) == v for k, v in wanted.items()):
                return body
            return None

        body: dict[str, Any] | None = wait_for(
            matches,
            timeout=FLIP_TIMEOUT,
            interval=0.02,
            message=lambda: (
                f"wanted {code} {status} {fields}, last answer "
                f"{last[0]}; {self.describe()}"
            ),
        )
        assert body is not None
        return body

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
        """Send ``signum``; the exit code and stderr once the process is gone."""
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {STOP_TIMEOUT:g}s of "
                f"{signum.name}: {self.describe()}"
            ) from None
        return code, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


RunExample = Callable[..., Example]


@pytest.fixture
def run_example(tmp_path: Path) -> Iterator[RunExample]:
    """``run_example(name, env, port)`` starts an example; it dies after the test.

    The example gets ``--port PORT --address 127.0.0.1`` unless ``args`` is
    given (then it must say where to listen itself, e.g. through ``env``).
    """
    started: list[Example] = []

    def run(
        name: str,
        env: Mapping[str, str],
        port: int,
        args: tuple[str, ...] | None = None,
    ) -> Example:
        if args is None:
            args = ("--port", str(port), "--address", HOST)
        example = Example(name, tmp_path, env, args, port)
        started.append(example)
        return example

    try:
        yield run
    finally:
        for example in started:
            example.kill()


def assert_clean_exit(example: Example, code: int, stderr: str) -> None:
    assert code == 0, f"exit code {code}: {example.describe()}"
    assert "Traceback" not in stderr, stderr
    assert " stopping" in stderr, stderr


def _version() -> str:
    return importlib.metadata.version(APPLICATION)


# ----------------------------------------------------------------------------
# examples/status_app.py


def test_status_app_flips_with_its_maintenance_endpoint(
    run_example: RunExample,
) -> None:
    port = free_port(HOST)
    app = run_example("status_app", _clean_env(), port)
    code, body = app.wait_answering()
    assert (code, body) == (
        200,
        {"application": APPLICATION, "status": "ok", "version": _version()},
    )

    assert request(port, "POST", "/maintenance") == (200, {"status": "maintenance"})
    code, body = request(port)
    assert (code, body["status"]) == (503, "maintenance")
    assert request(port, "HEAD")[0] == 503

    assert request(port, "DELETE", "/maintenance") == (200, {"status": "ok"})
    code, body = request(port)
    assert (code, body["status"]) == (200, "ok")
    assert request(port, "PUT", "/status")[0] == 405

    code, stderr = app.stop(signal.SIGTERM)
    assert_clean_exit(app, code, stderr)
    assert "application status: ok -> maintenance" in stderr
    assert "application status: maintenance -> ok" in stderr
    assert " INFO " in stderr  # logs at INFO


def test_status_app_takes_its_port_from_the_environment_and_stops_on_sigint(
    run_example: RunExample,
) -> None:
    port = free_port(HOST)
    env = _clean_env(PORT=str(port), ADDRESS=HOST)
    app = run_example("status_app", env, port, args=())
    assert app.wait_answering()[0] == 200
    code, stderr = app.stop(signal.SIGINT)
    assert_clean_exit(app, code, stderr)


def test_status_app_reports_a_port_in_use_without_a_traceback(
    run_example: RunExample,
) -> None:
    port = free_port(HOST)
    first = run_example("status_app", _clean_env(), port)
    first.wait_answering()
    second = run_example("status_app", _clean_env(), port)
    code = second.proc.wait(STARTUP_TIMEOUT)
    assert code == 1, second.describe()
    assert "cannot listen on" in second.stderr
    assert "Traceback" not in second.stderr
    assert_clean_exit(first, *first.stop())


# ----------------------------------------------------------------------------
# examples/consul_app.py


def test_consul_app_follows_node_maintenance(
    run_example: RunExample, consul_agent: AgentBase
) -> None:
    env = _clean_env(CONSUL_HTTP_ADDR=consul_agent.url)
    if consul_agent.token:
        env["CONSUL_HTTP_TOKEN"] = consul_agent.token
    port = free_port(HOST)
    app = run_example("consul_app", env, port)
    app.wait_answering()
    body = app.wait_status(200, "ok", consul="connected")
    assert body["application"] == APPLICATION
    assert body["version"] == _version()
    assert "reason" not in body and "source" not in body
    try:
        consul_agent.consul("maint", "-enable", "-reason", "demo")
        body = app.wait_status(503, "maintenance", reason="demo", source="node")
        assert body["consul"] == "connected"
    finally:
        consul_agent.consul("maint", "-disable", check=False)
    body = app.wait_status(200, "ok", consul="connected")
    assert "reason" not in body

    code, stderr = app.stop(signal.SIGTERM)
    assert_clean_exit(app, code, stderr)
    # it asked the agent for its node name, and logged the changes at INFO
    assert f"following Consul node {consul_agent.node_name!r}" in stderr
    assert "node maintenance enabled: demo" in stderr
    assert "node maintenance disabled" in stderr
    # the 503s of maintenance are answers, logged at INFO, not errors
    assert "INFO tornado.access: 503 GET /status" in stderr
    assert "ERROR tornado.access" not in stderr


def test_consul_app_rejects_a_bad_address_at_start_up(run_example: RunExample) -> None:
    env = _clean_env(CONSUL_HTTP_ADDR="ftp://127.0.0.1:8500")
    app = run_example("consul_app", env, free_port(HOST))
    code = app.proc.wait(STARTUP_TIMEOUT)
    assert code == 2, app.describe()
    assert "CONSUL_HTTP_ADDR" in app.stderr
    assert "Traceback" not in app.stderr


# ----------------------------------------------------------------------------
# the demo


def test_demo_script_is_an_executable_strict_bash_script() -> None:
    script = ROOT / "scripts" / "demo"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    syntax = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, timeout=30
    )
    assert syntax.returncode == 0, syntax.stderr


def test_demo_smoke_mode_runs_end_to_end(tmp_path: Path, consul_binary: str) -> None:
    """``scripts/demo --smoke`` from another directory, in this interpreter.

    DEMO_PYTHON skips the virtualenv set-up (covered by running the script by
    hand); the rest is the real demo: a dev agent from the binary, the app,
    maintenance on and off through the consul CLI, a clean stop.
    """
    env = _clean_env(DEMO_PYTHON=sys.executable, CONSUL_BINARY=consul_binary)
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "demo"), "--smoke", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            # SIGTERM: the demo stops the agent and the app it started
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "smoke: /status -> 503" in stdout
    assert "'reason': 'demo smoke test'" in stdout
    assert "smoke test passed" in stdout
    assert "Traceback" not in stderr, stderr
    assert "node maintenance enabled: demo smoke test" in stderr
