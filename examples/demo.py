"""The Consul demo without Docker: a dev agent, the example app, and how to flip it.

``scripts/demo`` runs this in the project's virtualenv. It gets a real Consul
binary (``$CONSUL_BINARY``, ``consul`` on ``$PATH``, else the one
``scripts/get-consul`` keeps in its cache, fetched from Debian's package the
first time), starts ``consul agent -dev`` on free loopback ports with the
library's :class:`~sprockets_status_consul.dev_agent.ConsulDevAgent`, starts
``examples/consul_app.py`` against it, waits until ``/status`` answers, and
prints the commands that flip it. Ctrl-C stops everything.

With ``--smoke`` (or ``DEMO_SMOKE=1``) it flips maintenance itself instead:
``/status`` must go 200 -> 503 with the reason -> 200. It prints the result and
exits 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from sprockets_status_consul.dev_agent import (
    ConsulAgentError,
    ConsulDevAgent,
    find_consul_binary,
)

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "consul_app.py"
GET_CONSUL = ROOT / "scripts" / "get-consul"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
"""Seconds the app may take to answer ``/status`` after it is started."""
FLIP_TIMEOUT = 10.0
"""Seconds ``/status`` may take to follow a maintenance change in smoke mode."""
SMOKE_REASON = "demo smoke test"


T = TypeVar("T")


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def consul_binary() -> str:
    """``$CONSUL_BINARY``, ``consul`` on ``$PATH``, else Consul 1.8.7 from
    ``scripts/get-consul`` (which fetches it into its cache the first time)."""
    found = find_consul_binary()
    if found is not None:
        return found
    print("no consul on PATH: scripts/get-consul (fetches Consul once) ...", flush=True)
    got = subprocess.run(
        [sys.executable, str(GET_CONSUL)], capture_output=True, text=True, check=False
    )
    if got.returncode != 0:
        raise DemoError(f"no Consul binary: {got.stderr.strip()}")
    return got.stdout.strip()


def consul(agent: ConsulDevAgent, *args: str, check: bool = True) -> None:
    """Run the ``consul`` CLI against ``agent``, as the banner tells a user to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["CONSUL_HTTP_ADDR"] = agent.http_addr
    done = subprocess.run(
        [agent.binary, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise DemoError(f"consul {' '.join(args)} failed: {output}")


def free_port() -> int:
    """A TCP port free on :data:`HOST` right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def wait_for(
    check: Callable[[], T | None], timeout: float, message: Callable[[], str]
) -> T:
    """Call ``check`` until it returns something, for up to ``timeout`` seconds.

    An :class:`OSError` or :class:`ValueError` (the app not listening yet, or
    half an answer) counts as nothing yet; at the deadline :class:`DemoError`
    says ``message()``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise DemoError(message())
        time.sleep(0.02)


def get_status(port: int, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """``GET /status`` of the app: the HTTP status code and the JSON body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        body: dict[str, Any] = json.loads(response.read())
        return response.status, body
    finally:
        conn.close()


_DEMO_PID = os.getpid()


def _die_with_demo() -> None:
    """In the app's process, before exec: SIGTERM when the demo dies (Linux).

    So that even a demo killed with SIGKILL leaves no app behind; the Consul
    agent gets the same from :class:`ConsulDevAgent`.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() != _DEMO_PID:  # the demo died before prctl
            os._exit(1)


class App:
    """``examples/consul_app.py`` as a child process."""

    def __init__(self, port: int, consul_addr: str) -> None:
        self.port = port
        env = dict(os.environ, CONSUL_HTTP_ADDR=consul_addr, PYTHONUNBUFFERED="1")
        env.pop("CONSUL_HTTP_TOKEN", None)  # the dev agent has no ACLs
        self.proc = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port), "--address", HOST],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops it
            preexec_fn=_die_with_demo,  # PR_SET_PDEATHSIG
        )

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(f"the app exited with code {code} (see its log above)")

    def wait_ready(self) -> dict[str, Any]:
        """Wait until ``/status`` answers 200 from a connected watcher."""

        def answered() -> dict[str, Any] | None:
            self.check_alive()
            code, body = get_status(self.port, timeout=2.0)
            return body if code == 200 and body.get("consul") == "connected" else None

        return wait_for(
            answered,
            STARTUP_TIMEOUT,
            lambda: f"http://{HOST}:{self.port}/status did not answer 200",
        )

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        return self.proc.returncode


def banner(agent: ConsulDevAgent, port: int) -> str:
    consul = shlex.quote(agent.binary)
    addr = f"-http-addr={agent.http_addr}"
    status = f"curl -i http://{HOST}:{port}/status"
    return "\n".join(
        [
            "",
            "=" * 72,
            f"Consul dev agent : {agent.url}  (node {agent.node_name}, "
            f"UI {agent.url}/ui)",
            f"example app      : http://{HOST}:{port}/status",
            "",
            "In another terminal:",
            f"  {status}",
            f'  {consul} maint -enable -reason "deploying" {addr}',
            f"  {status}    # 503, reason: deploying",
            f"  {consul} maint -disable {addr}",
            f"  {status}    # 200 again",
            "",
            "Ctrl-C stops the app and the agent.",
            "=" * 72,
            "",
        ]
    )


def wait_status(
    port: int, code: int, status: str, reason: str | None
) -> dict[str, Any]:
    """Wait until ``/status`` answers ``code`` with ``status`` and ``reason``."""
    last: list[str] = ["no answer"]

    def check() -> dict[str, Any] | None:
        got, body = get_status(port)
        last[0] = f"{got} {body}"
        if got == code and body.get("status") == status:
            return body if body.get("reason") == reason else None
        return None

    return wait_for(
        check,
        FLIP_TIMEOUT,
        lambda: (
            f"/status did not answer {code} {status} {reason!r}; last answer: {last[0]}"
        ),
    )


def smoke(agent: ConsulDevAgent, port: int) -> None:
    """Flip maintenance once and check that ``/status`` follows it both ways."""
    try:
        consul(agent, "maint", "-enable", "-reason", SMOKE_REASON)
        print(f"smoke: consul maint -enable -reason {SMOKE_REASON!r}", flush=True)
        body = wait_status(port, 503, "maintenance", SMOKE_REASON)
        print(f"smoke: /status -> 503 {body}", flush=True)
    finally:
        consul(agent, "maint", "-disable", check=False)
    print("smoke: consul maint -disable", flush=True)
    body = wait_status(port, 200, "ok", None)
    print(f"smoke: /status -> 200 {body}", flush=True)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Run a Consul dev agent and the example app, and show how "
        "Consul maintenance mode flips /status.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT") or "8000",
        help="the app's port (default: $PORT, else 8000; 0 picks a free one)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("DEMO_SMOKE", "") not in ("", "0"),
        help="flip maintenance once, check /status follows, and exit "
        "(default: $DEMO_SMOKE)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """The demo; its exit code (1 when the app did not stop cleanly)."""
    port: int = args.port or free_port()
    agent = ConsulDevAgent(consul_binary())
    app: App | None = None
    try:
        agent.start()
        print(
            f"consul agent -dev: {agent.url} (node {agent.node_name}, "
            f"binary {agent.binary})",
            flush=True,
        )
        app = App(port, agent.http_addr)
        body = app.wait_ready()
        print(f"/status -> 200 {body}", flush=True)
        if args.smoke:
            smoke(agent, port)
        else:
            print(banner(agent, port), flush=True)
            ticker = threading.Event()  # never set: a signal raises _Stop
            while not ticker.wait(0.5):
                app.check_alive()
                if not agent.running:
                    raise DemoError(f"the consul agent exited:\n{agent.log_tail()}")
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = 0 if app is None else app.stop()
        agent.stop()
    if code != 0:
        print(f"demo failed: the app exited with code {code}", file=sys.stderr)
        return 1
    if args.smoke:
        print(
            "smoke test passed: 200 -> 503 (reason) -> 200; the app stopped cleanly",
            flush=True,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return run(args)
    except _Stop as stop:
        print(f"\n{stop}: stopped the app and the Consul agent", flush=True)
        return 0
    except (
        DemoError,
        ConsulAgentError,
        OSError,
        ValueError,
    ) as error:
        print(f"demo failed: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
