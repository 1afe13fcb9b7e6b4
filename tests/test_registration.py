"""The ``register`` key: parsing, defaults, the default ID, clear errors.

What registration does against a real agent is in
``tests/test_registration_consul.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sprockets_status_consul import Settings, SettingsError
from sprockets_status_consul.registration import (
    Registrar,
    Registration,
    duration_text,
)
from sprockets_status_consul.transport import ConsulTimeout


def resolve(register: Any, **config: Any) -> Settings:
    return Settings.from_mapping({"register": register, **config}, environ={})


def test_absent_means_no_registration() -> None:
    settings = Settings.from_mapping({}, environ={})
    assert settings.register is None
    assert settings.service is None


def test_defaults() -> None:
    settings = resolve({"name": "web", "port": 8000})
    register = settings.register
    assert register is not None
    assert (register.name, register.port, register.address) == ("web", 8000, None)
    assert register.check_path == "/status"
    assert register.check_interval == 10.0
    assert register.check_timeout is None
    assert register.deregister_critical_after == 60.0
    assert register.tags == ()
    assert dict(register.meta) == {}
    assert register.enable_tag_override is False
    assert register.check_id == f"service:{register.id}"
    # Service maintenance follows the registered instance.
    assert settings.service == register.id


def test_an_explicit_service_wins() -> None:
    settings = resolve({"name": "web", "port": 8000}, service="other")
    assert settings.service == "other"
    assert settings.register is not None and settings.register.id != "other"


def test_every_key() -> None:
    register = resolve(
        {
            "name": "web",
            "port": 8000,
            "id": "web-1",
            "address": "10.0.0.5",
            "tags": ["blue", "v2"],
            "meta": {"version": "2.0", "team_a": "x"},
            "check_path": "/health",
            "check_interval": "1m30s",
            "check_timeout": "500ms",
            "deregister_critical_after": 120,
            "enable_tag_override": True,
        }
    ).register
    assert register == Registration(
        name="web",
        port=8000,
        id="web-1",
        address="10.0.0.5",
        tags=("blue", "v2"),
        meta={"version": "2.0", "team_a": "x"},
        check_path="/health",
        check_interval=90.0,
        check_timeout=0.5,
        deregister_critical_after=120.0,
        enable_tag_override=True,
    )
    assert register.check_url("10.0.0.5") == "http://10.0.0.5:8000/health"
    assert register.check_url("::1") == "http://[::1]:8000/health"


@pytest.mark.parametrize(
    ("value", "seconds", "text"),
    [
        (10, 10.0, "10s"),
        (2.5, 2.5, "2500ms"),
        ("10s", 10.0, "10s"),
        ("1m", 60.0, "60s"),
        ("1500ms", 1.5, "1500ms"),
        ("1h", 3600.0, "3600s"),
        ("1.5s", 1.5, "1500ms"),
    ],
)
def test_durations(value: Any, seconds: float, text: str) -> None:
    register = resolve({"name": "web", "port": 1, "check_interval": value}).register
    assert register is not None
    assert register.check_interval == seconds
    assert duration_text(register.check_interval) == text


def default_id_of(register: dict[str, Any]) -> str:
    settings = resolve(register)
    assert settings.register is not None
    return settings.register.id


def test_the_default_id_is_readable_and_stable_within_a_process() -> None:
    first = default_id_of({"name": "web", "port": 8000})
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.")
    pattern = rf"web-{re.escape(host)}-8000-{os.getpid()}-[0-9a-f]{{6}}"
    assert re.fullmatch(pattern, first), first
    # A watcher made again in this process registers the same instance.
    assert default_id_of({"name": "web", "port": 8000}) == first
    assert default_id_of({"name": "web", "port": 8001}) != first


def test_another_process_gets_another_default_id() -> None:
    code = (
        "from sprockets_status_consul import Settings; "
        "print(Settings.from_mapping("
        "{'register': {'name': 'web', 'port': 8000}}, environ={}).register.id)"
    )
    ids = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        for _ in range(2)
    }
    ids.add(default_id_of({"name": "web", "port": 8000}))
    assert len(ids) == 3, ids


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ("web", r"\['register'\] must be a dict"),
        ({"port": 8000}, r"\['register'\]\['name'\] must be a non-empty string"),
        ({"name": "", "port": 8000}, r"\['name'\] must be a non-empty"),
        ({"name": "a/b", "port": 8000}, r"\['name'\] must be .* without '/'"),
        ({"name": "web"}, r"\['register'\]\['port'\] must be the port"),
        ({"name": "web", "port": "8000"}, r"\['port'\] must be the port"),
        ({"name": "web", "port": True}, r"\['port'\] must be the port"),
        ({"name": "web", "port": 70000}, r"\['port'\] must be the port"),
        ({"name": "web", "port": 1, "id": "a b"}, r"\['id'\] must be"),
        ({"name": "web", "port": 1, "address": ""}, r"\['address'\] must be"),
        ({"name": "web", "port": 1, "tags": "blue"}, r"\['tags'\] must be a list"),
        ({"name": "web", "port": 1, "tags": [1]}, r"\['tags'\] must be a list"),
        ({"name": "web", "port": 1, "meta": ["a"]}, r"\['meta'\] must be a dict"),
        ({"name": "web", "port": 1, "meta": {"a b": "c"}}, r"\['meta'\]: key 'a b'"),
        ({"name": "web", "port": 1, "meta": {"consul-x": "c"}}, "reserved"),
        ({"name": "web", "port": 1, "meta": {"a": 1}}, r"\['meta'\]\['a'\] must be"),
        ({"name": "web", "port": 1, "check_path": "status"}, r"\['check_path'\]"),
        ({"name": "web", "port": 1, "check_interval": "10x"}, r"like '10s'"),
        ({"name": "web", "port": 1, "check_interval": "s"}, r"\['check_interval'\]"),
        ({"name": "web", "port": 1, "check_interval": 0.5}, r"at least 1 s"),
        ({"name": "web", "port": 1, "check_interval": True}, r"number of seconds"),
        ({"name": "web", "port": 1, "check_interval": float("nan")}, r"at most"),
        ({"name": "web", "port": 1, "check_timeout": 0}, r"\['check_timeout'\]"),
        (
            {"name": "web", "port": 1, "deregister_critical_after": "30s"},
            r"\['deregister_critical_after'\] must be at least 60 s",
        ),
        ({"name": "web", "port": 1, "enable_tag_override": "yes"}, r"true or false"),
        ({"name": "web", "port": 1, "check": "x"}, r"unknown key\(s\) 'check'"),
    ],
)
def test_bad_values_name_the_key(register: Any, message: str) -> None:
    with pytest.raises(SettingsError, match=r"^consul_status\['register'\]") as info:
        resolve(register)
    assert re.search(message, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("register", "message"),
    [
        ({"address": "   "}, r"\['address'\] must be a host name or IP address"),
        ({"address": "10.0.0.5:8000"}, r"\['address'\] must be a host name"),
        ({"address": "[::1]"}, r"\['address'\] must be a host name"),
        ({"address": "a b"}, r"\['address'\] must be a host name"),
        ({"check_path": "/st atus"}, r"\['check_path'\] must be a path"),
    ],
)
def test_odd_addresses_and_paths_name_the_key(
    register: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve({"name": "web", "port": 8000, **register})


@pytest.mark.parametrize("address", ["10.0.0.5", "::1", "web-1.example", " web "])
def test_addresses_that_make_a_check_url(address: str) -> None:
    register = resolve({"name": "web", "port": 8000, "address": address}).register
    assert register is not None and register.address == address.strip()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "a b", "port": 8000}, r"^Registration\.name must be"),
        ({"name": "web", "port": 0}, r"^Registration\.port must be the port"),
        ({"name": "web", "port": 1, "id": "x/y"}, r"^Registration\.id must be"),
        ({"name": "web", "port": 1, "check_interval": 0.01}, r"check_interval .* 1 s"),
        (
            {"name": "web", "port": 1, "deregister_critical_after": 1},
            r"^Registration\.deregister_critical_after must be at least 60 s",
        ),
        ({"name": "web", "port": 1, "address": "h:1"}, r"^Registration\.address"),
        ({"name": "web", "port": 1, "tags": "blue"}, r"^Registration\.tags"),
    ],
)
def test_a_registration_built_directly_is_checked(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Registration(**fields)


def test_a_registration_built_directly_is_normalized() -> None:
    register = Registration("web", 8000, tags=["blue"], check_interval="1m")  # type: ignore[arg-type]
    assert (register.tags, register.check_interval) == (("blue",), 60.0)
    assert register.id.startswith("web-")
    assert register == Registration(
        "web", 8000, register.id, tags=("blue",), check_interval=60
    )


def test_a_registration_is_lost_only_once_it_was_seen() -> None:
    register = resolve({"name": "web", "port": 8000}).register
    assert register is not None
    registrar = Registrar(register, retry_max=1.0, agent="http://127.0.0.1:8500")
    ours = {"CheckID": register.check_id, "Status": "passing"}
    serf = {"CheckID": "serfHealth", "Status": "passing"}
    # Not registered yet: the checks say nothing about it.
    registrar.checks_seen([serf])
    assert registrar.state == "new"
    # Registered, but an answer from before the catalog had it: not lost.
    registrar.state = "pending"
    registrar.checks_seen([serf])
    assert registrar.state == "pending"
    registrar.checks_seen([serf, ours])
    assert registrar.state == "seen"
    registrar.checks_seen([serf, ours])
    assert registrar.state == "seen"
    registrar.checks_seen([serf])
    assert registrar.state == "lost"


class StubAgent:
    """Stands in for ConsulClient: records the calls; ``on_register`` is what
    becomes of the PUT once the agent has taken it."""

    settings = Settings.from_mapping({}, environ={})

    def __init__(self, on_register: Callable[[], Awaitable[Any]]) -> None:
        self.on_register = on_register
        self.calls: list[tuple[str, str]] = []

    async def register_service(
        self, name: str, service_id: str, *_: Any, **__: Any
    ) -> None:
        self.calls.append(("register", service_id))
        await self.on_register()

    async def deregister_service(self, service_id: str) -> None:
        self.calls.append(("deregister", service_id))


def test_a_registration_in_flight_at_shutdown_is_withdrawn() -> None:
    register = resolve({"name": "web", "port": 8000, "address": "127.0.0.1"}).register
    assert register is not None
    agent = StubAgent(lambda: asyncio.Event().wait())  # never answers

    async def main() -> None:
        registrar = Registrar(register, retry_max=1.0, agent="http://127.0.0.1:8500")
        registrar.start(agent)  # type: ignore[arg-type]
        while not agent.calls:
            await asyncio.sleep(0.001)
        await registrar.withdraw()
        assert registrar.state == "withdrawn"

    asyncio.run(asyncio.wait_for(main(), 5))
    assert agent.calls == [("register", register.id), ("deregister", register.id)]


def test_a_registration_that_timed_out_is_withdrawn_all_the_same() -> None:
    register = resolve({"name": "web", "port": 8000, "address": "127.0.0.1"}).register
    assert register is not None

    async def time_out() -> None:
        raise ConsulTimeout("no answer from the agent")

    agent = StubAgent(time_out)

    async def main() -> None:
        registrar = Registrar(register, retry_max=60.0, agent="http://127.0.0.1:8500")
        registrar.start(agent)  # type: ignore[arg-type]
        while not agent.calls:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)  # the failure is recorded; a retry waits
        assert registrar.state == "new"
        await registrar.withdraw()

    asyncio.run(asyncio.wait_for(main(), 5))
    assert agent.calls == [("register", register.id), ("deregister", register.id)]
