"""Consul hung, killed, restarted, absent or answering wrong, and under load.

Every test runs backend processes (``python -m tests.backend``) against a real
Consul dev agent, directly or through :class:`~tests.fault_proxy.FaultProxy`,
and checks, for each fault:

* every ``/status`` answer during the fault is 200 or 503 with a JSON body
  whose ``status`` matches the code, and ``consul`` says ``unreachable`` or
  ``stale``;
* the p99 latency of many sequential requests stays far below Consul's
  shortest wait here (under 50 ms against a 500 ms `timeout`)
  (:func:`~tests.fault_support.p99_limit_ms`): a request never waits on Consul;
* the library logs one warning per change of state, and no traceback;
* the backends converge within seconds once Consul is back.

The backends use small timings (:data:`~tests.fault_support.FAST`: ``ttl`` 1 s,
``timeout`` 0.5 s, ``retry_max`` 0.5 s) so that each fault shows and goes
within about a second. Measurements are printed as ``[measure]`` lines (run
with ``-s`` to see them) and recorded as junit properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .consul_agent import DevAgent, free_port, wait_for
from .fault_proxy import FaultProxy, Mode
from .fault_support import (
    AWAY,
    FAST,
    WARNING_TEXT,
    Backend,
    StatusClient,
    answers,
    assert_one_warning_per_change,
    backends,
    measured,
    p99_limit_ms,
    run_load,
    sample,
    set_maintenance,
    status_clients,
    wait_all,
)

Record = Callable[[str, Any], None]
MakeAgent = Callable[..., DevAgent]

FAST_CLOSED = {**FAST, "failure_mode": "closed"}
DETECT_WITHIN = FAST["ttl"] * 17 / 16 + FAST["timeout"] + 3.0
"""How long a fault may take to show: a pending blocking query ends after
``ttl * 17/16 + timeout``; 3 s more for a loaded machine."""

CONVERGE_WITHIN = 3.0
"""Seconds the backends get to follow Consul again once it is back."""

SAMPLE_SECONDS = 1.0


@pytest.fixture
def record(record_property: Record) -> Record:
    """``record_property``, shorter."""
    return record_property


def health_index(agent: DevAgent) -> int:
    response = agent.request("GET", f"/v1/health/node/{agent.node_name}")
    assert response.status == 200 and response.index is not None, response
    return response.index


def while_away(code: int, body: dict[str, Any]) -> str | None:
    """What is wrong with an answer given while Consul cannot be reached.

    Fail open: the last known status, ``consul`` unreachable or stale. Fail
    closed: the same while the last answer is younger than the TTL, then 503
    with ``source`` consul.
    """
    if body["consul"] not in AWAY:
        return "consul should be unreachable or stale"
    if code == 503 and body["source"] == "consul" and body["consul"] != "stale":
        return "fail-closed maintenance before the answer is stale"
    return None


def in_maintenance_while_away(reason: str) -> Callable[[int, dict[str, Any]], Any]:
    def expect(code: int, body: dict[str, Any]) -> str | None:
        problem = while_away(code, body)
        if problem is not None:
            return problem
        if code != 503:
            return "the last known status was maintenance"
        if body["source"] == "node" and body.get("reason") != reason:
            return f"the reason should still be {reason!r}"
        return None

    return expect


@dataclasses.dataclass
class Logs:
    """What the backends logged during a fault."""

    warnings: list[list[str]]
    """The library's warnings, per backend."""
    tornado: list[str]
    """Lines of Tornado's own loggers but the access log, all backends."""


def check_logs(
    members: list[Backend], marks: list[int], expected: str, where: str
) -> Logs:
    """The warnings each backend logged since its mark, checked: at least one
    naming ``expected``, none repeated back to back, no traceback, and
    "answers again" once Consul was back."""
    logs = Logs([], [])
    for backend, mark in zip(members, marks, strict=True):
        text = backend.log_since(mark)
        warnings = backend.warnings(mark)
        name = f"{where}, backend {backend.port}"
        assert warnings, f"{name}: no warning logged: {text[-2000:]}"
        assert any(expected in w for w in warnings), f"{name}: {warnings}"
        assert_one_warning_per_change(warnings, name)
        assert "Traceback" not in text, f"{name}: {text[-4000:]}"
        assert "Uncaught exception" not in text, f"{name}: {text[-4000:]}"
        assert any("answers again" in line for line in backend.library_lines(mark)), (
            f"{name}: no 'answers again' line: {backend.library_lines(mark)}"
        )
        logs.warnings.append(warnings)
        logs.tornado += [
            line
            for line in text.splitlines()
            if line.startswith("tornado.") and not line.startswith("tornado.access")
        ]
    return logs


def logged(backend: Backend, text: str) -> bool:
    """Whether the library logged a line containing ``text``."""
    return any(text in line for line in backend.library_lines())


def _short(warning: str) -> str:
    """The part of a warning that says what went wrong."""
    return warning.split(WARNING_TEXT, 1)[-1][:150]


def log_summary(logs: Logs) -> dict[str, Any]:
    """What a fault's measurement says of the backends' logs."""
    return {
        "warnings_per_backend": [len(w) for w in logs.warnings],
        "warnings": [_short(w) for w in logs.warnings[0]],
        "tornado_lines": len(logs.tornado),
    }


def assert_p99(name: str, p99_ms: float) -> None:
    limit = p99_limit_ms()
    assert p99_ms < limit, f"{name}: p99 {p99_ms} ms >= {limit} ms"


# --------------------------------------------------------------------------
# the agent itself: hung, killed and restarted, absent at start


def test_agent_hung_by_sigstop(make_dev_agent: MakeAgent, record: Record) -> None:
    agent = make_dev_agent()
    with contextlib.ExitStack() as stack:
        members = stack.enter_context(backends(agent.http_addr, [FAST, FAST_CLOSED]))
        clients = stack.enter_context(status_clients(b.port for b in members))
        wait_all(clients, answers(200, "connected"), 10, "backends connected")
        marks = [b.mark() for b in members]
        agent.pause()
        try:
            started = time.monotonic()
            detect = wait_all(
                clients,
                lambda _, body: body["consul"] in AWAY,
                DETECT_WITHIN,
                "the hung agent noticed",
            )
            during = sample(clients, SAMPLE_SECONDS, while_away)
            down_for = time.monotonic() - started
        finally:
            agent.resume()
        converge = wait_all(
            clients, answers(200, "connected"), CONVERGE_WITHIN, "back to connected"
        )
        set_maintenance(agent, True, "after the pause")
        follow = wait_all(
            clients,
            answers(503, "connected", "after the pause"),
            CONVERGE_WITHIN,
            "maintenance after the pause",
        )
        logs = check_logs(members, marks, "Timeout", "SIGSTOP")

    assert during.codes[503] > 0, "the fail-closed backend never went to 503"
    assert_p99("SIGSTOP", during.ms(99))
    measured(
        record,
        "fault.sigstop",
        detect_s=round(detect, 3),
        down_s=round(down_for, 3),
        converge_s=round(converge, 3),
        maintenance_after_s=round(follow, 3),
        **log_summary(logs),
        **during.summary(),
    )


def test_agent_killed_and_restarted_empty(
    make_dev_agent: MakeAgent, record: Record
) -> None:
    agent = make_dev_agent()
    for number in range(10):  # push the index up, so that the new one is lower
        set_maintenance(agent, True, f"bump {number}")
        set_maintenance(agent, False)
    wait_for(lambda: agent.maintenance_check() is None, 10, message="maint off")
    old_index = health_index(agent)
    with contextlib.ExitStack() as stack:
        members = stack.enter_context(
            backends(agent.http_addr, [FAST, FAST_CLOSED, FAST])
        )
        clients = stack.enter_context(status_clients(b.port for b in members))
        wait_all(clients, answers(200, "connected"), 10, "backends connected")
        marks = [b.mark() for b in members]
        agent.kill()
        detect = wait_all(
            clients,
            lambda _, body: body["consul"] in AWAY,
            DETECT_WITHIN,
            "the killed agent noticed",
        )
        during = sample(clients, SAMPLE_SECONDS, while_away)

        restarted = time.monotonic()
        agent.start()  # the same ports, an empty data directory
        agent_ready = time.monotonic() - restarted
        new_index = health_index(agent)
        set_maintenance(agent, True, "on the new agent")
        enabled = time.monotonic()
        wait_all(
            clients,
            answers(503, "connected", "on the new agent"),
            CONVERGE_WITHIN + agent_ready,
            "maintenance on the restarted agent",
        )
        follow = time.monotonic() - enabled
        converge = time.monotonic() - restarted
        logs = check_logs(members, marks, "cannot reach", "kill and restart")

    assert new_index < old_index, (new_index, old_index)
    assert_p99("kill", during.ms(99))
    measured(
        record,
        "fault.kill_restart",
        old_index=old_index,
        new_index=new_index,
        detect_s=round(detect, 3),
        agent_ready_s=round(agent_ready, 3),
        maintenance_after_s=round(follow, 3),
        converge_from_restart_s=round(converge, 3),
        **log_summary(logs),
        **during.summary(),
    )


def test_agent_absent_at_start_then_appears_in_maintenance(
    make_dev_agent: MakeAgent, record: Record
) -> None:
    agent = make_dev_agent()
    set_maintenance(agent, True, "there before us")
    wait_for(agent.maintenance_check, 10, message="maintenance in the catalog")
    # Nothing listens on this port until the proxy in front of the agent
    # opens it: to a backend, the agent appears there, already in maintenance.
    port = free_port()
    with contextlib.ExitStack() as stack:
        members = stack.enter_context(
            backends(f"127.0.0.1:{port}", [FAST, FAST_CLOSED])
        )
        clients = stack.enter_context(status_clients(b.port for b in members))
        detect = wait_all(
            clients,
            lambda _, body: body["consul"] == "stale",
            DETECT_WITHIN,
            "stale without an agent",
        )
        during = sample(clients, SAMPLE_SECONDS, while_away)
        codes = {c.port: c.status()[0] for c in clients}
        assert list(codes.values()) == [200, 503], codes  # open, closed
        with FaultProxy((agent.host, agent.http_port), port=port, lifetime=60):
            converge = wait_all(
                clients,
                answers(503, "connected", "there before us"),
                CONVERGE_WITHIN,
                "the agent's maintenance",
            )
            for client in clients:
                assert client.status()[1]["source"] == "node"
            logs = check_logs(members, [0, 0], "Connection refused", "absent")

    assert_p99("absent", during.ms(99))
    measured(
        record,
        "fault.absent_at_start",
        detect_s=round(detect, 3),
        converge_s=round(converge, 3),
        **log_summary(logs),
        **during.summary(),
    )


def test_index_going_backwards_without_an_error(
    make_dev_agent: MakeAgent, record: Record
) -> None:
    """The agent behind the address is replaced by one whose index is lower,
    with no failed request in between: the watcher must reset its index (a
    blocking query on the old, higher index would wait for nothing)."""
    old = make_dev_agent()
    new = make_dev_agent(node_name=old.node_name)
    for number in range(10):
        set_maintenance(old, True, f"bump {number}")
        set_maintenance(old, False)
    wait_for(lambda: old.maintenance_check() is None, 10, message="maint off")
    set_maintenance(new, True, "on the new agent")
    wait_for(new.maintenance_check, 10, message="maintenance on the new agent")
    old_index, new_index = health_index(old), health_index(new)
    assert new_index < old_index, (new_index, old_index)

    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(FaultProxy((old.host, old.http_port), lifetime=60))
        members = stack.enter_context(backends(proxy.address, [FAST, FAST]))
        clients = stack.enter_context(status_clients(b.port for b in members))
        wait_all(clients, answers(200, "connected"), 10, "backends connected")
        marks = [b.mark() for b in members]
        proxy.set_upstream(new.host, new.http_port)
        converge = wait_all(
            clients,
            answers(503, "connected", "on the new agent"),
            2 * DETECT_WITHIN,
            "the new agent's maintenance",
        )
        for backend in members:
            wait_for(
                functools.partial(logged, backend, "index went back"),
                5,
                message=f"no reset logged by backend {backend.port}",
            )
        # Once reset, the watcher blocks on the new agent's index: a change
        # there arrives at once, not after a blocking wait.
        set_maintenance(new, False)
        follow = wait_all(clients, answers(200, "connected"), 1.0, "maintenance off")
        for backend, mark in zip(members, marks, strict=True):
            assert backend.warnings(mark) == [], backend.warnings(mark)

    measured(
        record,
        "fault.index_backwards",
        old_index=old_index,
        new_index=new_index,
        converge_s=round(converge, 3),
        next_change_s=round(follow, 3),
    )


# --------------------------------------------------------------------------
# the agent answering wrong, through the fault proxy


@dataclasses.dataclass
class Proxied:
    agent: DevAgent
    proxy: FaultProxy
    members: list[Backend]
    clients: list[StatusClient]


@pytest.fixture(scope="module")
def proxied(consul_binary: str) -> Iterator[Proxied]:
    """One agent, the fault proxy in front of it, and two backends following
    it through the proxy (one failing open, one closed), for the whole module."""
    with contextlib.ExitStack() as stack:
        agent = DevAgent(consul_binary)
        stack.callback(agent.stop)
        agent.start()
        proxy = stack.enter_context(
            FaultProxy((agent.host, agent.http_port), lifetime=600, hang_max=20)
        )
        members = stack.enter_context(backends(proxy.address, [FAST, FAST_CLOSED]))
        clients = stack.enter_context(status_clients(b.port for b in members))
        yield Proxied(agent, proxy, members, clients)


PROXY_FAULTS = {
    Mode.ERROR_500: "answered 500",
    Mode.NOT_FOUND: "answered 404",
    Mode.TRUNCATED: "not what Consul sends",
    Mode.NOT_JSON: "not what Consul sends",
    Mode.WRONG_SHAPE: "not a list of checks",
    Mode.NO_INDEX: "X-Consul-Index",
    Mode.SLOW: "Timeout",
    Mode.CLOSE_MID: "no answer from",
    Mode.HANG: "Timeout",
    Mode.NOT_HTTP: "no answer from",
}
"""Each fault the proxy makes, and what the warning must say about it."""


@pytest.mark.parametrize("mode", list(PROXY_FAULTS), ids=lambda m: m.value)
def test_agent_answering_wrong(proxied: Proxied, mode: Mode, record: Record) -> None:
    agent, proxy, members, clients = (
        proxied.agent,
        proxied.proxy,
        proxied.members,
        proxied.clients,
    )
    proxy.set_mode(Mode.PASS)
    set_maintenance(agent, False)
    wait_all(clients, answers(200, "connected"), 10, "connected before the fault")
    reason = f"before {mode.value}"
    set_maintenance(agent, True, reason)
    wait_all(clients, answers(503, "connected", reason), 5, "maintenance known")

    marks = [b.mark() for b in members]
    started = time.monotonic()
    proxy.set_mode(mode)
    try:
        detect = wait_all(
            clients,
            lambda _, body: body["consul"] in AWAY,
            DETECT_WITHIN,
            f"the {mode.value} fault noticed",
        )
        during = sample(clients, SAMPLE_SECONDS, in_maintenance_while_away(reason))
        # Consul changes while the backends cannot see it.
        set_maintenance(agent, False)
        fault_requests = len(proxy.requests(since=started))
        fault_seconds = time.monotonic() - started
        for client in clients:
            assert client.status()[0] == 503
    finally:
        proxy.set_mode(Mode.PASS)
    converge = wait_all(
        clients, answers(200, "connected"), CONVERGE_WITHIN, "back to connected"
    )
    logs = check_logs(members, marks, PROXY_FAULTS[mode], f"proxy {mode.value}")

    assert_p99(mode.value, during.ms(99))
    for found in logs.warnings:
        assert len(found) == 1, found
    # Capped backoff: a few quick retries, then at most one per retry_max / 2.
    retry_bound = len(members) * (6 + fault_seconds / (FAST["retry_max"] / 2))
    assert fault_requests <= retry_bound, (fault_requests, retry_bound)
    measured(
        record,
        f"fault.proxy.{mode.value}",
        detect_s=round(detect, 3),
        converge_s=round(converge, 3),
        requests_to_consul=fault_requests,
        fault_s=round(fault_seconds, 2),
        warning=_short(logs.warnings[0][0]),
        tornado_lines=len(logs.tornado),
        tornado_sample=logs.tornado[:1],
        **during.summary(),
    )


# --------------------------------------------------------------------------
# load


LOAD_SECONDS = float(os.environ.get("SSC_LOAD_SECONDS", "4"))
"""The issue asks for 10 s; 4 s keeps the suite short (SSC_LOAD_SECONDS=10)."""

LOAD_CONNECTIONS = 64
FLIP_PERIOD = 0.1


def test_load_while_maintenance_flips(
    make_dev_agent: MakeAgent, record: Record
) -> None:
    agent = make_dev_agent()
    settings = {"ttl": 5, "retry_max": 0.5}
    with contextlib.ExitStack() as stack:
        members = stack.enter_context(backends(agent.http_addr, [settings] * 3))
        clients = stack.enter_context(status_clients(b.port for b in members))
        wait_all(clients, answers(200, "connected"), 10, "backends connected")
        ports = [b.port for b in members]
        flips_end = threading.Event()
        stop = threading.Event()
        flips: list[float] = []
        flip_errors: list[BaseException] = []

        def flipper() -> None:
            """Flip every FLIP_PERIOD s until LOAD_SECONDS - 1, then enable
            maintenance a last time with the reason "final"."""
            try:
                begin = time.monotonic()
                end = begin + LOAD_SECONDS - 1.0
                number = 0
                while not stop.is_set() and time.monotonic() < end:
                    number += 1
                    set_maintenance(agent, number % 2 == 1, f"flip {number}")
                    flips.append(time.monotonic())
                    stop.wait(max(0.0, begin + number * FLIP_PERIOD - time.monotonic()))
                set_maintenance(agent, True, "final")
                flips.append(time.monotonic())
            except BaseException as error:
                flip_errors.append(error)
            finally:
                flips_end.set()

        async def agreement() -> float:
            """Seconds from the last flip until every backend says "final"."""
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, flips_end.wait, LOAD_SECONDS + 10)
            last_flip = flips[-1]
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                replies = await asyncio.gather(
                    *(loop.run_in_executor(None, c.status) for c in clients)
                )
                if all(
                    code == 503 and body.get("reason") == "final"
                    for code, body, _ in replies
                ):
                    return time.monotonic() - last_flip
                await asyncio.sleep(0.005)
            raise AssertionError("the backends did not agree on the final state")

        async def main() -> tuple[Any, float]:
            load, agreed = await asyncio.gather(
                run_load(ports, LOAD_CONNECTIONS, LOAD_SECONDS), agreement()
            )
            return load, agreed

        thread = threading.Thread(target=flipper, name="flipper", daemon=True)
        thread.start()
        try:
            result, agreed = asyncio.run(main())
        finally:
            stop.set()
            thread.join(10)
        assert not thread.is_alive()
        assert not flip_errors, flip_errors
        for backend in members:
            assert backend.warnings() == [], backend.warnings()

    summary = result.summary()
    assert not result.errors, summary | {"errors": dict(result.errors)}
    assert not result.bad, result.bad[:5]
    assert set(result.codes) == {200, 503}, result.codes
    assert agreed < 1.0, agreed
    measured(
        record,
        "load",
        seconds=round(result.seconds, 2),
        connections=LOAD_CONNECTIONS,
        backends=len(ports),
        flips=len(flips),
        agreed_after_last_flip_s=round(agreed, 3),
        **summary,
    )
