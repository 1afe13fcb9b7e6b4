"""pytest fixtures for integration tests against a real Consul dev agent.

Installed with the package as a pytest plugin (the ``pytest11`` entry point),
so the fixtures are there without a ``conftest.py``; they do nothing until a
test asks for them:

``consul_dev_agent``
    A running :class:`~sprockets_status_consul.dev_agent.ConsulDevAgent`,
    one per session, stopped at its end. Node maintenance is shared too: a
    test that turns it on turns it off again.
``consul_binary``
    The consul executable the agent runs: ``$CONSUL_BINARY``, else ``consul``
    on ``$PATH``; when neither is there, the tests that need it are skipped
    with the reason, and when ``$CONSUL_BINARY`` is set but not an executable
    file, they fail with the reason. Override this fixture to supply the
    binary another way.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .dev_agent import ConsulAgentError, ConsulDevAgent, find_consul_binary


@pytest.fixture(scope="session")
def consul_binary() -> str:
    """The consul executable; skips the test when none is configured.

    A ``$CONSUL_BINARY`` that cannot be run fails the test: it was asked for.
    """
    try:
        binary = find_consul_binary()
    except ConsulAgentError as exc:
        pytest.fail(f"unusable consul binary: {exc}", pytrace=False)
    if binary is None:
        pytest.skip("no consul binary: set CONSUL_BINARY or put consul on PATH")
    return binary


@pytest.fixture(scope="session")
def consul_dev_agent(consul_binary: str) -> Iterator[ConsulDevAgent]:
    """A ``consul agent -dev`` on free loopback ports for the whole session."""
    with ConsulDevAgent(consul_binary) as agent:
        yield agent
