"""ACL tokens, TLS to Consul, and requests the endpoint does not serve.

* ACL: a real agent with ACLs on and the default policy deny. A token with
  ``node_prefix "" { policy = "read" }`` given by setting, ``token_file``,
  ``CONSUL_HTTP_TOKEN`` or ``CONSUL_HTTP_TOKEN_FILE`` works; no token or a
  bad one gives one clear log line (403, permission denied, ACL not found)
  and the failure policy; no token ever shows in a body, a header or a log
  line, not even in part.
* TLS: an agent serving HTTPS with a CA made here by ``openssl``.
  ``ca_file``/``CONSUL_CACERT`` works; a wrong CA or none fails with a clear
  message and is never silently unverified; ``verify: false``
  (``CONSUL_HTTP_SSL_VERIFY``) is the one explicit way out; a client
  certificate (``CONSUL_CLIENT_CERT``/``CONSUL_CLIENT_KEY``) is presented to
  an agent that requires one.
* Other methods, odd ``Accept`` headers, long query strings and huge headers
  get a 4xx or the normal answer, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado import httpclient, web

import sprockets_status_consul as ssc
from sprockets_status_consul import watcher as watcher_module

from .consul_agent import AgentBase, DevAgent, free_port
from .fault_proxy import FaultProxy, Mode
from .fault_support import (
    FAST,
    Pki,
    answers,
    backends,
    check_status_body,
    make_pki,
    set_maintenance,
    status_clients,
    wait_all,
)

Record = Callable[[str, Any], None]

QUICK = {**FAST, "retry_max": 0.2}
"""Fast settings with quick retries, so that failures repeat within a second."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``CONSUL_*`` variable from the outside; the test sets its own."""
    for name in list(os.environ):
        if name.startswith("CONSUL_"):
            monkeypatch.delenv(name)
    return monkeypatch


# --------------------------------------------------------------------------
# an in-process application


@dataclasses.dataclass
class App:
    """An in-process application serving ConsulStatusHandler, and what it said."""

    app: web.Application
    url: str
    client: httpclient.AsyncHTTPClient
    seen: list[str] = dataclasses.field(default_factory=list)
    """Every answer's headers and body, for the token scan."""

    async def status(self, accept: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Accept": accept} if accept else {}
        response = await self.client.fetch(
            self.url, headers=headers, raise_error=False, request_timeout=5
        )
        raw = response.body
        self.seen.append(
            f"{dict(response.headers)!r}\n{raw.decode('utf-8', 'replace')}"
        )
        if accept and "health+json" in accept:
            return response.code, json.loads(raw)
        return response.code, check_status_body(response.code, raw, self.url)

    async def until(
        self,
        predicate: Callable[[int, dict[str, Any]], bool],
        timeout: float,
        what: str,
    ) -> float:
        """Poll until ``predicate`` holds for an answer; seconds it took."""
        started = time.monotonic()
        while True:
            code, body = await self.status()
            if predicate(code, body):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, (
                f"timed out after {timeout} s waiting for {what}: {code} {body}"
            )
            await asyncio.sleep(0.01)

    async def poll(self, seconds: float) -> list[tuple[int, dict[str, Any]]]:
        """Every answer for ``seconds``, plain and health+json alternately."""
        replies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            replies.append(await self.status())
            await self.status("application/health+json")
            await asyncio.sleep(0.005)
        return replies


@contextlib.asynccontextmanager
async def serving(settings: dict[str, Any]) -> AsyncIterator[App]:
    application = web.Application(
        [(r"/status", ssc.ConsulStatusHandler)], consul_status=settings
    )
    ssc.watch(application)
    port = free_port()
    server = application.listen(port, address="127.0.0.1")
    client = httpclient.AsyncHTTPClient(force_instance=True)
    try:
        yield App(application, f"http://127.0.0.1:{port}/status", client)
    finally:
        client.close()
        server.stop()
        await ssc.stop(application)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def library_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("sprockets_status_consul")
        and record.levelno >= logging.WARNING
    ]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record, formatted with its arguments and traceback."""
    handler = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(handler.format(record) for record in caplog.records)


def secret_pieces(token: str) -> list[str]:
    """The token, and each of its parts long enough to give it away."""
    return [token, *(part for part in token.split("-") if len(part) >= 8)]


def assert_no_secret(texts: Iterable[str], secrets: Iterable[str], where: str) -> None:
    pieces = [piece for secret in secrets for piece in secret_pieces(secret)]
    for text in texts:
        for piece in pieces:
            assert piece not in text, (
                f"{where}: {piece[:4]}... of a token appears in: "
                f"{text[max(0, text.find(piece) - 200) : text.find(piece)]!r}"
            )


# --------------------------------------------------------------------------
# ACL


@dataclasses.dataclass
class AclAgent:
    agent: DevAgent
    master: str
    node_read: str
    """A token whose policy is ``node_prefix "" { policy = "read" }``."""
    node_and_agent_read: str
    """The same, plus ``agent_prefix "" { policy = "read" }``."""
    unknown: str
    """A well-formed token the agent does not know."""

    @property
    def secrets(self) -> list[str]:
        return [self.master, self.node_read, self.node_and_agent_read, self.unknown]


def _create_token(agent: DevAgent, name: str, rules: str) -> str:
    policy = agent.request("PUT", "/v1/acl/policy", body={"Name": name, "Rules": rules})
    assert policy.status == 200, policy
    token = agent.request(
        "PUT",
        "/v1/acl/token",
        body={"Description": name, "Policies": [{"Name": name}]},
    )
    assert token.status == 200, token
    secret = token.json()["SecretID"]
    assert isinstance(secret, str)
    return secret


@pytest.fixture(scope="module")
def acl(consul_binary: str) -> Iterator[AclAgent]:
    """A dev agent with ACLs enabled, default policy deny, and tokens."""
    master = str(uuid.uuid4())
    agent = DevAgent(
        consul_binary,
        token=master,
        extra_config={
            "primary_datacenter": "dc1",
            "acl": {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "tokens": {"master": master, "agent": master},
            },
        },
    )
    try:
        agent.start()
        node_read = _create_token(
            agent, "status-node-read", 'node_prefix "" { policy = "read" }'
        )
        both = _create_token(
            agent,
            "status-node-agent-read",
            'node_prefix "" { policy = "read" }\nagent_prefix "" { policy = "read" }',
        )
        yield AclAgent(agent, master, node_read, both, str(uuid.uuid4()))
    finally:
        agent.stop()


async def follows_maintenance(acl: AclAgent, app: App, reason: str) -> None:
    """Connected, then maintenance enabled on the agent reaches the app."""
    await app.until(answers(200, "connected"), 5, "connected with the token")
    await asyncio.to_thread(set_maintenance, acl.agent, True, reason)
    try:
        await app.until(answers(503, "connected", reason), 5, "maintenance seen")
        _, health = await app.status("application/health+json")
        assert health["status"] == "fail", health
    finally:
        await asyncio.to_thread(set_maintenance, acl.agent, False)
    await app.until(answers(200, "connected"), 5, "maintenance off again")


@pytest.mark.parametrize(
    "how",
    ["setting", "setting token_file", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"],
)
def test_a_node_read_token_works(
    acl: AclAgent,
    how: str,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(f"{acl.node_read}\n")
    settings: dict[str, Any] = {
        **FAST,
        "address": acl.agent.http_addr,
        "node": acl.agent.node_name,
    }
    if how == "setting":
        settings["token"] = acl.node_read
    elif how == "setting token_file":
        settings["token_file"] = str(token_file)
    elif how == "CONSUL_HTTP_TOKEN":
        clean_env.setenv("CONSUL_HTTP_TOKEN", acl.node_read)
    else:
        clean_env.setenv("CONSUL_HTTP_TOKEN_FILE", str(token_file))

    async def scenario() -> None:
        async with serving(settings) as app:
            await follows_maintenance(acl, app, f"token by {how}")
            assert_no_secret(app.seen, acl.secrets, f"bodies ({how})")
            assert acl.node_read not in repr(watcher_module.watch(app.app).settings)

    run(scenario)
    assert library_warnings(caplog) == []
    assert_no_secret([everything_logged(caplog)], acl.secrets, f"logs ({how})")


def test_a_token_with_agent_read_finds_the_agents_node(
    acl: AclAgent, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clean_env.setenv("CONSUL_HTTP_TOKEN", acl.node_and_agent_read)

    async def scenario() -> None:
        async with serving({**FAST, "address": acl.agent.http_addr}) as app:
            await follows_maintenance(acl, app, "found the node")
            assert watcher_module.watch(app.app).node == acl.agent.node_name
            assert_no_secret(app.seen, acl.secrets, "bodies")

    run(scenario)
    assert library_warnings(caplog) == []
    assert_no_secret([everything_logged(caplog)], acl.secrets, "logs")


def test_the_documented_node_read_token_without_a_node_setting(
    acl: AclAgent, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """README: the token "needs node:read", and ``node`` defaults to the
    agent's node. Finding that node asks ``/v1/agent/self``, which needs
    ``agent:read``. Either the documented token works, or the one warning
    says what is missing (``agent:read``, or the ``node`` setting)."""
    caplog.set_level(logging.DEBUG)
    clean_env.setenv("CONSUL_HTTP_TOKEN", acl.node_read)
    states: list[str] = []

    async def scenario() -> None:
        async with serving({**QUICK, "address": acl.agent.http_addr}) as app:
            with contextlib.suppress(AssertionError):
                await app.until(answers(200, "connected"), 2, "connected")
            states.append((await app.status())[1]["consul"])

    run(scenario)
    assert_no_secret([everything_logged(caplog)], acl.secrets, "logs")
    if states != ["connected"]:
        warnings = library_warnings(caplog)
        assert len(warnings) == 1, warnings
        assert "agent:read" in warnings[0], warnings


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
@pytest.mark.parametrize(
    ("token", "node", "expected"),
    [
        ("none", False, ("403", "permission denied")),
        ("unknown", False, ("403", "ACL not found")),
        ("unknown", True, ("403", "ACL not found")),
    ],
    ids=["no-token", "unknown-token", "unknown-token-node-set"],
)
def test_no_token_or_a_bad_one_is_named_in_one_log_line(
    acl: AclAgent,
    token: str,
    node: bool,
    expected: tuple[str, str],
    failure_mode: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    if token == "unknown":
        clean_env.setenv("CONSUL_HTTP_TOKEN", acl.unknown)
    settings: dict[str, Any] = {
        **QUICK,
        "address": acl.agent.http_addr,
        "failure_mode": failure_mode,
    }
    if node:
        settings["node"] = acl.agent.node_name
    retries = count_retries(monkeypatch)

    async def scenario() -> None:
        async with serving(settings) as app:
            await until_true(lambda: len(retries) >= 4, 5, "four retries")
            replies = await app.poll(0.3)
            assert_no_secret(app.seen, acl.secrets, "bodies")
        for code, body in replies:
            assert body["consul"] == "stale", body
            if failure_mode == "open":
                assert (code, body["status"]) == (200, "ok"), body
            else:
                assert (code, body["source"]) == (503, "consul"), body
                assert expected[0] in body["reason"], body

    run(scenario)
    warnings = library_warnings(caplog)
    assert len(warnings) == 1, warnings
    for word in expected:
        assert word.lower() in warnings[0].lower(), warnings
    policy = "older than the TTL" if failure_mode == "closed" else "last known status"
    assert policy in warnings[0], warnings
    assert_no_secret([everything_logged(caplog)], acl.secrets, "logs")


def test_no_token_with_a_node_setting_names_the_acl(
    acl: AclAgent, clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a token Consul 1.8 does not refuse ``/v1/health/node/N``: it
    filters it to ``[]``. The log line must still point at the ACL token, not
    only say that Consul knows no such node."""
    caplog.set_level(logging.DEBUG)
    settings = {**QUICK, "address": acl.agent.http_addr, "node": acl.agent.node_name}

    async def scenario() -> None:
        async with serving(settings) as app:
            await app.until(answers(200, "stale"), 5, "stale without a token")

    run(scenario)
    warnings = library_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "token" in warnings[0].lower() or "acl" in warnings[0].lower(), warnings


@pytest.mark.parametrize("pad", [0, 185], ids=["whole", "across-the-cut"])
def test_a_token_echoed_by_the_agent_is_never_logged(
    acl: AclAgent,
    pad: int,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 403 whose body quotes the token (a careless gateway in front of the
    agent): the log line and the fail-closed reason must not carry it, whole or
    in part, wherever in the answer it is."""
    caplog.set_level(logging.DEBUG)
    with FaultProxy(
        (acl.agent.host, acl.agent.http_port), mode=Mode.ECHO_TOKEN, echo_pad=pad
    ) as proxy:
        settings = {
            **QUICK,
            "address": proxy.address,
            "token": acl.node_read,
            "node": acl.agent.node_name,
            "failure_mode": "closed",
        }

        async def scenario() -> None:
            async with serving(settings) as app:
                await app.until(answers(503, "stale"), 5, "fail-closed maintenance")
                await app.poll(0.1)
                assert_no_secret(app.seen, acl.secrets, "bodies")

        run(scenario)
        assert proxy.requests(), "the proxy was not asked"
    warnings = library_warnings(caplog)
    assert warnings and "403" in warnings[0], warnings
    assert_no_secret([everything_logged(caplog)], acl.secrets, "logs")


def test_backends_never_show_the_token(acl: AclAgent) -> None:
    """Backend processes given good and bad tokens by the environment: every
    body (plain and health+json) and every line they log is free of them."""
    good = {"CONSUL_HTTP_TOKEN": acl.node_read}
    bad = {"CONSUL_HTTP_TOKEN": acl.unknown}
    node = {**QUICK, "node": acl.agent.node_name}
    seen: list[str] = []
    logs: list[str] = []
    with contextlib.ExitStack() as stack:
        good_ones = stack.enter_context(backends(acl.agent.http_addr, [node], env=good))
        bad_ones = stack.enter_context(
            backends(
                acl.agent.http_addr,
                [QUICK, {**node, "failure_mode": "closed"}],
                env=bad,
            )
        )
        clients = stack.enter_context(
            status_clients(b.port for b in good_ones + bad_ones)
        )
        wait_all(clients[:1], answers(200, "connected"), 5, "good token connected")
        set_maintenance(acl.agent, True, "scan")
        try:
            wait_all(clients[:1], answers(503, "connected", "scan"), 5, "maintenance")
            wait_all(
                clients[1:],
                lambda _, body: body["consul"] == "stale",
                5,
                "bad token stale",
            )
            for client in clients:
                for accept in ("*/*", "application/health+json"):
                    reply = client.request(headers={"Accept": accept})
                    seen.append(f"{reply.headers!r}\n{reply.raw.decode()}")
        finally:
            set_maintenance(acl.agent, False)
        logs = [b.log() for b in good_ones + bad_ones]
    assert_no_secret(seen, acl.secrets, "backend bodies")
    assert_no_secret(logs, acl.secrets, "backend logs")
    assert any("ACL not found" in log for log in logs), logs


# --------------------------------------------------------------------------
# TLS


@dataclasses.dataclass
class TlsAgents:
    pki: Pki
    plain: DevAgent
    """HTTPS without client certificates."""
    plain_https: int
    mutual: DevAgent
    """HTTPS that requires a client certificate (``verify_incoming_https``)."""
    mutual_https: int


@pytest.fixture(scope="module")
def tls(
    consul_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsAgents]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    agents: list[DevAgent] = []
    try:
        ports = []
        for mutual in (False, True):
            https = free_port()
            agent = DevAgent(
                consul_binary,
                ports={"https": https},
                extra_config={
                    "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key),
                    "ca_file": str(pki.ca),
                    "verify_incoming": False,
                    "verify_incoming_https": mutual,
                    "verify_outgoing": False,
                },
            )
            agents.append(agent)
            agent.start()
            ports.append(https)
        yield TlsAgents(pki, agents[0], ports[0], agents[1], ports[1])
    finally:
        for agent in agents:
            agent.stop()


def _tls_case(
    tls: TlsAgents, case: str, env: pytest.MonkeyPatch
) -> tuple[DevAgent, dict[str, Any]]:
    """The agent and settings of a TLS case; environment variables set on ``env``."""
    pki = tls.pki
    url = f"https://127.0.0.1:{tls.plain_https}"
    if case == "ca_file":
        return tls.plain, {"address": url, "ca_file": str(pki.ca)}
    if case == "CONSUL_CACERT":
        env.setenv("CONSUL_HTTP_ADDR", f"127.0.0.1:{tls.plain_https}")
        env.setenv("CONSUL_HTTP_SSL", "true")
        env.setenv("CONSUL_CACERT", str(pki.ca))
        return tls.plain, {}
    if case == "localhost":
        return tls.plain, {
            "address": f"https://localhost:{tls.plain_https}",
            "ca_file": str(pki.ca),
        }
    if case == "CONSUL_HTTP_SSL_VERIFY=false":
        env.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
        return tls.plain, {"address": url}
    if case == "client cert settings":
        return tls.mutual, {
            "address": f"https://127.0.0.1:{tls.mutual_https}",
            "ca_file": str(pki.ca),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
        }
    if case == "CONSUL_CLIENT_CERT":
        env.setenv("CONSUL_HTTP_ADDR", f"https://127.0.0.1:{tls.mutual_https}")
        env.setenv("CONSUL_CACERT", str(pki.ca))
        env.setenv("CONSUL_CLIENT_CERT", str(pki.client_cert))
        env.setenv("CONSUL_CLIENT_KEY", str(pki.client_key))
        return tls.mutual, {}
    if case == "wrong CA":
        return tls.plain, {"address": url, "ca_file": str(pki.other_ca)}
    if case == "wrong CA by CONSUL_CACERT":
        env.setenv("CONSUL_CACERT", str(pki.other_ca))
        return tls.plain, {"address": url}
    if case == "system CAs":
        return tls.plain, {"address": url}
    if case == "no client cert":
        return tls.mutual, {
            "address": f"https://127.0.0.1:{tls.mutual_https}",
            "ca_file": str(pki.ca),
        }
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "ca_file",
        "CONSUL_CACERT",
        "localhost",
        "CONSUL_HTTP_SSL_VERIFY=false",
        "client cert settings",
        "CONSUL_CLIENT_CERT",
    ],
)
def test_tls_that_works(
    tls: TlsAgents,
    case: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    agent, settings = _tls_case(tls, case, clean_env)
    settings = {**FAST, **settings}

    async def scenario() -> None:
        async with serving(settings) as app:
            watcher = watcher_module.watch(app.app)
            assert watcher.settings.scheme == "https"
            await app.until(answers(200, "connected"), 5, f"connected by {case}")
            await asyncio.to_thread(set_maintenance, agent, True, f"over {case}")
            try:
                await app.until(answers(503, "connected", f"over {case}"), 5, "maint")
            finally:
                await asyncio.to_thread(set_maintenance, agent, False)

    run(scenario)
    assert library_warnings(caplog) == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong CA", "CERTIFICATE_VERIFY_FAILED"),
        ("wrong CA by CONSUL_CACERT", "CERTIFICATE_VERIFY_FAILED"),
        ("system CAs", "CERTIFICATE_VERIFY_FAILED"),
        ("no client cert", "CERTIFICATE"),
    ],
)
def test_tls_that_fails_says_so_and_never_goes_unverified(
    tls: TlsAgents,
    case: str,
    expected: str,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, settings = _tls_case(tls, case, clean_env)
    settings = {**QUICK, **settings, "failure_mode": "closed"}
    retries = count_retries(monkeypatch)

    async def scenario() -> None:
        async with serving(settings) as app:
            assert watcher_module.watch(app.app).settings.verify
            await until_true(lambda: len(retries) >= 4, 5, "four retries")
            replies = await app.poll(0.3)
        for code, body in replies:
            assert (code, body["consul"], body["source"]) == (503, "stale", "consul")
            assert "TLS" in body["reason"], body

    run(scenario)
    warnings = library_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "TLS with https://" in warnings[0] and expected in warnings[0], warnings
    assert "ca_file (CONSUL_CACERT)" in warnings[0], warnings


def test_a_tls_failure_is_logged_once_not_once_per_retry(
    tls: TlsAgents,
    clean_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: "logs one line per change of state (not one per retry)". Every
    logger counts: what Tornado logs about the watcher's connections too."""
    caplog.set_level(logging.DEBUG)
    _, settings = _tls_case(tls, "wrong CA", clean_env)
    retries = count_retries(monkeypatch)

    async def scenario() -> None:
        async with serving({**QUICK, **settings}) as app:
            await until_true(lambda: len(retries) >= 6, 5, "six retries")
            await app.status()

    run(scenario)
    noisy = [
        f"{r.name} {r.levelname} {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    assert len(noisy) == 1, f"{len(retries)} retries, {len(noisy)} lines: {noisy}"


def count_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Count the watcher's retries (calls of its backoff) in the returned list."""
    calls: list[float] = []
    backoff = watcher_module._backoff

    def counting(failures: int, cap: float) -> float:
        delay = backoff(failures, cap)
        calls.append(delay)
        return delay

    monkeypatch.setattr(watcher_module, "_backoff", counting)
    return calls


async def until_true(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------
# requests the endpoint does not serve


MAX_HEADER_SIZE = 65536
"""Tornado's default ``max_header_size``, which the backend keeps."""


def raw_request(
    port: int, data: bytes, timeout: float = 5.0
) -> tuple[int | None, dict[str, str], bytes]:
    """Send ``data`` as it is; the code, headers and body of the answer, or
    ``(None, {}, b"")`` when the server closed without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may close before it all
            sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return None, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return code, headers, body


def request_bytes(
    method: str = "GET",
    target: str = "/status",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    all_headers = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    lines = [f"{method} {target} {version}"]
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


HEALTH = "application/health+json"

ODD_REQUESTS: dict[str, tuple[bytes, str]] = {
    # name: (request, what may come back: "normal", "4xx", "4xx-or-closed")
    "POST": (request_bytes("POST", body=b"{}", headers={"Content-Length": "2"}), "4xx"),
    "PUT": (request_bytes("PUT", headers={"Content-Length": "0"}), "4xx"),
    "DELETE": (request_bytes("DELETE"), "4xx"),
    "PATCH": (request_bytes("PATCH", headers={"Content-Length": "0"}), "4xx"),
    "OPTIONS": (request_bytes("OPTIONS"), "4xx"),
    "TRACE": (request_bytes("TRACE"), "4xx"),
    "BREW": (request_bytes("BREW"), "4xx"),
    "CONNECT": (request_bytes("CONNECT", "127.0.0.1:443"), "4xx"),
    "HEAD": (request_bytes("HEAD"), "normal"),
    "Accept xml": (request_bytes(headers={"Accept": "application/xml"}), "normal"),
    "Accept html": (request_bytes(headers={"Accept": "text/html"}), "normal"),
    "Accept q=0": (request_bytes(headers={"Accept": "*/*;q=0"}), "normal"),
    "Accept health": (request_bytes(headers={"Accept": HEALTH}), "normal"),
    "Accept health q=0": (request_bytes(headers={"Accept": f"{HEALTH};q=0"}), "normal"),
    "Accept health q=x": (request_bytes(headers={"Accept": f"{HEALTH};q=x"}), "normal"),
    "Accept health q=nan": (
        request_bytes(headers={"Accept": f"{HEALTH};q=nan"}),
        "normal",
    ),
    "Accept garbage": (request_bytes(headers={"Accept": ",;;=,q=,/,*/;"}), "normal"),
    "Accept 40 KB": (
        request_bytes(headers={"Accept": ",".join([f"{HEALTH};q=0.5"] * 1400)}),
        "normal",
    ),
    "query 4 KB": (request_bytes(target="/status?" + "a" * 4096), "normal"),
    "query 60 KB": (request_bytes(target="/status?x=" + "b" * 60000), "normal"),
    "query bad escapes": (request_bytes(target="/status?%zz=%&%00=%ff"), "normal"),
    "header 32 KB": (request_bytes(headers={"X-Big": "c" * 32768}), "normal"),
    "headers 200": (
        request_bytes(headers={f"X-H{n}": "v" * 100 for n in range(200)}),
        "normal",
    ),
    "header 1 MB": (
        request_bytes(headers={"X-Huge": "d" * 1_000_000}),
        "4xx-or-closed",
    ),
    "query 1 MB": (request_bytes(target="/status?" + "e" * 1_000_000), "4xx-or-closed"),
    "If-None-Match *": (request_bytes(headers={"If-None-Match": "*"}), "normal"),
    "HTTP/1.0 no Host": (b"GET /status HTTP/1.0\r\n\r\n", "normal"),
    "absolute target": (
        request_bytes(target="http://127.0.0.1/status"),
        "normal-or-4xx",
    ),
    "GET with a body": (
        request_bytes(headers={"Content-Length": "5"}, body=b"hello"),
        "normal",
    ),
    "GET chunked": (
        request_bytes(
            headers={"Transfer-Encoding": "chunked"}, body=b"5\r\nhello\r\n0\r\n\r\n"
        ),
        "normal",
    ),
    "bad Content-Length": (
        request_bytes(headers={"Content-Length": "abc"}),
        "4xx-or-closed",
    ),
    "no version": (b"GET /status\r\n\r\n", "4xx-or-closed"),
    "control characters": (request_bytes(headers={"X-Bad": "a\x01b"}), "normal-or-4xx"),
    "trailing slash": (request_bytes(target="/status/"), "4xx"),
    "path traversal": (request_bytes(target="/status/../status"), "normal-or-4xx"),
}


def check_odd_answer(
    name: str, kind: str, code: int | None, headers: dict[str, str], body: bytes
) -> None:
    where = f"{name}: {code} {headers} {body[:200]!r}"
    assert code != 500, where
    if code is None:
        assert kind == "4xx-or-closed", f"{name}: closed without an answer"
        return
    if 400 <= code < 500:
        assert kind != "normal", where
        if headers.get("content-type", "").startswith("application/json"):
            assert json.loads(body)["code"] == code, where
        return
    assert kind.startswith("normal"), where
    # The answer depends on Accept, and must never come from a cache.
    assert "accept" in headers.get("vary", "").lower(), where
    assert headers.get("cache-control") == "no-store", where
    if name == "HEAD":
        assert code in (200, 503) and body == b"", where
    elif headers.get("content-type", "").startswith(HEALTH):
        health = json.loads(body)
        assert (code == 503) == (health["status"] == "fail"), where
    else:
        check_status_body(code, body, name)


@pytest.mark.parametrize("maintenance", [False, True], ids=["ok", "maintenance"])
def test_requests_the_endpoint_does_not_serve(
    consul_agent: AgentBase, maintenance: bool, record_property: Record
) -> None:
    if maintenance:
        set_maintenance(consul_agent, True, "odd requests")
    token = {"CONSUL_HTTP_TOKEN": consul_agent.token} if consul_agent.token else {}
    seen: dict[str, int | None] = {}
    with backends(consul_agent.http_addr, [FAST], env=token) as members:
        port = members[0].port
        code = 503 if maintenance else 200
        with status_clients([port]) as clients:
            wait_all(clients, answers(code, "connected"), 5, "ready")
        problems = []
        for name, (data, kind) in ODD_REQUESTS.items():
            got, headers, body = raw_request(port, data)
            seen[name] = got
            try:
                check_odd_answer(name, kind, got, headers, body)
            except (AssertionError, ValueError, KeyError) as error:
                problems.append(f"{name}: {error}")
        log = members[0].log()
    record_property("odd_requests", json.dumps(seen))
    state = "maintenance" if maintenance else "ok"
    print(f"\n[measure] odd requests ({state}): {seen}")
    assert not problems, problems
    assert "Traceback" not in log, log
    assert "Uncaught exception" not in log, log


def test_token_file_errors_name_the_file_not_the_token(
    acl: AclAgent, tmp_path: Path
) -> None:
    """A missing or empty token file is a SettingsError that names the file
    (or the variable); the resolved settings never show the token."""
    missing = tmp_path / "missing-token"
    with pytest.raises(ssc.SettingsError, match="missing-token") as raised:
        ssc.Settings.from_mapping({"token_file": str(missing)}, environ={})
    assert_no_secret([str(raised.value)], acl.secrets, "settings error")
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(ssc.SettingsError, match="CONSUL_HTTP_TOKEN_FILE"):
        ssc.Settings.from_mapping({}, environ={"CONSUL_HTTP_TOKEN_FILE": str(empty)})
    settings = ssc.Settings.from_mapping({"token": acl.node_read}, environ={})
    assert_no_secret([repr(settings), str(settings)], acl.secrets, "settings repr")
