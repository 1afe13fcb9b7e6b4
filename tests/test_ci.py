"""CI's entry point, .ci/run: what it insists on before running anything long."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI_RUN = ROOT / ".ci" / "run"


def test_runs_the_docker_command_readme_documents() -> None:
    command = "SSC_AGENT=docker ./scripts/test tests/test_integration.py"
    assert f"`{command}`" in (ROOT / "README.md").read_text()
    assert f"if ! {command} " in CI_RUN.read_text()


def test_a_docker_without_an_answering_engine_fails(tmp_path: Path) -> None:
    """Installed but not answering is a broken CI machine, not a skip."""
    fake = tmp_path / "docker"
    fake.write_text(
        "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(CI_RUN)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it went on to run the suite: stop all of it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "docker is installed but its engine does not answer" in err
    assert "Cannot connect to the Docker daemon" in err
    assert "scripts/test" not in err
