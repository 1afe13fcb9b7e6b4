"""docker-compose.yml and examples/Dockerfile, checked by reading them.

No Docker engine is needed: the compose file is parsed with PyYAML, the
Dockerfile line by line, and what they say is checked against the repository
(the files they copy and run exist) and against the library (the app's
environment resolves to the consul service). When ``docker compose`` or
``docker-compose`` is installed, its ``config`` command validates the file too
(that needs no engine).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sprockets_status_consul import Settings

from .docker_agent import compose_command

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def _with_defaults(text: str) -> str:
    """Compose's ``${NAME:-default}``, as compose reads it with NAME unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(_with_defaults(COMPOSE.read_text()))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    services = compose.get("services")
    assert isinstance(services, dict), "docker-compose.yml has no services"
    return services


def _command(value: Any) -> list[str]:
    """A compose ``command`` (string or list) as a list of words."""
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), f"command is neither a string nor a list: {value}"
    return [str(word) for word in value]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or list of NAME=value) as a dict."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """Container port -> (host address, host port) of a service's ``ports``."""
    result: dict[int, tuple[str, int]] = {}
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            target = int(entry["target"])
            result[target] = (
                str(entry.get("host_ip", "")),
                int(entry.get("published", target)),
            )
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            host_ip, host_port, target_s = parts
        elif len(parts) == 2:
            host_ip, (host_port, target_s) = "", parts
        else:
            host_ip, host_port, target_s = "", parts[0], parts[0]
        result[int(target_s)] = (host_ip, int(host_port))
    return result


def _dockerfile_path(app: dict[str, Any]) -> tuple[Path, Path]:
    """(build context, Dockerfile) of the app service, as local paths."""
    build = app.get("build")
    assert build is not None, "the app service is not built from the repository"
    if isinstance(build, str):
        context, dockerfile = ROOT / build, "Dockerfile"
    else:
        context = ROOT / build.get("context", ".")
        dockerfile = build.get("dockerfile", "Dockerfile")
    return context.resolve(), (context / dockerfile).resolve()


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        word, _, rest = pending.partition(" ")
        result.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{dockerfile} ends inside a continued instruction"
    return result


# ----------------------------------------------------------------------------
# the compose file


def test_services_are_consul_and_app(services: dict[str, Any]) -> None:
    assert set(services) == {"consul", "app"}


def test_consul_is_the_official_image_pinned(services: dict[str, Any]) -> None:
    image = services["consul"].get("image", "")
    match = re.fullmatch(r"hashicorp/consul:(\d+)\.(\d+)(\.\d+)?", image)
    assert match, f"consul image {image!r} is not hashicorp/consul:<version>"
    # node maintenance and blocking queries on /v1/health/node: any 1.x works;
    # the pin keeps the demo reproducible
    assert int(match.group(1)) >= 1


def test_consul_runs_a_dev_agent_reachable_from_other_containers(
    services: dict[str, Any],
) -> None:
    words = _command(services["consul"].get("command"))
    assert words[0] == "agent", words
    assert "-dev" in words, words
    # -client 0.0.0.0 or -client=0.0.0.0: the HTTP API must not be loopback only
    if "-client" in words:
        client = words[words.index("-client") + 1]
    else:
        client = next(
            (w.split("=", 1)[1] for w in words if w.startswith("-client=")), ""
        )
    assert client == "0.0.0.0", words


def test_consul_http_port_is_published(services: dict[str, Any]) -> None:
    published = _published(services["consul"])
    assert 8500 in published, published
    host_ip, host_port = published[8500]
    assert host_port == 8500
    assert host_ip in ("", "127.0.0.1", "0.0.0.0")


def test_consul_has_a_healthcheck_the_app_waits_for(
    services: dict[str, Any],
) -> None:
    test = services["consul"].get("healthcheck", {}).get("test")
    assert test, "consul has no healthcheck"
    words = _command(test) if isinstance(test, str) else [str(w) for w in test]
    assert words[0] in ("CMD", "CMD-SHELL"), words
    assert words[1:3] == ["consul", "members"], words
    depends = services["app"].get("depends_on")
    assert isinstance(depends, dict), "app.depends_on needs the long form"
    assert depends.get("consul", {}).get("condition") == "service_healthy"


def test_app_talks_to_the_consul_service(services: dict[str, Any]) -> None:
    env = _environment(services["app"])
    assert env.get("CONSUL_HTTP_ADDR") == "consul:8500", env
    # The library resolves it to the consul service's host and HTTP port.
    settings = Settings.from_mapping({}, environ=env)
    assert (settings.scheme, settings.host, settings.port) == ("http", "consul", 8500)
    assert settings.host in services
    assert "CONSUL_HTTP_TOKEN" not in env  # the dev agent has no ACLs


def test_app_settings_resolve_in_the_container(services: dict[str, Any]) -> None:
    """The example's own consul_status setting plus the compose environment."""
    spec = importlib.util.spec_from_file_location(
        "consul_app_under_test", ROOT / "examples" / "consul_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.make_app()
    env = _environment(services["app"])
    settings = Settings.from_mapping(app.settings.get("consul_status"), environ=env)
    assert settings.address == "http://consul:8500"
    assert settings.node is None  # follows the agent's own node


def test_app_port_is_published(services: dict[str, Any]) -> None:
    app = services["app"]
    published = _published(app)
    env = _environment(app)
    port = int(env.get("PORT", "8000"))
    assert port in published, (port, published)
    assert published[port][1] == 8000
    # in a container the app must listen on every interface, not loopback
    assert env.get("ADDRESS", "") in ("", "0.0.0.0"), env


# ----------------------------------------------------------------------------
# the Dockerfile


@pytest.fixture(scope="module")
def dockerfile(services: dict[str, Any]) -> tuple[Path, Path]:
    context, path = _dockerfile_path(services["app"])
    assert context == ROOT, f"the build context is {context}, not the repository"
    assert path.is_file(), f"{path} does not exist"
    return context, path


def test_dockerfile_starts_from_a_supported_python(
    dockerfile: tuple[Path, Path],
) -> None:
    instructions = _instructions(dockerfile[1])
    assert instructions[0][0] == "FROM", instructions[0]
    image = instructions[0][1].split()[0]
    match = re.fullmatch(r"python:3\.(\d+)(-[a-z0-9.-]+)?", image)
    assert match, f"base image {image!r} is not python:3.X[-variant]"
    assert int(match.group(1)) >= 9  # requires-python >= 3.9


def test_dockerfile_copies_only_files_that_exist(
    dockerfile: tuple[Path, Path],
) -> None:
    context, path = dockerfile
    copies = [args for word, args in _instructions(path) if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert len(words) >= 2, args
        for source in words[:-1]:
            assert (context / source).exists(), f"COPY {source}: no such file"


def test_dockerfile_installs_the_project(dockerfile: tuple[Path, Path]) -> None:
    instructions = _instructions(dockerfile[1])
    copied = {
        source.rstrip("/")
        for word, args in instructions
        if word == "COPY"
        for source in [w for w in shlex.split(args) if not w.startswith("--")][:-1]
    }
    # what pip needs to build the project: its metadata, readme and package
    assert {"pyproject.toml", "README.md", "sprockets_status_consul"} <= copied
    installs = [
        args
        for word, args in instructions
        if word == "RUN" and re.search(r"\bpip install\b", args)
    ]
    assert installs, "no RUN pip install"
    assert any(re.search(r"\bpip install\s+(-\S+\s+)*\.(\s|$)", a) for a in installs)


def test_dockerfile_runs_the_consul_example(dockerfile: tuple[Path, Path]) -> None:
    context, path = dockerfile
    instructions = _instructions(path)
    cmds = [args for word, args in instructions if word == "CMD"]
    assert cmds, "no CMD"
    # exec form (JSON), so that python is PID 1 and gets docker's SIGTERM
    command = json.loads(cmds[-1])
    assert command[0] in ("python", "python3"), command
    assert command[1] == "examples/consul_app.py", command
    workdir = [args for word, args in instructions if word == "WORKDIR"][-1]
    copied_examples = any(
        word == "COPY" and shlex.split(args)[0].rstrip("/") == "examples"
        for word, args in instructions
    )
    assert copied_examples, "the examples are not copied into the image"
    assert workdir.startswith("/")
    assert (context / command[1]).is_file()
    assert not any(word == "ENTRYPOINT" for word, _ in instructions)
    exposed = {
        port.split("/")[0]
        for word, args in instructions
        if word == "EXPOSE"
        for port in args.split()
    }
    assert "8000" in exposed


def test_docker_compose_config_accepts_the_file() -> None:
    """Compose's own validation; it needs the tool, not a running engine."""
    compose = compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
