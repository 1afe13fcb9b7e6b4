"""Tests of the test harness itself: the Consul agent fixtures and helpers.

The integration tests here run against a real Consul agent (see conftest.py);
the rest check the helpers and the conftest's skip/fail/summary rules.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import sprockets_status_consul
from tests.consul_agent import (
    AgentBase,
    ConsulCommandError,
    ConsulUnavailable,
    DevAgent,
    ExternalAgent,
    free_port,
    reset_agent_state,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MakeAgent = Callable[..., DevAgent]


def _health_index(agent: AgentBase) -> int:
    resp = agent.request("GET", f"/v1/health/node/{agent.node_name}")
    assert resp.status == 200
    assert resp.index is not None
    return resp.index


# --------------------------------------------------------------------------
# helpers, no agent needed


def test_wait_for_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", "yes"])
    assert wait_for(lambda: next(values), timeout=5) == "yes"


def test_wait_for_times_out_with_the_message() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s: never"):
        wait_for(lambda: False, timeout=0.05, message="never")
    assert time.monotonic() - start < 2


def test_wait_for_ignores_only_the_given_exceptions() -> None:
    calls: list[int] = []

    def flaky() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")
        return True

    assert wait_for(flaky, timeout=5, ignore=(OSError,)) is True
    with pytest.raises(AssertionError, match="last error: ConnectionRefused"):
        wait_for(flaky_forever, timeout=0.05, ignore=(OSError,))
    with pytest.raises(ValueError):
        wait_for(_raise_value_error, timeout=5, ignore=(OSError,))


def flaky_forever() -> bool:
    raise ConnectionRefusedError("never")


def _raise_value_error() -> bool:
    raise ValueError("boom")


def test_unreachable_external_agent_is_not_ready() -> None:
    agent = ExternalAgent(f"http://127.0.0.1:{free_port()}")
    assert agent.http_addr.startswith("127.0.0.1:")
    with pytest.raises(AssertionError, match="has no leader or does not answer"):
        agent.wait_ready(timeout=0.3)


def test_plain_tests_are_not_integration_tests(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is None


# --------------------------------------------------------------------------
# the shared agent


def test_agent_is_up_and_named(consul_agent: AgentBase) -> None:
    assert consul_agent.leader()
    me = consul_agent.get_json("/v1/agent/self")
    assert me["Config"]["NodeName"] == consul_agent.node_name
    assert consul_agent.url == f"http://{consul_agent.http_addr}"
    members = consul_agent.consul("members").stdout
    assert consul_agent.node_name in members
    assert "alive" in members


def test_using_the_agent_marks_integration(
    consul_agent: AgentBase, request: pytest.FixtureRequest
) -> None:
    assert request.node.get_closest_marker("integration") is not None


def test_node_maintenance_shows_in_the_catalog(consul_agent: AgentBase) -> None:
    assert consul_agent.maintenance_check() is None
    consul_agent.consul("maint", "-enable", "-reason", "X")
    check = wait_for(
        consul_agent.maintenance_check,
        timeout=5,
        message="_node_maintenance never showed up in /v1/health/node",
    )
    assert check["Status"] == "critical"
    assert check["Notes"] == "X"
    assert check["Node"] == consul_agent.node_name
    assert check["ServiceID"] == ""

    consul_agent.consul("maint", "-disable")
    wait_for(
        lambda: consul_agent.maintenance_check() is None,
        timeout=5,
        message="_node_maintenance still there after maint -disable",
    )
    checks = {c["CheckID"]: c["Status"] for c in consul_agent.node_checks()}
    assert checks == {"serfHealth": "passing"}


def test_each_maintenance_change_raises_the_index(consul_agent: AgentBase) -> None:
    before = _health_index(consul_agent)
    consul_agent.consul("maint", "-enable", "-reason", "index")
    wait_for(consul_agent.maintenance_check, timeout=5)
    during = _health_index(consul_agent)
    consul_agent.consul("maint", "-disable")
    wait_for(lambda: consul_agent.maintenance_check() is None, timeout=5)
    assert before < during < _health_index(consul_agent)


def test_reset_agent_state_ends_maintenance(consul_agent: AgentBase) -> None:
    consul_agent.consul("maint", "-enable", "-reason", "left over")
    wait_for(consul_agent.maintenance_check, timeout=5)
    reset_agent_state(consul_agent)
    assert consul_agent.maintenance_check() is None


def test_failing_cli_command_says_why(consul_agent: AgentBase) -> None:
    with pytest.raises(ConsulCommandError, match="stderr: "):
        consul_agent.consul("maint", "-no-such-flag")
    proc = consul_agent.consul("maint", "-no-such-flag", check=False)
    assert proc.returncode != 0


def test_external_agent_wraps_a_running_agent(consul_agent: AgentBase) -> None:
    external = ExternalAgent(consul_agent.url, token=consul_agent.token)
    external.wait_ready(timeout=5)
    assert external.node_name == consul_agent.node_name
    assert external.http_addr == consul_agent.http_addr


# --------------------------------------------------------------------------
# private agents: lifecycle


def test_restart_keeps_the_ports_and_starts_the_index_over(
    make_dev_agent: MakeAgent,
) -> None:
    agent = make_dev_agent(node_name="ssc-restart")
    addr, pid = agent.http_addr, agent.pid
    for reason in ("a", "b", "c"):
        agent.consul("maint", "-enable", "-reason", reason)
        wait_for(agent.maintenance_check, timeout=5)
        agent.consul("maint", "-disable")
        wait_for(lambda: agent.maintenance_check() is None, timeout=5)
    before = _health_index(agent)

    agent.restart()

    assert agent.http_addr == addr
    assert agent.pid != pid
    assert agent.node_name == "ssc-restart"
    after = _health_index(agent)
    assert after < before, (before, after)
    assert agent.maintenance_check() is None


def test_stale_index_after_restart_blocks_until_wait_then_goes_back(
    make_dev_agent: MakeAgent,
) -> None:
    """What a watcher sees when Consul restarts under it: a blocking query with
    the old, higher index does not return early; it waits the whole ``wait``
    and then answers with a lower index (so the client must start over)."""
    agent = make_dev_agent()
    for _ in range(3):
        agent.consul("maint", "-enable")
        wait_for(agent.maintenance_check, timeout=5)
        agent.consul("maint", "-disable")
        wait_for(lambda: agent.maintenance_check() is None, timeout=5)
    stale = _health_index(agent)
    agent.restart()
    start = time.monotonic()
    resp = agent.request(
        "GET",
        f"/v1/health/node/{agent.node_name}",
        params={"index": str(stale), "wait": "1s"},
        timeout=10,
    )
    elapsed = time.monotonic() - start
    assert resp.status == 200
    assert resp.index is not None
    assert resp.index < stale
    assert elapsed > 0.8, elapsed


def test_maintenance_without_reason_gets_consuls_default_note(
    make_dev_agent: MakeAgent,
) -> None:
    agent = make_dev_agent()
    agent.consul("maint", "-enable")
    check = wait_for(agent.maintenance_check, timeout=5)
    assert check["Notes"].startswith("Maintenance mode is enabled for this node")


def test_pause_stops_answers_and_resume_brings_them_back(
    make_dev_agent: MakeAgent,
) -> None:
    agent = make_dev_agent()
    agent.pause()
    assert agent.paused
    with pytest.raises(OSError):  # a timeout: the kernel accepts, nobody answers
        agent.request("GET", "/v1/status/leader", timeout=0.3)
    agent.resume()
    assert wait_for(agent.leader, timeout=5, ignore=(OSError,))


def test_kill_refuses_connections_and_start_comes_back_on_the_same_port(
    make_dev_agent: MakeAgent,
) -> None:
    agent = make_dev_agent()
    addr = agent.http_addr
    agent.kill()
    assert not agent.running
    with pytest.raises(OSError):
        agent.request("GET", "/v1/status/leader", timeout=2)
    agent.start()
    assert agent.http_addr == addr
    assert agent.leader()


def test_stop_removes_everything(make_dev_agent: MakeAgent) -> None:
    agent = make_dev_agent()
    pid, log_path = agent.pid, agent.log_path
    assert pid is not None
    assert log_path is not None
    tmpdir = log_path.parent
    assert tmpdir.is_dir()
    agent.stop()
    assert not agent.running
    assert not tmpdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert agent.log_path is None
    assert "agent: Exit code" in agent.log_tail()  # the log tail is kept
    agent.stop()  # twice is fine


def test_paused_agent_still_stops(make_dev_agent: MakeAgent) -> None:
    agent = make_dev_agent()
    agent.pause()
    start = time.monotonic()
    agent.stop()
    assert not agent.running
    assert time.monotonic() - start < 10


def test_context_manager_and_other_loopback_address(consul_binary: str) -> None:
    with DevAgent(consul_binary, host="127.0.0.2", node_name="ssc-ctx") as agent:
        assert agent.http_addr.startswith("127.0.0.2:")
        me = agent.get_json("/v1/agent/self")
        assert me["Config"]["NodeName"] == "ssc-ctx"
        assert me["Member"]["Addr"] == "127.0.0.2"
        pid = agent.pid
    assert pid is not None
    assert not agent.running


def test_extra_config_can_turn_on_acls(make_dev_agent: MakeAgent) -> None:
    hcl = """
    acl {
      enabled = true
      default_policy = "deny"
      tokens { master = "ssc-root-token" }
    }
    """
    agent = make_dev_agent(extra_config=hcl, token="ssc-root-token")
    assert agent.request("GET", "/v1/agent/self").status == 200
    anonymous = ExternalAgent(agent.http_addr)
    assert anonymous.request("GET", "/v1/agent/self").status == 403
    agent.consul("maint", "-enable", "-reason", "with acl")
    check = wait_for(agent.maintenance_check, timeout=5)
    assert check["Notes"] == "with acl"


def test_extra_config_as_a_mapping(make_dev_agent: MakeAgent) -> None:
    agent = make_dev_agent(extra_config={"node_meta": {"purpose": "ssc-test"}})
    me = agent.get_json("/v1/agent/self")
    assert me["Meta"]["purpose"] == "ssc-test"


def test_bad_config_fails_fast_with_the_log(consul_binary: str) -> None:
    agent = DevAgent(consul_binary, extra_config="this is { not valid")
    start = time.monotonic()
    with pytest.raises(ConsulUnavailable, match="consul log") as info:
        agent.start()
    assert time.monotonic() - start < 10
    assert "exited" in str(info.value)
    assert not agent.running
    assert agent.log_path is None


# --------------------------------------------------------------------------
# the command line


def test_cli_binary_prints_an_executable(consul_binary: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.consul_agent", "binary", "--no-fetch"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CONSUL_BINARY": consul_binary},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == consul_binary


def test_cli_agent_runs_until_sigterm(consul_binary: str) -> None:
    env = {**os.environ, "CONSUL_BINARY": consul_binary}
    env.pop("CONSUL_HTTP_ADDR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.consul_agent", "agent", "--node", "ssc-cli"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "the CLI printed nothing in 30s"
        addr = proc.stdout.readline().strip()  # a line, or "" if the CLI exited
        assert re.fullmatch(r"127\.0\.0\.1:\d+", addr), proc.stderr
        agent = ExternalAgent(addr)
        assert agent.node_name == "ssc-cli"
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        with pytest.raises(OSError):
            agent.request("GET", "/v1/status/leader", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --------------------------------------------------------------------------
# the conftest's rules, checked in a separate pytest run

_PROBE_TESTS = """
    import pytest

    def test_with_agent(consul_agent):
        assert consul_agent.node_name

    def test_without_agent():
        pass
"""


def _run_probe(
    tmp_path: Path, env: dict[str, str], *args: str, tests: str = _PROBE_TESTS
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(tests))
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONSUL_", "PYTEST_")) and k not in ("CI", "SSC_NO_FETCH")
    }
    clean["PYTHONPATH"] = str(REPO_ROOT)
    clean.update(env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-rA",
            "test_probe.py",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
    )


def _summary(output: str) -> str:
    lines = [
        line
        for line in output.splitlines()
        if line.startswith("integration tests against real Consul:")
    ]
    assert len(lines) == 1, output
    return lines[0]


def test_without_consul_integration_tests_skip(tmp_path: Path) -> None:
    proc = _run_probe(tmp_path, {"CONSUL_BINARY": str(tmp_path / "missing")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert _summary(out).endswith(": 0 passed, 1 skipped"), out
    assert "is not an executable file" in out


def test_without_consul_ci_fails(tmp_path: Path) -> None:
    proc = _run_probe(
        tmp_path, {"CONSUL_BINARY": str(tmp_path / "missing"), "CI": "true"}
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert _summary(out).endswith(": 0 passed, 0 skipped, 1 failed"), out
    assert "failing instead of skipping" in out


def test_the_package_must_come_from_where_it_is_expected(tmp_path: Path) -> None:
    elsewhere = _run_probe(
        tmp_path, {"SSC_EXPECT_PACKAGE_IN": str(tmp_path)}, "-m", "not integration"
    )
    assert elsewhere.returncode == pytest.ExitCode.USAGE_ERROR, elsewhere.stdout
    assert "not from under SSC_EXPECT_PACKAGE_IN" in elsewhere.stderr

    here = Path(sprockets_status_consul.__file__).resolve().parent.parent
    found = _run_probe(
        tmp_path, {"SSC_EXPECT_PACKAGE_IN": str(here)}, "-m", "not integration"
    )
    assert found.returncode == 0, found.stdout + found.stderr
    assert f"sprockets_status_consul: {here}" in found.stdout


def test_ci_passes_with_a_real_agent(tmp_path: Path, consul_binary: str) -> None:
    proc = _run_probe(tmp_path, {"CONSUL_BINARY": consul_binary, "CI": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert _summary(out).endswith(": 1 passed, 0 skipped"), out


def test_ci_fails_when_an_integration_test_skips(
    tmp_path: Path, consul_binary: str
) -> None:
    tests = textwrap.dedent(_PROBE_TESTS) + textwrap.dedent("""
        def test_skips_itself(consul_agent):
            pytest.skip("not today")
    """)
    env = {"CONSUL_BINARY": consul_binary}
    local = _run_probe(tmp_path, env, tests=tests)
    assert local.returncode == 0, local.stdout
    assert _summary(local.stdout).endswith(": 1 passed, 1 skipped")

    ci = _run_probe(tmp_path, {**env, "CI": "true"}, tests=tests)
    assert ci.returncode == 1, ci.stdout
    assert _summary(ci.stdout).endswith(": 1 passed, 1 skipped")
    assert "failing the run because 1 integration test(s) skipped" in ci.stdout


def test_ci_does_not_enforce_when_integration_tests_are_deselected(
    tmp_path: Path,
) -> None:
    proc = _run_probe(
        tmp_path,
        {"CONSUL_BINARY": str(tmp_path / "missing"), "CI": "true"},
        "-m",
        "not integration",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert _summary(out).endswith(": 0 passed, 0 skipped"), out
    assert "1 deselected" in out
