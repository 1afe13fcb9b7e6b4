"""Consul agents, networks and the example app in Docker containers, for tests.

:class:`DockerAgent` offers what :class:`tests.consul_agent.DevAgent` offers
(``http_addr`` on the host's loopback, ``node_name``, ``consul()``, the HTTP
API, ``start``/``stop``/``pause``/``resume``), but the agent runs in a
container of the Consul image docker-compose.yml names, as in deployments
where the application and the agent are different containers. Everything made
here carries the label :data:`LABEL` and a random name, and is removed by
``stop()`` / ``remove()`` (and at exit), so that test runs leave nothing behind
and never touch what they did not make.

The images come from a registry or, on machines without one, from
``scripts/docker-images`` (see :mod:`tests.docker_images`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.consul_agent import AgentBase, ConsulUnavailable, wait_for
from tests.docker_images import consul_image, docker, missing_images

ROOT = Path(__file__).resolve().parent.parent
LABEL = "sprockets-status-consul.test"
APP_IMAGE = "sprockets-status-consul/example:test"
"""examples/Dockerfile built by :func:`build_app_image`."""

_LIVE: dict[str, str] = {}
"""What is still to remove at exit: name -> "container" or "network"."""


def engine_problem() -> str | None:
    """Why there is no usable Docker engine here, or ``None`` when there is."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0 or not info.stdout.strip():
        return f"`docker info` failed: {info.stderr.strip()[:300]}"
    return None


def images_problem() -> str | None:
    """Which images are missing, or ``None`` when all are there."""
    missing = missing_images()
    if missing:
        return (
            f"missing images {', '.join(missing)}: pull them, or build local "
            "stand-ins with scripts/docker-images"
        )
    return None


def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, if either works."""
    docker_cli = shutil.which("docker")
    if docker_cli is not None:
        try:
            plugin = subprocess.run(
                [docker_cli, "compose", "version"],
                capture_output=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            plugin = None
        if plugin is not None and plugin.returncode == 0:
            return [docker_cli, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def unique_name(kind: str) -> str:
    return f"ssc-test-{kind}-{secrets.token_hex(4)}"


def build_app_image() -> str:
    """examples/Dockerfile built as :data:`APP_IMAGE` (docker's cache makes a
    rebuild of an unchanged tree take a second); returns the tag."""
    fmt = ("--format", "{{.Id}}")
    before = docker("image", "inspect", *fmt, APP_IMAGE, check=False).stdout.strip()
    dockerfile = str(ROOT / "examples" / "Dockerfile")
    docker("build", "-q", "-f", dockerfile, "-t", APP_IMAGE, str(ROOT), timeout=900)
    if before and before != docker("image", "inspect", *fmt, APP_IMAGE).stdout.strip():
        docker("rmi", before, check=False)  # the build it replaced, now untagged
    return APP_IMAGE


def remove(name: str) -> None:
    """Remove a container (with its volumes) or network made here."""
    kind = _LIVE.pop(name, "container")
    if kind == "network":
        docker("network", "rm", name, check=False)
    else:
        docker("rm", "-f", "-v", name, check=False)


@atexit.register
def _remove_all() -> None:
    for name in list(_LIVE):
        with contextlib.suppress(Exception):
            remove(name)


def create_network() -> str:
    """A new user-defined bridge network (with DNS for container names)."""
    name = unique_name("net")
    docker("network", "create", "--label", LABEL, name)
    _LIVE[name] = "network"
    return name


def run_container(
    image: str,
    *args: str,
    name: str,
    network: str | None = None,
    aliases: Sequence[str] = (),
    publish: Sequence[int] = (),
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
) -> str:
    """``docker run -d``: ports in ``publish`` go to free ports on 127.0.0.1."""
    options = ["--name", name, "--label", LABEL]
    if network:
        options += ["--network", network]
        options += [f"--network-alias={alias}" for alias in aliases]
    options += [f"--publish=127.0.0.1::{port}" for port in publish]
    options += [f"--env={key}={value}" for key, value in (env or {}).items()]
    options += [f"--volume={volume}" for volume in volumes]
    _LIVE[name] = "container"
    docker("run", "-d", *options, image, *args)
    return name


def published(container: str, port: int) -> str:
    """The host address (``127.0.0.1:PORT``) a container port is published on."""
    out = docker("port", container, f"{port}/tcp").stdout.split()
    if not out:
        raise ConsulUnavailable(f"{container} publishes no port {port}")
    return out[0]


def container_ip(container: str, network: str) -> str:
    fmt = "{{json .NetworkSettings.Networks}}"
    networks = json.loads(docker("inspect", "--format", fmt, container).stdout)
    return str(networks[network]["IPAddress"])


def logs(container: str, lines: int = 40) -> str:
    proc = docker("logs", "--tail", str(lines), container, check=False)
    return (proc.stdout + proc.stderr).strip()


class DockerAgent(AgentBase):
    """A Consul agent in a container; its HTTP API published on 127.0.0.1.

    ``args``: the container's command (default: a dev agent reachable from
    other containers, as docker-compose.yml runs it); ``-node`` is added.
    ``network`` and ``aliases``: a network to join, and names other containers
    reach it by. ``start()`` waits (``wait=True``) until there is a leader,
    ``/v1/agent/self`` answers and the node's ``serfHealth`` passes.
    """

    def __init__(
        self,
        *,
        image: str | None = None,
        args: Sequence[str] = ("agent", "-dev", "-client", "0.0.0.0"),
        node_name: str | None = None,
        network: str | None = None,
        aliases: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.image = image or consul_image()
        self.args = list(args)
        self._node_name = node_name or unique_name("node")
        self.container = unique_name("consul")
        self.network = network
        self.aliases = list(aliases)
        self.startup_timeout = startup_timeout
        self._http_addr: str | None = None
        self._paused = False

    def __repr__(self) -> str:
        return f"DockerAgent({self.container!r}, {self._http_addr})"

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def http_addr(self) -> str:
        if self._http_addr is None:
            raise RuntimeError(f"{self.container} has not been started")
        return self._http_addr

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def running(self) -> bool:
        proc = docker(
            "inspect", "--format", "{{.State.Running}}", self.container, check=False
        )
        return proc.stdout.strip() == "true"

    def ip(self, network: str | None = None) -> str:
        """The container's address on ``network`` (default: its own)."""
        name = network or self.network
        if name is None:
            raise RuntimeError(f"{self.container} joined no network")
        return container_ip(self.container, name)

    def start(self, wait: bool = True) -> DockerAgent:
        run_container(
            self.image,
            *self.args,
            "-node",
            self._node_name,
            name=self.container,
            network=self.network,
            aliases=self.aliases,
            publish=[8500],
        )
        self._http_addr = published(self.container, 8500)
        if wait:
            self.wait_ready()
        return self

    def _ready(self) -> bool:
        if not self.is_ready():
            return False
        return any(
            check.get("CheckID") == "serfHealth" and check.get("Status") == "passing"
            for check in self.node_checks(timeout=1.0)
        )

    def wait_ready(self, timeout: float | None = None) -> None:
        try:
            wait_for(
                self._ready,
                timeout=timeout or self.startup_timeout,
                interval=0.05,
                message=lambda: f"{self.container} not ready:\n{logs(self.container)}",
                ignore=(OSError, AssertionError, ValueError),
            )
        except AssertionError as exc:
            raise ConsulUnavailable(str(exc)) from exc

    def consul(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """The ``consul`` CLI inside the container (``docker exec``)."""
        env = [f"--env=CONSUL_HTTP_TOKEN={self.token}"] if self.token else []
        cmd = ["exec", *env, self.container, "consul", *args]
        return docker(*cmd, check=check, timeout=timeout)

    def pause(self) -> None:
        """``docker pause``: the agent's processes are frozen (cgroup freezer)."""
        docker("pause", self.container)
        self._paused = True

    def resume(self) -> None:
        docker("unpause", self.container, check=False)
        self._paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """Remove the container (safe to call more than once)."""
        remove(self.container)
        self._paused = False

    def __enter__(self) -> DockerAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
