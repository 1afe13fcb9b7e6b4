"""The dockerised path: docker-compose.yml as the README runs it, and faults
that only containers give (a network cut between app and agent, a paused
agent, a three-server cluster losing its leader).

Each test needs a Docker engine with the images docker-compose.yml names
(``docker_engine``; ``scripts/docker-images`` builds local stand-ins where no
registry can be reached). Fault timings are printed as ``[measure]`` lines.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import fault_support
from .consul_agent import free_port, wait_for
from .docker_agent import (
    LABEL,
    DockerAgent,
    build_app_image,
    compose_command,
    create_network,
    docker,
    logs,
    published,
    remove,
    run_container,
    unique_name,
)
from .docker_images import STAND_IN_LABEL, consul_image, python_image
from .fault_support import FAST, StatusClient, answers, measured, wait_all

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
STARTING = (OSError, http.client.HTTPException)
"""What asking a published port gives while the server behind it starts."""


@pytest.fixture(scope="module")
def app_image(docker_engine: None) -> str:
    """examples/Dockerfile, built (the compose test's build reuses its layers)."""
    return build_app_image()


def host_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def wait_serving(client: StatusClient, timeout: float, what: str) -> None:
    """Until ``/status`` answers 200 with ``consul: connected``."""
    wait_for(
        lambda: answers(200, "connected")(*client.status()[:2]),
        timeout,
        interval=0.1,
        message=what,
        ignore=STARTING,
    )


def states_until(
    client: StatusClient,
    done: Callable[[int, dict[str, Any]], bool],
    timeout: float,
    since: float,
    code: int = 200,
) -> dict[str, float]:
    """Poll ``/status`` until ``done``; every answer must have ``code``.

    Returns, for each ``consul`` state seen, the seconds from ``since`` (a
    ``time.monotonic()``, taken before the fault was made) until it was
    first seen; the order of the dict is the order they were seen in.
    """
    started = since
    seen: dict[str, float] = {}
    while True:
        got, body, _ = client.status()
        now = time.monotonic() - started
        assert got == code, f"{now:.2f} s: {got} {body}"
        seen.setdefault(str(body["consul"]), round(now, 3))
        if done(got, body):
            return seen
        assert now < timeout, f"not done after {timeout} s: seen {seen}, last {body}"
        time.sleep(0.005)


def is_state(state: str) -> Callable[[int, dict[str, Any]], bool]:
    return lambda code, body: body.get("consul") == state


# --------------------------------------------------------------------------
# the compose path, as the README tells it


@contextlib.contextmanager
def compose_project(env: dict[str, str]) -> Iterator[Callable[..., str]]:
    """A compose project with a unique name; ``run(*args)`` runs a compose
    command in it. On exit ``down -v`` (and the app image it built)."""
    compose = compose_command()
    if compose is None:
        pytest.fail("Docker is here but neither `docker compose` nor docker-compose")
    project = unique_name("compose")
    full_env = {**os.environ, **env}

    def run(*args: str, timeout: float = 120.0) -> str:
        cmd = [*compose, "-p", project, "-f", str(COMPOSE), *args]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    try:
        yield run
    finally:
        run("down", "-v", "--rmi", "local", "--remove-orphans", timeout=180)
    selector = f"label=com.docker.compose.project={project}"
    for kind in ("container", "network", "volume"):
        every = ["-a"] if kind == "container" else []
        left = docker(kind, "ls", "-q", *every, "--filter", selector).stdout.split()
        assert not left, f"`down` left {kind}s of {project}: {left}"


def test_compose_up_maint_and_down(
    app_image: str, record_property: Callable[[str, Any], None]
) -> None:
    app_port = free_port()
    env = {"CONSUL_PORT": str(free_port()), "APP_PORT": str(app_port)}
    with compose_project(env) as run:
        started = time.monotonic()
        run("up", "-d", "--build", timeout=900)
        client = StatusClient(app_port)
        wait_serving(client, 60, "the app does not answer 200 connected")
        up_seconds = time.monotonic() - started

        run(
            "exec", "-T", "consul", "consul", "maint", "-enable", "-reason", "deploying"
        )
        wait_all([client], answers(503, reason="deploying"), 5, "maintenance")
        code, body, _ = client.status()
        assert (code, body["status"], body["source"]) == (503, "maintenance", "node")

        run("exec", "-T", "consul", "consul", "maint", "-disable")
        wait_all([client], answers(200, "connected"), 5, "back to ok")
        assert "reason" not in client.status()[1]
        client.close()
    measured(record_property, "compose_up", seconds=round(up_seconds, 1))


# --------------------------------------------------------------------------
# faults


def test_network_cut_between_app_and_agent(
    app_image: str, record_property: Callable[[str, Any], None]
) -> None:
    """The app in a second container; the agent is cut off its network."""
    network = create_network()
    agent = DockerAgent(network=network, aliases=["consul"])
    app = unique_name("app")
    try:
        agent.start()
        run_container(
            app_image,
            *("python", "-m", "tests.backend", "--port", "8000"),
            *("--address", "0.0.0.0", "--settings", json.dumps(FAST)),
            name=app,
            network=network,
            publish=[8000],
            env={"CONSUL_HTTP_ADDR": "consul:8500"},
            volumes=[f"{ROOT / 'tests'}:/app/tests:ro"],
        )
        client = StatusClient(host_port(published(app, 8000)))
        wait_serving(client, 30, f"app not serving:\n{logs(app)}")

        since = time.monotonic()
        docker("network", "disconnect", network, agent.container)
        cut = states_until(client, is_state("stale"), 15, since)
        assert list(cut) == ["connected", "unreachable", "stale"], cut

        since = time.monotonic()
        docker("network", "connect", "--alias", "consul", network, agent.container)
        back = states_until(client, is_state("connected"), 15, since)

        agent.consul("maint", "-enable", "-reason", "after the cut")
        follows = wait_all([client], answers(503, "connected", "after the cut"), 5, "")
        client.close()
    finally:
        remove(app)
        agent.stop()
        remove(network)
    measured(
        record_property,
        "docker_network_disconnect",
        unreachable_s=cut["unreachable"],
        stale_s=cut["stale"],
        reconnected_s=back["connected"],
        maint_after_s=round(follows, 3),
    )


def test_paused_agent(
    docker_engine: None, record_property: Callable[[str, Any], None]
) -> None:
    """``docker pause``: the agent's connections hang; the app on the host."""
    with (
        DockerAgent() as agent,
        fault_support.backends(agent.http_addr, [FAST]) as started,
    ):
        client = StatusClient(started[0].port)
        wait_serving(client, 10, "backend not serving")
        since = time.monotonic()
        agent.pause()
        try:
            frozen = states_until(client, is_state("stale"), 15, since)
        finally:
            since = time.monotonic()
            agent.resume()
        assert list(frozen) == ["connected", "unreachable", "stale"], frozen
        back = states_until(client, is_state("connected"), 15, since)
        agent.consul("maint", "-enable", "-reason", "after the pause")
        follows = wait_all(
            [client], answers(503, "connected", "after the pause"), 5, ""
        )
        client.close()
    measured(
        record_property,
        "docker_pause",
        unreachable_s=frozen["unreachable"],
        stale_s=frozen["stale"],
        resumed_s=back["connected"],
        maint_after_s=round(follows, 3),
    )


def test_three_servers_lose_their_leader(
    docker_engine: None, record_property: Callable[[str, Any], None]
) -> None:
    """The app follows a server that is not the leader; the leader stops.

    Reads with ``?stale`` are answered by the follower while the cluster
    elects a new leader: the app never stops following.
    """
    network = create_network()
    names = [f"server-{number}" for number in range(3)]
    servers = [
        DockerAgent(
            network=network,
            aliases=[name],
            node_name=unique_name(name),
            args=[
                *("agent", "-server", "-bootstrap-expect=3"),
                *("-client", "0.0.0.0", "-bind", "0.0.0.0"),
                *(f"-retry-join={other}" for other in names if other != name),
                *("-hcl", "performance { raft_multiplier = 1 }"),
            ],
        )
        for name in names
    ]
    try:
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready(timeout=60)
        old_leader = servers[0].leader()
        leader = next(s for s in servers if f"{s.ip()}:8300" == old_leader)
        follower = next(s for s in servers if s is not leader)
        with fault_support.backends(follower.http_addr, [FAST]) as started:
            client = StatusClient(started[0].port)
            wait_serving(client, 10, "backend not serving")
            stopped = time.monotonic()
            docker("stop", "-t", "10", leader.container)
            # the app stays connected (every answer checked) until a new leader
            seen = states_until(
                client,
                lambda *_: follower.leader(timeout=1) not in ("", old_leader),
                30,
                stopped,
            )
            election = time.monotonic() - stopped
            assert list(seen) == ["connected"], seen
            follower.consul("maint", "-enable", "-reason", "new leader")
            follows = wait_all(
                [client], answers(503, "connected", "new leader"), 10, ""
            )
            client.close()
    finally:
        for server in servers:
            server.stop()
        remove(network)
    measured(
        record_property,
        "docker_cluster_leader_stopped",
        new_leader_s=round(election, 3),
        app_states=",".join(seen),
        maint_after_s=round(follows, 3),
    )


def test_images_do_what_the_compose_file_relies_on(docker_engine: None) -> None:
    """Official images or local stand-ins: a consul subcommand as the command
    runs consul; ``python`` and ``pip`` are on PATH; a stand-in says so."""
    consul = consul_image()
    version = docker("run", "--rm", "--label", LABEL, consul, "version")
    assert version.stdout.startswith("Consul v"), version.stdout
    python = python_image()
    tools = docker(
        "run", "--rm", "--label", LABEL, python, "sh", "-c",
        "python --version && pip --version",
    )  # fmt: skip
    assert tools.stdout.startswith("Python 3."), tools.stdout
    for image in (consul, python):
        labels = docker(
            "image", "inspect", "--format", "{{json .Config.Labels}}", image
        )
        stand_in = (json.loads(labels.stdout) or {}).get(STAND_IN_LABEL)
        assert stand_in in (None, image), (image, stand_in)
