"""A real multi-node Consul cluster on loopback: one server, two clients.

Backends attached to different agents: node maintenance on one node flips
only that node's backends; the fleet-wide key flips all of them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .consul_agent import DevAgent, wait_for
from .test_integration import all_answer, backends, get_status


def client_of(
    make_dev_agent: Callable[..., DevAgent],
    server: DevAgent,
    host: str,
    data_dir: Path,
) -> DevAgent:
    """A client agent on ``host`` joined to ``server``'s cluster."""
    data_dir.mkdir()
    return make_dev_agent(
        host=host,
        extra_args=[
            "-server=false",
            "-bootstrap=false",
            f"-data-dir={data_dir}",
            f"-retry-join={server.host}:{server.ports['serf_lan']}",
        ],
    )


def test_node_maintenance_is_per_node_and_the_key_is_fleet_wide(
    make_dev_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    server = make_dev_agent(host="127.0.0.2")
    one = client_of(make_dev_agent, server, "127.0.0.3", tmp_path / "one")
    two = client_of(make_dev_agent, server, "127.0.0.4", tmp_path / "two")
    members = server.get_json("/v1/catalog/nodes")
    assert {n["Node"] for n in members} == {
        server.node_name,
        one.node_name,
        two.node_name,
    }
    key = f"sprockets-status-consul/test/{uuid.uuid4().hex[:8]}"
    settings = {"key": key}

    with contextlib.ExitStack() as stack:
        on_one = stack.enter_context(backends(2, one, settings))
        on_two = stack.enter_context(backends(2, two, settings))
        everyone = on_one + on_two
        wait_for(lambda: all_answer(everyone, 200), 10, message="backends not up")
        for port in on_one:
            assert get_status(port)[1]["consul"] == "connected"

        one.consul("maint", "-enable", "-reason", "kernel upgrade")
        wait_for(lambda: all_answer(on_one, 503, "kernel upgrade"), 5, interval=0.002)
        # The other node's backends saw the change in the catalog, and ignore it.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert all_answer(on_two, 200)

        one.consul("maint", "-disable")
        wait_for(lambda: all_answer(everyone, 200), 5, interval=0.002)

        # The key, written through one client, reaches the backends of both.
        two.consul("kv", "put", key, "fleet deploy")
        wait_for(lambda: all_answer(everyone, 503, "fleet deploy"), 5, interval=0.002)
        for port in everyone:
            assert get_status(port)[1]["source"] == "key"
        one.consul("kv", "delete", key)
        wait_for(lambda: all_answer(everyone, 200), 5, interval=0.002)
