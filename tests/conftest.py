"""Shared fixtures: a real Consul agent for the integration tests.

Where the agent comes from (fixture ``consul_agent``, one per session):

1. ``$CONSUL_HTTP_ADDR`` set: that agent (``$CONSUL_HTTP_TOKEN`` is used if
   set). Careful: the tests put its node in and out of maintenance mode.
2. Otherwise ``consul agent -dev`` on loopback with free ports, using
   ``$CONSUL_BINARY``, ``consul`` on ``$PATH``, the cache, or Consul 1.8.7
   downloaded into the cache by ``scripts/get-consul`` (``SSC_NO_FETCH=1``
   turns the download off).

If no agent can be had the tests that need one are skipped, but when ``$CI``
is set (to anything non-empty) they fail instead. Every test that uses
``consul_agent`` or ``consul_binary`` (directly or through other fixtures) gets
the ``integration`` marker, so ``-m "not integration"`` runs the rest, and the
run ends with a line ``integration tests against real Consul: N passed, M
skipped``. In CI a run that selected integration tests (or the full run) fails
when any of them was skipped or none passed.

Docker (``docker_engine``, see ``tests/docker_agent.py``): tests that use it
get the ``docker`` marker and the run ends with a line ``docker tests: N
passed, M skipped``. Without a Docker engine they are skipped; with one but
without the images they fail in CI (``scripts/docker-images`` builds them).
``SSC_AGENT=docker`` makes ``consul_agent`` a :class:`DockerAgent` (an agent
in a container), and the tests that use it docker tests too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

import sprockets_status_consul
from tests.consul_agent import (
    AgentBase,
    ConsulUnavailable,
    DevAgent,
    ExternalAgent,
    fetch_consul,
    find_consul,
    reset_agent_state,
)
from tests.docker_agent import DockerAgent, engine_problem, images_problem

INTEGRATION_FIXTURES = frozenset({"consul_agent", "consul_binary"})
SUMMARY_PREFIX = "integration tests against real Consul:"
DOCKER_SUMMARY_PREFIX = "docker tests:"


def _docker_fixtures() -> frozenset[str]:
    if os.environ.get("SSC_AGENT") == "docker":
        return frozenset({"docker_engine", "consul_agent"})
    return frozenset({"docker_engine"})


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _unavailable(reason: str) -> NoReturn:
    """Skip, or in CI fail, a test that needs a Consul agent it cannot have."""
    if _in_ci():
        pytest.fail(f"{reason} [CI is set: failing instead of skipping]", pytrace=False)
    pytest.skip(reason)


def _docker_hint() -> str:
    docker = shutil.which("docker")
    if docker is None:
        return ""
    try:
        ok = (
            subprocess.run(
                [docker, "info"],
                capture_output=True,
                timeout=15,
                stdin=subprocess.DEVNULL,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return ""
    return (
        "; Docker is available: `docker compose up -d consul` and "
        "CONSUL_HTTP_ADDR=127.0.0.1:8500 run the tests against Consul there"
    )


_binary_cache: list[tuple[str | None, str]] = []


def _consul_binary() -> tuple[str | None, str]:
    """(path, "") or (None, why not); computed once per session."""
    if not _binary_cache:
        try:
            binary = find_consul()
            if binary is None and os.environ.get("SSC_NO_FETCH"):
                result: tuple[str | None, str] = (
                    None,
                    "no consul binary (CONSUL_BINARY, PATH, cache) and "
                    "SSC_NO_FETCH is set",
                )
            else:
                result = (binary or fetch_consul(), "")
        except ConsulUnavailable as exc:
            result = (None, f"no consul binary: {exc}")
        if result[0] is None:
            result = (None, result[1] + _docker_hint())
        _binary_cache.append(result)
    return _binary_cache[0]


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def consul_binary() -> str:
    """Path of a consul binary (found, or downloaded into the cache)."""
    binary, reason = _consul_binary()
    if binary is None:
        _unavailable(reason)
    return binary


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine with the images docker-compose.yml uses; else a skip
    (no engine), or a skip that fails in CI (no images)."""
    problem = engine_problem()
    if problem is not None:
        pytest.skip(f"no Docker engine: {problem}")
    problem = images_problem()
    if problem is not None:
        _unavailable(problem)


@pytest.fixture(scope="session")
def consul_agent(request: pytest.FixtureRequest) -> Iterator[AgentBase]:
    """A running Consul agent, shared by the whole session.

    Offers ``http_addr`` ("127.0.0.1:PORT"), ``url`` ("http://..."),
    ``node_name``, ``token``, ``consul(*args, check=True)`` (the CLI against
    this agent), ``request()``/``get_json()`` (the HTTP API),
    ``node_checks()`` and ``maintenance_check()``. It is a :class:`DevAgent`
    unless ``$CONSUL_HTTP_ADDR`` is set (:class:`ExternalAgent`) or
    ``$SSC_AGENT`` is ``docker`` (:class:`DockerAgent`). After each test that
    uses it, node and service maintenance are switched off again.
    """
    if os.environ.get("SSC_AGENT") == "docker":
        request.getfixturevalue("docker_engine")
        with DockerAgent() as in_docker:
            yield in_docker
        return
    addr = os.environ.get("CONSUL_HTTP_ADDR")
    if addr:
        external = ExternalAgent(addr, token=os.environ.get("CONSUL_HTTP_TOKEN"))
        try:
            external.wait_ready(timeout=10.0)
            node_name = external.node_name
        except (AssertionError, OSError, KeyError, TypeError, ValueError) as exc:
            _unavailable(f"CONSUL_HTTP_ADDR={addr}: {exc}")
        if not node_name:
            _unavailable(f"CONSUL_HTTP_ADDR={addr}: /v1/agent/self has no NodeName")
        yield external
        return
    binary, reason = _consul_binary()
    if binary is None:
        _unavailable(reason)
    agent = DevAgent(binary)
    try:
        agent.start()
    except ConsulUnavailable as exc:
        _unavailable(f"consul agent -dev did not start: {exc}")
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def clean_consul(consul_agent: AgentBase) -> Iterator[AgentBase]:
    """``consul_agent``, put back in order after the test.

    Applied automatically to every test that uses ``consul_agent``: afterwards
    node (and local service) maintenance is disabled and the catalog is
    waited on until it no longer shows the node maintenance check. A shared
    dev agent that a test paused is resumed, one it stopped is started again.
    """
    yield consul_agent
    if isinstance(consul_agent, DevAgent):
        if consul_agent.paused:
            consul_agent.resume()
        if not consul_agent.running:
            consul_agent.stop()
            consul_agent.start()
    reset_agent_state(consul_agent)


@pytest.fixture(autouse=True)
def _consul_hygiene(request: pytest.FixtureRequest) -> None:
    if "consul_agent" in request.fixturenames:
        request.getfixturevalue("clean_consul")


@pytest.fixture
def make_dev_agent(consul_binary: str) -> Iterator[Callable[..., DevAgent]]:
    """A factory for private dev agents: ``make_dev_agent(**DevAgent kwargs)``.

    Each agent is started before it is returned and stopped after the test.
    For tests that stop, kill, pause or restart an agent, or need special
    configuration (``extra_config=...``, ``token=...``).
    """
    agents: list[DevAgent] = []

    def make(**kwargs: Any) -> DevAgent:
        agent = DevAgent(consul_binary, **kwargs)
        agents.append(agent)
        return agent.start()

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()


# --------------------------------------------------------------------------
# the integration marker and the closing summary


@dataclasses.dataclass
class _Stats:
    selected: set[str] = dataclasses.field(default_factory=set)
    docker: set[str] = dataclasses.field(default_factory=set)
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    full_run: bool = False
    ci_failure: str = ""

    def count(self, outcome: str, among: set[str] | None = None) -> int:
        selected = self.selected if among is None else among
        return sum(
            1
            for nodeid, value in self.outcomes.items()
            if value == outcome and nodeid in selected
        )


_STATS = _Stats()
_RANK = {"passed": 0, "xfailed": 1, "skipped": 2, "failed": 3}


def pytest_configure(config: pytest.Config) -> None:
    global _STATS
    _STATS = _Stats()
    declared = config.getini("markers")
    if not any(str(line).startswith("integration:") for line in declared):
        config.addinivalue_line(
            "markers",
            "integration: needs a real Consul agent (the consul_agent fixture)",
        )
    if not any(str(line).startswith("docker:") for line in declared):
        config.addinivalue_line(
            "markers", "docker: needs a Docker engine (the docker_engine fixture)"
        )
    _check_package_location()


# --------------------------------------------------------------------------
# which sprockets_status_consul is under test

PACKAGE_DIR = Path(sprockets_status_consul.__file__).resolve().parent


def _check_package_location() -> None:
    """With ``$SSC_EXPECT_PACKAGE_IN`` set (to e.g. a virtualenv's
    site-packages), refuse to run unless the package comes from there: a
    test of the installed wheel must not test the checkout instead."""
    expected = os.environ.get("SSC_EXPECT_PACKAGE_IN")
    if expected and not PACKAGE_DIR.is_relative_to(Path(expected).resolve()):
        raise pytest.UsageError(
            f"sprockets_status_consul is imported from {PACKAGE_DIR}, "
            f"not from under SSC_EXPECT_PACKAGE_IN={expected}"
        )


def pytest_report_header() -> str:
    return f"sprockets_status_consul: {PACKAGE_DIR}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    docker_fixtures = _docker_fixtures()
    for item in items:
        names = getattr(item, "fixturenames", ())
        if INTEGRATION_FIXTURES.intersection(names) and (
            item.get_closest_marker("integration") is None
        ):
            item.add_marker(pytest.mark.integration)
        if docker_fixtures.intersection(names) and (
            item.get_closest_marker("docker") is None
        ):
            item.add_marker(pytest.mark.docker)


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    _STATS.selected = {
        item.nodeid
        for item in session.items
        if item.get_closest_marker("integration") is not None
    }
    _STATS.docker = {
        item.nodeid
        for item in session.items
        if item.get_closest_marker("docker") is not None
    }
    # pytest >= 7.2 says whether the paths came from `testpaths` (no args)
    sources = getattr(pytest.Config, "ArgsSource", None)
    _STATS.full_run = (
        sources is not None
        and getattr(config, "args_source", None) == sources.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        outcome = "failed"
    elif report.skipped:
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    previous = _STATS.outcomes.get(report.nodeid)
    if previous is None or _RANK[outcome] > _RANK[previous]:
        _STATS.outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stats = _STATS
    if not _in_ci() or session.config.option.collectonly:
        return
    if not stats.selected and not stats.full_run:
        return  # a run narrowed to tests that need no agent
    problems = []
    if not stats.selected:
        problems.append("the full run collected no integration tests")
    skipped = stats.count("skipped")
    if skipped:
        problems.append(f"{skipped} integration test(s) skipped")
    if stats.selected and not stats.count("passed"):
        problems.append("no integration test passed")
    if problems:
        stats.ci_failure = "; ".join(problems)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    stats = _STATS
    line = (
        f"{SUMMARY_PREFIX} {stats.count('passed')} passed, "
        f"{stats.count('skipped')} skipped"
    )
    failed = stats.count("failed")
    if failed:
        line += f", {failed} failed"
    xfailed = stats.count("xfailed")
    if xfailed:
        line += f", {xfailed} xfailed"
    not_run = len(stats.selected) - len(stats.selected & stats.outcomes.keys())
    if not_run:
        line += f", {not_run} not run"
    terminalreporter.write_line(line)
    if stats.docker:
        docker_line = (
            f"{DOCKER_SUMMARY_PREFIX} {stats.count('passed', stats.docker)} passed, "
            f"{stats.count('skipped', stats.docker)} skipped"
        )
        failed = stats.count("failed", stats.docker)
        if failed:
            docker_line += f", {failed} failed"
        terminalreporter.write_line(docker_line)
    if stats.ci_failure:
        terminalreporter.write_line(
            f"CI is set: failing the run because {stats.ci_failure}", red=True
        )
