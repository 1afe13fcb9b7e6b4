"""The consul_status setting: defaults, environment fallbacks, clear errors."""

from __future__ import annotations

import pathlib

import pytest

from sprockets_status_consul import FAIL_CLOSED, Settings, SettingsError
from sprockets_status_consul.settings import resolve as resolve_setting


def resolve(config: dict[str, object] | None = None, **env: str) -> Settings:
    return Settings.from_mapping(config, environ=env)


def test_defaults_follow_consul_conventions() -> None:
    settings = resolve()
    assert (settings.scheme, settings.host, settings.port) == (
        "http",
        "127.0.0.1",
        8500,
    )
    assert settings.token is None
    assert settings.node is None
    assert settings.failure_mode == "open"
    assert settings.blocking is True
    assert settings.wait == settings.ttl == 10.0


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("consul.local:8501", ("http", "consul.local", 8501)),
        ("http://10.1.2.3:8500", ("http", "10.1.2.3", 8500)),
        ("https://consul.local:8501", ("https", "consul.local", 8501)),
        ("https://consul.local", ("https", "consul.local", 443)),
        ("[::1]:8500", ("http", "::1", 8500)),
        ("consul.local", ("http", "consul.local", 8500)),
    ],
)
def test_address_forms(address: str, expected: tuple[str, str, int]) -> None:
    settings = resolve(CONSUL_HTTP_ADDR=address)
    assert (settings.scheme, settings.host, settings.port) == expected
    assert resolve({"address": address}) == settings


def test_setting_wins_over_environment() -> None:
    settings = resolve(
        {"address": "a.example:1", "token": "from-setting"},
        CONSUL_HTTP_ADDR="b.example:2",
        CONSUL_HTTP_TOKEN="from-env",
    )
    assert (settings.host, settings.port) == ("a.example", 1)
    assert settings.token == "from-setting"


def test_token_from_environment_and_files(tmp_path: pathlib.Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    assert resolve(CONSUL_HTTP_TOKEN="env-token").token == "env-token"
    assert resolve(CONSUL_HTTP_TOKEN_FILE=str(token_file)).token == "file-token"
    assert resolve({"token_file": str(token_file)}, CONSUL_HTTP_TOKEN="x").token == (
        "file-token"
    )


def test_token_never_in_repr_or_errors(tmp_path: pathlib.Path) -> None:
    settings = resolve({"token": "s3cr3t-token"})
    assert "s3cr3t-token" not in repr(settings)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(SettingsError, match=r"token_file.*empty"):
        resolve({"token_file": str(empty)})
    with pytest.raises(SettingsError, match=r"CONSUL_HTTP_TOKEN_FILE.*cannot read"):
        resolve(CONSUL_HTTP_TOKEN_FILE=str(tmp_path / "missing"))


def test_ssl_switches_scheme() -> None:
    assert resolve({"address": "h:8501", "ssl": True}).scheme == "https"
    assert resolve(CONSUL_HTTP_ADDR="h:8501", CONSUL_HTTP_SSL="true").scheme == "https"
    assert resolve(CONSUL_HTTP_SSL_VERIFY="false").verify is False


def test_tls_files() -> None:
    settings = resolve(
        CONSUL_CACERT="/ca.pem", CONSUL_CLIENT_CERT="/c.pem", CONSUL_CLIENT_KEY="/k.pem"
    )
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
    )


def test_failure_mode_and_numbers() -> None:
    settings = resolve(
        {"failure_mode": "closed", "ttl": 2, "timeout": 0.5, "startup_wait": 0}
    )
    assert settings.failure_mode == FAIL_CLOSED
    assert (settings.ttl, settings.timeout, settings.startup_wait) == (2.0, 0.5, 0.0)


@pytest.mark.parametrize(
    ("config", "env", "names"),
    [
        ("not a dict", {}, "consul_status must be a dict"),
        ({"adress": "x"}, {}, "unknown key.*'adress'"),
        ({"ttl": 0}, {}, r"consul_status\['ttl'\] must be a positive"),
        ({"ttl": -1}, {}, r"consul_status\['ttl'\]"),
        ({"ttl": "10s"}, {}, r"consul_status\['ttl'\] must be a number"),
        ({"ttl": True}, {}, r"consul_status\['ttl'\] must be a number"),
        ({"ttl": float("nan")}, {}, r"consul_status\['ttl'\]"),
        ({"failure_mode": "sometimes"}, {}, r"consul_status\['failure_mode'\]"),
        ({"node": "a/b"}, {}, r"consul_status\['node'\] must be a Consul node name"),
        ({"node": ""}, {}, r"consul_status\['node'\] must be a non-empty string"),
        ({"address": "unix:///tmp/consul.sock"}, {}, r"scheme 'unix'"),
        ({"address": "h:99999"}, {}, r"consul_status\['address'\]"),
        ({"address": "http://h:1/path"}, {}, r"consul_status\['address'\]"),
        ({}, {"CONSUL_HTTP_ADDR": "h:port"}, "CONSUL_HTTP_ADDR"),
        ({}, {"CONSUL_HTTP_SSL": "maybe"}, "CONSUL_HTTP_SSL must be true or false"),
        ({"blocking": "sure"}, {}, r"consul_status\['blocking'\]"),
        ({"cert_file": "/c.pem"}, {}, "needs both cert_file and key_file"),
    ],
)
def test_bad_settings_name_their_key(
    config: object, env: dict[str, str], names: str
) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_mapping(config, environ=env)  # type: ignore[arg-type]


def test_token_file_wins_as_in_consul(tmp_path: pathlib.Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    env = {"CONSUL_HTTP_TOKEN": "env-token", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    assert resolve(**env).token == "file-token"
    with pytest.raises(SettingsError, match="token or token_file, not both"):
        resolve({"token": "a", "token_file": str(token_file)})


def test_a_token_with_a_line_break_is_refused_without_showing_it(
    tmp_path: pathlib.Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("AccessorID: s3cr3t-one\nSecretID: s3cr3t-two\n")
    with pytest.raises(SettingsError) as error:
        resolve({"token_file": str(token_file)})
    assert "s3cr3t" not in str(error.value)
    assert "line breaks" in str(error.value)
    with pytest.raises(SettingsError) as error:
        resolve(CONSUL_HTTP_TOKEN="s3cr3t one")
    assert "s3cr3t" not in str(error.value)


def test_environment_never_downgrades_an_https_setting() -> None:
    settings = resolve({"address": "https://h:8501"}, CONSUL_HTTP_SSL="false")
    assert settings.scheme == "https"
    with pytest.raises(SettingsError, match=r"consul_status\['ssl'\] is false"):
        resolve({"address": "https://h:8501", "ssl": False})


def test_ttl_is_bounded_by_consuls_longest_wait() -> None:
    assert resolve({"ttl": 600}).ttl == 600.0
    with pytest.raises(SettingsError, match=r"consul_status\['ttl'\] must be at most"):
        resolve({"ttl": 601})
    with pytest.raises(SettingsError, match=r"consul_status\['ttl'\]"):
        resolve({"ttl": 1e308})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_mode", "closd"),
        ("ttl", 0),
        ("ttl", 601),
        ("ttl", "10s"),
        ("ttl", float("inf")),
        ("timeout", True),
        ("startup_wait", -1),
        ("node", "a/b"),
        ("service", "a/b"),
        ("key", "/leading"),
        ("blocking", "yes"),
        ("verify", None),
    ],
)
def test_settings_built_directly_are_checked_as_the_setting_is(
    field: str, value: object
) -> None:
    """One set of rules: the same problem, named by field instead of key."""
    with pytest.raises(SettingsError) as direct:
        Settings(**{field: value})  # type: ignore[arg-type]
    assert str(direct.value).startswith(f"Settings.{field} ")
    problem = str(direct.value)[len(f"Settings.{field} ") :]
    if field in ("blocking", "verify"):
        return  # the setting also takes "yes"/"no" strings, so its check differs
    with pytest.raises(SettingsError) as from_setting:
        resolve({field: value})
    assert str(from_setting.value) == f"consul_status[{field!r}] {problem}"


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"port": 0}, r"Settings\.port must name a port"),
        ({"port": "8500"}, r"Settings\.port must name a port"),
        ({"scheme": "ftp"}, r"Settings\.scheme must be 'http' or 'https'"),
        ({"host": ""}, r"Settings\.host"),
        ({"cert_file": "/c.pem"}, "needs both cert_file and key_file"),
        ({"token": "s3cr3t one"}, r"Settings\.token holds spaces"),
    ],
)
def test_fields_only_settings_built_directly_have(
    fields: dict[str, object], names: str
) -> None:
    with pytest.raises(SettingsError, match=names) as error:
        Settings(**fields)  # type: ignore[arg-type]
    assert "s3cr3t" not in str(error.value)


def test_settings_built_directly_read_no_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "elsewhere:1")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    settings = Settings(ttl=2)
    assert (settings.host, settings.port, settings.token) == ("127.0.0.1", 8500, None)
    assert settings.ttl == 2.0 and isinstance(settings.ttl, float)
    assert settings == Settings(ttl=2.0)


def test_a_settings_object_is_taken_as_it_is() -> None:
    settings = Settings(failure_mode=FAIL_CLOSED)
    assert resolve_setting(settings) is settings
    assert resolve_setting({"ttl": 2}) == Settings.from_mapping({"ttl": 2})
    with pytest.raises(SettingsError, match="must be a dict or a Settings"):
        resolve_setting(["not", "settings"])  # type: ignore[arg-type]


def test_a_port_out_of_range_names_the_address() -> None:
    with pytest.raises(SettingsError, match=r"consul_status\['address'\] must name"):
        Settings.from_mapping({"address": "h:0"}, environ={})
    with pytest.raises(SettingsError, match=r"CONSUL_HTTP_ADDR must name"):
        Settings.from_mapping({}, environ={"CONSUL_HTTP_ADDR": "h:0"})


@pytest.mark.parametrize("register", [{"name": "web", "port": 8000}, True, "web"])
def test_a_register_field_that_is_not_a_registration_is_refused(
    register: object,
) -> None:
    with pytest.raises(
        SettingsError, match=r"^Settings\.register must be a Registration"
    ):
        Settings(register=register)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["[::1]", "consul:8500", " consul", "", "a b", "-a"])
def test_a_host_is_a_host_name_or_an_ip_address(host: str) -> None:
    with pytest.raises(SettingsError, match=r"^Settings\.host must be a host name"):
        Settings(host=host)


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "consul", "consul.service.dc1."])
def test_good_hosts(host: str) -> None:
    assert Settings(host=host).host == host


@pytest.mark.parametrize(
    "address",
    [
        "http://user:s3cr3t@consul:8500",
        "user:s3cr3t@consul:8500",
        "https://user:s3cr3t@consul",
        "http://user:s3cr3t@consul:port",
        "user:s3cr3t@",
    ],
)
def test_an_address_error_does_not_show_a_password(address: str) -> None:
    with pytest.raises(SettingsError) as raised:
        resolve({"address": address})
    message = str(raised.value)
    assert "consul_status['address']" in message
    assert "s3cr3t" not in message
    assert "user" not in message
