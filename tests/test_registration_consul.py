"""Registration against real Consul agents: the whole lifecycle of an instance.

Backend processes (``python -m tests.backend``) register themselves with a
1 s HTTP check of their ``/status``. Checked here, each with a deadline:

* two processes of one service on one node: two IDs, both in
  ``/v1/health/service/NAME?passing``;
* service maintenance, node maintenance and the fleet key each take the
  instance out of ``?passing`` within two check intervals, and it comes back;
* SIGTERM: the instance leaves the catalog while the process still drains,
  and does not come back before it exits; SIGKILL: it leaves ``?passing`` at
  the next check, and the catalog after ``deregister_critical_after``;
* what the catalog, ``?passing`` and DNS show in each state (README);
* an agent restarted with empty state gets the registration back from the
  running backend;
* in a cluster each backend registers on its own agent;
* ``stop(app)`` deregisters; a token without ``service:write`` gives one log
  line naming the rule while ``/status`` stays 200.

How long each transition took is printed as ``[measure]`` lines (``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from tornado import web

import sprockets_status_consul as ssc

from .consul_agent import AgentBase, DevAgent, free_port, wait_for
from .fault_support import FAST, ROOT, Backend, backend_env, backends, measured
from .test_cluster import client_of
from .test_security import AclAgent, _create_token, acl, serving  # noqa: F401

Record = Callable[[str, Any], None]

INTERVAL = 1.0
"""The check interval of every registration here: Consul's shortest."""

WITHIN_TWO_CHECKS = 2 * INTERVAL


def unique_name() -> str:
    return f"ssc-reg-{uuid.uuid4().hex[:8]}"


def settings_for(name: str, **extra: Any) -> dict[str, Any]:
    """Backend settings: fast retries, and a registration with a 1 s check."""
    return {**FAST, "register": {"name": name, "check_interval": INTERVAL}, **extra}


def passing(agent: AgentBase, name: str) -> dict[str, dict[str, Any]]:
    """``/v1/health/service/NAME?passing``, by service ID."""
    entries = agent.get_json(f"/v1/health/service/{name}", {"passing": "1"})
    return {entry["Service"]["ID"]: entry for entry in entries}


def catalog(agent: AgentBase, name: str) -> dict[str, dict[str, Any]]:
    """``/v1/catalog/service/NAME``, by service ID."""
    entries = agent.get_json(f"/v1/catalog/service/{name}")
    return {entry["ServiceID"]: entry for entry in entries}


def id_on_port(agent: AgentBase, name: str, port: int) -> str:
    """The ID of the instance of ``name`` registered with ``port``."""
    found: str = wait_for(
        lambda: next(
            (
                sid
                for sid, e in catalog(agent, name).items()
                if e["ServicePort"] == port
            ),
            None,
        ),
        10,
        message=f"no instance of {name} on port {port} in the catalog",
        ignore=(OSError, AssertionError),
    )
    return found


def timed(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until ``predicate`` holds (polled every 20 ms), at most ``timeout``."""
    started = time.monotonic()
    wait_for(predicate, timeout, 0.02, message=what, ignore=(OSError, AssertionError))
    return round(time.monotonic() - started, 3)


def token_env(agent: AgentBase) -> dict[str, str] | None:
    return {"CONSUL_HTTP_TOKEN": agent.token} if agent.token else None


@contextlib.contextmanager
def registered(
    agent: AgentBase, settings: list[dict[str, Any]], grace: float = 0.0
) -> Iterator[list[tuple[Backend, str]]]:
    """Backends following ``agent``, once each is passing: (backend, its ID)."""
    with backends(
        agent.http_addr, settings, env=token_env(agent), grace=grace
    ) as started:
        pairs = []
        for backend, config in zip(started, settings, strict=True):
            name = config["register"]["name"]
            service_id = id_on_port(agent, name, backend.port)
            timed(
                lambda: service_id in passing(agent, name),  # noqa: B023
                10,
                f"{service_id} not passing",
            )
            pairs.append((backend, service_id))
        yield pairs


# --------------------------------------------------------------------------


def test_two_processes_register_under_two_ids_and_pass(
    consul_agent: AgentBase, record_property: Record
) -> None:
    name = unique_name()
    with backends(
        consul_agent.http_addr, [settings_for(name)] * 2, env=token_env(consul_agent)
    ) as started:
        seconds = timed(
            lambda: len(passing(consul_agent, name)) == 2,
            10,
            f"two instances of {name} passing",
        )
        instances = passing(consul_agent, name)
        by_port = {e["Service"]["Port"]: sid for sid, e in instances.items()}
        assert set(by_port) == {b.port for b in started}
        for entry in instances.values():
            service = entry["Service"]
            assert service["Service"] == name
            assert service["Address"] == ""  # the node's address
            assert entry["Node"]["Node"] == consul_agent.node_name
            check = next(
                c for c in entry["Checks"] if c["CheckID"] == f"service:{service['ID']}"
            )
            assert check["Status"] == "passing"
            assert check["Type"] == "http"
            assert f"127.0.0.1:{service['Port']}/status" in check["Output"]
        log = started[0].log()
        assert f"registered service '{name}' as " in log
        assert "every 1s" in log
    measured(record_property, "registration", visible_s=seconds)
    # Both deregistered on SIGTERM.
    assert catalog(consul_agent, name) == {}


@pytest.mark.parametrize("way", ["service maintenance", "node maintenance", "key"])
def test_maintenance_takes_the_instance_out_of_passing(
    consul_agent: AgentBase, record_property: Record, way: str
) -> None:
    name = unique_name()
    key = f"sprockets-status-consul/test/{name}"
    with registered(consul_agent, [settings_for(name, key=key)]) as pairs:
        [(backend, service_id)] = pairs
        enable, disable = {
            "service maintenance": (
                ("maint", "-enable", "-service", service_id, "-reason", "by hand"),
                ("maint", "-disable", "-service", service_id),
            ),
            "node maintenance": (
                ("maint", "-enable", "-reason", "by hand"),
                ("maint", "-disable"),
            ),
            "key": (("kv", "put", key, "by hand"), ("kv", "delete", key)),
        }[way]
        consul_agent.consul(*enable)
        out = timed(
            lambda: service_id not in passing(consul_agent, name),
            WITHIN_TWO_CHECKS,
            f"{way}: {service_id} still passing",
        )
        # Out of ?passing, still in the catalog.
        assert service_id in catalog(consul_agent, name)
        consul_agent.consul(*disable)
        back = timed(
            lambda: service_id in passing(consul_agent, name),
            5 * INTERVAL,
            f"{way} off: {service_id} not passing again",
        )
        # Consul's maintenance is not a lost registration.
        assert "no longer registered" not in backend.log()
    measured(record_property, f"registration.{way}", out_s=out, back_s=back)


def test_sigterm_deregisters_before_the_process_exits(
    consul_agent: AgentBase, record_property: Record
) -> None:
    name = unique_name()
    grace = 3.0
    with registered(consul_agent, [settings_for(name)], grace=grace) as pairs:
        [(backend, service_id)] = pairs
        backend.process.send_signal(signal.SIGTERM)
        gone = timed(
            lambda: service_id not in catalog(consul_agent, name),
            grace,
            f"{service_id} still in the catalog",
        )
        assert backend.process.poll() is None, "exited before leaving the catalog"
        # Draining: the watcher still follows Consul, and never registers again.
        while backend.process.poll() is None:
            assert service_id not in catalog(consul_agent, name)
            time.sleep(0.05)
        assert backend.process.returncode == 0, backend.log()
        log = backend.log()
        assert log.index("deregistered service") < log.index("draining:"), log
    measured(record_property, "registration.sigterm", gone_s=gone, grace_s=grace)


def test_an_agent_restarted_empty_gets_the_registration_back(
    make_dev_agent: Callable[..., DevAgent], record_property: Record
) -> None:
    agent = make_dev_agent()
    name = unique_name()
    with registered(agent, [settings_for(name)]) as pairs:
        [(backend, service_id)] = pairs
        pid = backend.process.pid
        mark = backend.mark()
        started = time.monotonic()
        agent.restart()  # same ports, empty data dir: a new, empty cluster
        restarted = round(time.monotonic() - started, 3)
        assert name not in agent.get_json("/v1/catalog/services")
        back = timed(
            lambda: service_id in passing(agent, name),
            15,
            f"{service_id} not registered again",
        )
        assert backend.process.poll() is None and backend.process.pid == pid
        lines = backend.library_lines(mark)
        assert sum("no longer registered" in line for line in lines) == 1, lines
        assert sum(f"registered service {service_id!r}" in line for line in lines) == 1
    measured(
        record_property,
        "registration.agent_restart",
        restart_s=restarted,
        registered_again_s=back,
    )


def test_each_backend_registers_on_its_own_agent_in_a_cluster(
    make_dev_agent: Callable[..., DevAgent], tmp_path: Path
) -> None:
    server = make_dev_agent(host="127.0.0.2")
    one = client_of(make_dev_agent, server, "127.0.0.3", tmp_path / "one")
    two = client_of(make_dev_agent, server, "127.0.0.4", tmp_path / "two")
    name = unique_name()
    with contextlib.ExitStack() as stack:
        on_one = stack.enter_context(registered(one, [settings_for(name)]))
        on_two = stack.enter_context(registered(two, [settings_for(name)]))
        instances = wait_for(
            lambda: len(found := passing(server, name)) == 2 and found,
            10,
            message="two instances passing, seen from the server",
        )
        assert instances[on_one[0][1]]["Node"]["Node"] == one.node_name
        assert instances[on_two[0][1]]["Node"]["Node"] == two.node_name


def dns_srv_ports(agent: DevAgent, name: str) -> list[int]:
    """The ports in the SRV answer of the agent's DNS for ``NAME.service.consul``."""
    query_id = secrets.randbelow(65536)
    qname = b"".join(
        bytes([len(label)]) + label.encode()
        for label in f"{name}.service.consul".split(".")
    )
    question = qname + b"\0" + struct.pack("!HH", 33, 1)  # SRV, IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(
            struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question,
            (agent.host, agent.ports["dns"]),
        )
        data = sock.recv(65535)
    answer_id, flags, _, count, _, _ = struct.unpack("!HHHHHH", data[:12])
    assert answer_id == query_id, data
    assert flags & 0xF in (0, 3), f"DNS error {flags & 0xF}"  # ok, NXDOMAIN
    offset = 12 + len(question)
    ports = []
    for _ in range(count):
        while data[offset] and data[offset] & 0xC0 != 0xC0:  # the name's labels
            offset += 1 + data[offset]
        offset += 2 if data[offset] & 0xC0 == 0xC0 else 1
        kind, _, _, length = struct.unpack("!HHIH", data[offset : offset + 10])
        offset += 10
        if kind == 33:
            ports.append(struct.unpack("!H", data[offset + 4 : offset + 6])[0])
        offset += length
    return ports


def test_what_catalog_health_and_dns_show_in_each_state(
    make_dev_agent: Callable[..., DevAgent], record_property: Record
) -> None:
    """The README's table: catalog, ?passing and DNS in each state."""
    agent = make_dev_agent(ports={"dns": free_port(also_udp=True)})
    name = unique_name()

    def views(service_id: str, port: int) -> tuple[bool, bool, bool]:
        return (
            service_id in catalog(agent, name),
            service_id in passing(agent, name),
            port in dns_srv_ports(agent, name),
        )

    def shows(
        service_id: str, port: int, expected: tuple[bool, ...]
    ) -> Callable[[], bool]:
        return lambda: views(service_id, port) == expected

    seen: dict[str, float] = {}
    with registered(agent, [settings_for(name)] * 3, grace=3.0) as pairs:
        (ok, ok_id), (drained, drained_id), (killed, killed_id) = pairs
        assert views(ok_id, ok.port) == (True, True, True)

        agent.consul("maint", "-enable", "-service", ok_id, "-reason", "by hand")
        seen["maintenance"] = timed(
            shows(ok_id, ok.port, (True, False, False)), WITHIN_TWO_CHECKS, "maint"
        )
        agent.consul("maint", "-disable", "-service", ok_id)
        timed(shows(ok_id, ok.port, (True, True, True)), 5 * INTERVAL, "ok again")

        drained.process.send_signal(signal.SIGTERM)
        seen["draining"] = timed(
            shows(drained_id, drained.port, (False, False, False)), 3.0, "draining"
        )
        assert drained.process.poll() is None

        killed.process.kill()
        killed.expected_exit = -signal.SIGKILL
        seen["killed"] = timed(
            shows(killed_id, killed.port, (True, False, False)),
            WITHIN_TWO_CHECKS,
            "killed",
        )
        assert views(ok_id, ok.port) == (True, True, True)
        # Consul's reaper, every 30 s, removes what has been critical for
        # deregister_critical_after (1 min): the one slow wait of this file.
        seen["killed_removed"] = timed(
            shows(killed_id, killed.port, (False, False, False)), 120.0, "reaped"
        )
        assert views(ok_id, ok.port) == (True, True, True)
    measured(
        record_property, "registration.views", **{f"{k}_s": v for k, v in seen.items()}
    )


def readme_example() -> str:
    """The Python example of the README's "Registering with Consul"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Registering with Consul", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_registers_and_deregisters(
    consul_agent: AgentBase,
) -> None:
    port = free_port()
    code = readme_example()
    assert "port = 8000" in code
    process = subprocess.Popen(
        [sys.executable, "-c", code.replace("port = 8000", f"port = {port}")],
        env=backend_env(consul_agent.http_addr, token_env(consul_agent)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        service_id = id_on_port(consul_agent, "web", port)
        instance = wait_for(
            lambda: passing(consul_agent, "web").get(service_id),
            10,
            message="the README example is not passing",
        )
        assert instance["Service"]["Tags"] == ["v2"]
        process.send_signal(signal.SIGTERM)
        timed(
            lambda: service_id not in catalog(consul_agent, "web"),
            5,
            "the README example still registered",
        )
        assert process.poll() is None  # draining: grace=10
        process.send_signal(signal.SIGTERM)  # a second signal cuts it short
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr


# --------------------------------------------------------------------------
# in-process


def test_stop_deregisters_and_a_request_never_waits(consul_agent: AgentBase) -> None:
    name = unique_name()
    port = free_port()

    async def main() -> None:
        app = web.Application(
            [(r"/status", ssc.ConsulStatusHandler)],
            consul_status={
                "address": consul_agent.http_addr,
                "token": consul_agent.token,
                "register": {"name": name, "port": port, "check_interval": 1},
            },
        )
        server = app.listen(port, address="127.0.0.1")
        try:
            watcher = ssc.watch(app)
            register = watcher.settings.register
            assert register is not None
            assert watcher.settings.service == register.id

            async def listed() -> bool:
                return register.id in await asyncio.to_thread(
                    passing, consul_agent, name
                )

            deadline = time.monotonic() + 10
            while not await listed():
                assert time.monotonic() < deadline, "not registered"
                await asyncio.sleep(0.05)
            await ssc.stop(app)
            assert await asyncio.to_thread(catalog, consul_agent, name) == {}
        finally:
            server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_token_without_service_write_is_named_once(
    acl: AclAgent,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = unique_name()
    port = free_port()
    settings: Mapping[str, Any] = {
        **FAST,
        "retry_max": 0.2,
        "address": acl.agent.http_addr,
        "token": acl.node_and_agent_read,
        "register": {"name": name, "port": port, "check_interval": 1},
    }

    async def main() -> None:
        async with serving(dict(settings)) as app:
            # Registration retries for a while; /status never notices.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                code, body = await app.status()
                assert (code, body["consul"]) == (200, "connected"), body
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.INFO, logger="sprockets_status_consul"):
        asyncio.run(asyncio.wait_for(main(), 30))
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "sprockets_status_consul.registration"
    ]
    assert len(lines) == 1, lines
    assert "403" in lines[0]
    assert f"the token needs service:write on {name!r}" in lines[0]
    assert f'service "{name}" {{ policy = "write" }}' in lines[0]
    assert acl.node_and_agent_read not in caplog.text
    assert catalog(acl.agent, name) == {}


def test_a_token_with_service_write_registers(acl: AclAgent) -> None:  # noqa: F811
    name = unique_name()
    token = _create_token(
        acl.agent,
        f"{name}-write",
        'node_prefix "" { policy = "read" }\n'
        'agent_prefix "" { policy = "read" }\n'
        f'service "{name}" {{ policy = "write" }}',
    )
    port = free_port()
    settings = {
        **FAST,
        "address": acl.agent.http_addr,
        "token": token,
        "register": {"name": name, "port": port, "check_interval": 1},
    }

    async def main() -> None:
        async with serving(settings):
            # In the catalog (its check asks a port nobody serves: critical).
            deadline = time.monotonic() + 10
            while len(await asyncio.to_thread(catalog, acl.agent, name)) != 1:
                assert time.monotonic() < deadline, "not registered with the token"
                await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert catalog(acl.agent, name) == {}


def test_stop_deregisters_an_id_with_reserved_characters(
    consul_agent: AgentBase,
) -> None:
    # Registrator-style IDs ("host:name:port") and others with characters a
    # URL path reserves must leave the agent like any other.
    name = unique_name()
    service_id = f"host1:{name}@a+b=c"

    async def main() -> None:
        app = web.Application(
            consul_status={
                "address": consul_agent.http_addr,
                "token": consul_agent.token,
                "register": {"name": name, "port": free_port(), "id": service_id},
            },
        )
        ssc.watch(app)
        deadline = time.monotonic() + 10
        while service_id not in await asyncio.to_thread(catalog, consul_agent, name):
            assert time.monotonic() < deadline, "not registered"
            await asyncio.sleep(0.05)
        await ssc.stop(app)
        assert await asyncio.to_thread(catalog, consul_agent, name) == {}

    asyncio.run(asyncio.wait_for(main(), 30))
