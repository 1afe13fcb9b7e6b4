"""The public dev-agent launcher, used the way a project's own tests use it.

The pytest plugin is checked in a separate pytest run in an empty folder (no
conftest, nothing on ``PYTHONPATH``), where the only way to the fixture is the
installed package's ``pytest11`` entry point; the test it runs is the README's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from sprockets_status_consul.dev_agent import ConsulAgentError, ConsulDevAgent

from .consul_agent import ExternalAgent, free_port, wait_for

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The complete test in README's "Integration tests with a real agent"."""
    section = README.read_text().split("## Integration tests with a real agent")[1]
    section = section.split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return str(blocks[-1])


def run_pytest(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CONSUL_", "PYTEST_", "PYTHON")) and k != "CI"
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


def test_importing_the_library_imports_no_pytest() -> None:
    code = (
        "import sys, sprockets_status_consul, sprockets_status_consul.dev_agent\n"
        "assert 'pytest' not in sys.modules, 'pytest imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_bad_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_BINARY", str(tmp_path / "missing"))
    with pytest.raises(ConsulAgentError, match="not an executable file"):
        ConsulDevAgent()


def test_an_explicit_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConsulAgentError, match=r"binary=.* not an executable file"):
        ConsulDevAgent(str(tmp_path / "missing"))


def test_the_agent_is_reached_directly_whatever_http_proxy_says(
    consul_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CI job's proxy, here with nothing listening: loopback never goes there.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with ConsulDevAgent(consul_binary, startup_timeout=10) as agent:
        agent.set_maintenance(True, "through no proxy")
        agent.set_maintenance(False)


def test_context_manager_starts_and_stops_an_agent(consul_binary: str) -> None:
    with ConsulDevAgent(consul_binary, node_name="ssc-public") as agent:
        assert agent.running
        external = ExternalAgent(agent.http_addr)
        assert external.node_name == "ssc-public"
        agent.set_maintenance(True, "from the public API")
        check = wait_for(external.maintenance_check, timeout=5)
        assert check["Notes"] == "from the public API"
        log_dir = agent.log_path.parent if agent.log_path else None
    assert not agent.running
    assert log_dir is not None
    assert not log_dir.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(agent.url + "/v1/status/leader", timeout=2)


def test_readme_example_passes_through_the_plugin(
    tmp_path: Path, consul_binary: str
) -> None:
    (tmp_path / "test_status.py").write_text(readme_example())
    proc = run_pytest(tmp_path, {"CONSUL_BINARY": consul_binary})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED test_status.py::test_status_follows_node_maintenance" in proc.stdout


def test_plugin_skips_without_a_binary_and_is_idle_unless_asked(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent("""
            def test_with_agent(consul_dev_agent):
                raise AssertionError("should have been skipped")

            def test_without_agent():
                pass
        """)
    )
    proc = run_pytest(tmp_path, {"PATH": str(Path(sys.executable).parent)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "PASSED test_probe.py::test_without_agent" in out
    assert "SKIPPED" in out
    assert "no consul binary: set CONSUL_BINARY or put consul on PATH" in out


def test_plugin_fails_when_consul_binary_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(
        "def test_with_agent(consul_dev_agent):\n    pass\n"
    )
    missing = tmp_path / "no-consul-here"
    proc = run_pytest(tmp_path, {"CONSUL_BINARY": str(missing)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "ERROR test_probe.py::test_with_agent" in out
    assert "SKIPPED" not in out
    assert f"unusable consul binary: CONSUL_BINARY={str(missing)!r}" in out


def test_the_pytest_plugin_loads_neither_tornado_nor_consul() -> None:
    """Installed, the plugin is imported by every pytest run of the environment:
    the library's imports wait until a name of the package is used."""
    code = textwrap.dedent(
        """
        import sys
        import sprockets_status_consul.pytest_plugin
        loaded = sorted({"tornado", "consul", "requests"} & set(sys.modules))
        import sprockets_status_consul as ssc
        ssc.track_requests  # imports the drain module, named as a function of it
        names = [n for n in ssc.__all__ if getattr(ssc, n, None) is None]
        listed = set(ssc.__all__) <= set(dir(ssc))
        assert callable(ssc.drain), ssc.drain  # its module was imported first
        print(loaded, names, listed, "tornado" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split("\n")[0] == "[] [] True True", result.stdout
