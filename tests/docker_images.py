"""Local stand-ins for the images docker-compose.yml and examples/Dockerfile use.

For machines with Docker but no container registry (nothing can be pulled):
``scripts/docker-images`` (``python3 -m tests.docker_images``, standard library
only) builds, from Debian's packages,

1. a Debian bookworm root file system (``debootstrap --variant=minbase``, from
   the mirror of the machine's own apt sources), imported with ``docker
   import`` as :data:`BASE_IMAGE`;
2. the Consul image docker-compose.yml names (``hashicorp/consul:...``):
   that base with the Debian ``consul`` binary the tests use (found or fetched
   by ``scripts/get-consul``) and the official image's
   command dispatch (``tests/stand_ins/consul.Dockerfile``);
3. the Python image examples/Dockerfile starts from (``python:3.11-slim``):
   that base with Debian's python3 (3.11 in bookworm), pip and venv
   (``tests/stand_ins/python.Dockerfile``).

Each carries the label ``sprockets-status-consul.stand-in`` naming the image it
stands in for. An image whose tag is already there (a stand-in, or the real
image pulled from a registry) is kept as it is: nothing is built twice, and
the base only when a stand-in needs it.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GET_CONSUL = Path(__file__).resolve().parent.parent / "scripts" / "get-consul"
# The project's own fetch script, for its Debian source and Consul version:
# this module runs before any virtualenv exists (as .ci/run's first step), so
# it uses the standard library only, not the package or tests.consul_agent.


@functools.cache
def _get_consul() -> dict[str, Any]:
    """``scripts/get-consul``'s names, loaded when an image is built."""
    return runpy.run_path(str(GET_CONSUL))


class ConsulUnavailable(RuntimeError):
    """No Consul binary could be had for the image."""


class CommandError(subprocess.CalledProcessError):
    """A command failed; ``str()`` includes its output."""

    def __str__(self) -> str:
        out = (self.stdout or "").strip()
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstdout: {out}\nstderr: {err}"


def consul_binary() -> str:
    """The path ``scripts/get-consul`` prints, fetching Consul if needed."""
    proc = subprocess.run(
        [sys.executable, str(GET_CONSUL)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise ConsulUnavailable(proc.stderr.strip() or "scripts/get-consul failed")
    return proc.stdout.strip()


ROOT = Path(__file__).resolve().parent.parent
STAND_INS = Path(__file__).resolve().parent / "stand_ins"
BASE_IMAGE = "sprockets-status-consul/debian:bookworm"
SUITE = "bookworm"
"""Debian's suite for every image: its python3 is 3.11, as the tag says."""
STAND_IN_LABEL = "sprockets-status-consul.stand-in"
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


class ImageError(RuntimeError):
    """An image cannot be built; the message says why."""


def consul_image() -> str:
    """The Consul image docker-compose.yml runs."""
    text = (ROOT / "docker-compose.yml").read_text()
    match = re.search(r"^\s+image:\s*[\"']?(hashicorp/consul:[^\s\"']+)", text, re.M)
    if match is None:
        raise ImageError("docker-compose.yml names no hashicorp/consul image")
    return match.group(1)


def python_image() -> str:
    """The image examples/Dockerfile starts FROM."""
    text = (ROOT / "examples" / "Dockerfile").read_text()
    match = re.search(r"^FROM\s+(\S+)", text, re.M)
    if match is None:
        raise ImageError("examples/Dockerfile has no FROM line")
    return match.group(1)


def images() -> list[str]:
    """The images the compose file and the tests need."""
    return [consul_image(), python_image()]


def docker(
    *args: str, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``; with ``check`` a failure raises
    :class:`CommandError` (its output included)."""
    cmd = ["docker", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def present(image: str) -> bool:
    """The engine has an image with this tag."""
    return docker("image", "inspect", image, check=False, timeout=30).returncode == 0


def missing_images() -> list[str]:
    """The images of :func:`images` the engine does not have."""
    return [image for image in images() if not present(image)]


def debian_mirror() -> str:
    """The first Debian mirror in the machine's apt sources.

    Taken from the apt source ``scripts/get-consul`` derives to fetch
    Consul, so both use whatever mirror the machine is set up with.
    """
    _, source = _get_consul()["_bullseye_sources"]()
    for line in source.splitlines():
        words = line.split()
        if words[:1] == ["URIs:"] and len(words) > 1:
            return words[1]
        if words[:1] == ["deb"]:
            return words[2] if words[1].startswith("[") else words[1]
    raise ImageError(f"no mirror in the apt source derived from the machine:\n{source}")


def _debootstrap(work: Path) -> tuple[list[str], dict[str, str]]:
    """The debootstrap command and its environment: the installed one, else
    Debian's package unpacked into ``work`` (nothing is installed)."""
    env = {**os.environ, "LC_ALL": "C"}
    installed = shutil.which("debootstrap")
    if installed:
        return [installed], env
    subprocess.run(
        ["apt-get", "-q", "download", "debootstrap"],
        cwd=work,
        check=True,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    deb = next(work.glob("debootstrap_*.deb"), None)
    if deb is None:
        raise ImageError("apt-get download debootstrap produced no package")
    unpacked = work / "debootstrap"
    subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True, timeout=60)
    env["DEBOOTSTRAP_DIR"] = str(unpacked / "usr/share/debootstrap")
    return [str(unpacked / "usr/sbin/debootstrap")], env


def build_base(work: Path) -> None:
    """debootstrap a minimal Debian and import it as :data:`BASE_IMAGE`."""
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root: run scripts/docker-images as root")
    rootfs = work / "rootfs"
    debootstrap, env = _debootstrap(work)
    command = [
        *debootstrap,
        "--variant=minbase",
        SUITE,
        str(rootfs),
        debian_mirror(),
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=1200,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if proc.returncode != 0:
        raise ImageError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr}")
    # apt's downloads are not part of the image
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
    with subprocess.Popen(
        ["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
    ) as tar:
        imported = subprocess.run(
            [
                "docker",
                "import",
                "--change",
                f"LABEL {STAND_IN_LABEL}=debian:{SUITE}",
                "--change",
                'CMD ["/bin/bash"]',
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if tar.returncode != 0 or imported.returncode != 0:
        raise ImageError(f"docker import failed: {imported.stderr}")


def _build(context: Path, dockerfile: str, tag: str, **args: str) -> None:
    shutil.copy(STAND_INS / dockerfile, context / "Dockerfile")
    build_args = {"BASE": BASE_IMAGE, "STANDS_FOR": tag, **args}
    flags = [f"--build-arg={name}={value}" for name, value in build_args.items()]
    docker("build", "-q", *flags, "-t", tag, str(context), timeout=1200)


def build_consul(work: Path) -> None:
    """The Consul stand-in: the base with Debian's consul binary."""
    context = work / "consul"
    root = context / "root"
    for folder in ("usr/bin", "usr/local/bin", "consul/data", "consul/config"):
        (root / folder).mkdir(parents=True)
    shutil.copy(consul_binary(), root / "usr/bin/consul")
    entrypoint = root / "usr/local/bin/docker-entrypoint.sh"
    shutil.copy(STAND_INS / "consul-entrypoint.sh", entrypoint)
    _build(
        context,
        "consul.Dockerfile",
        consul_image(),
        CONSUL_VERSION=_get_consul()["CONSUL_VERSION"],
    )


def build_python(work: Path) -> None:
    """The Python stand-in: the base with Debian's python3, pip and venv."""
    context = work / "python"
    (context / "ca").mkdir(parents=True)
    for cert in sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []:
        shutil.copy(cert, context / "ca")
    _build(context, "python.Dockerfile", python_image())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/docker-images",
        description="Build local stand-ins for the images docker-compose.yml "
        "uses, from Debian packages, for machines without a container registry.",
    )
    parser.add_argument(
        "--list-missing",
        action="store_true",
        help="only print the images that are missing (exit 1 if any)",
    )
    args = parser.parse_args(argv)
    if args.list_missing:
        missing = missing_images()
        print("\n".join(missing))
        return 1 if missing else 0
    builders = [(consul_image(), build_consul), (python_image(), build_python)]
    missing = [(image, build) for image, build in builders if not present(image)]
    for image in sorted(set(images()) - {image for image, _ in missing}):
        print(f"docker-images: {image}: present, kept", file=sys.stderr)
    if missing and not present(BASE_IMAGE):  # the stand-ins' base, when needed
        missing.insert(0, (BASE_IMAGE, build_base))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ssc-images-") as tmp:
        for image, build in missing:
            began = time.monotonic()
            print(f"docker-images: {image}: building", file=sys.stderr, flush=True)
            try:
                build(Path(tmp))
            except (
                ImageError,
                ConsulUnavailable,
                subprocess.CalledProcessError,  # CommandError included
            ) as exc:
                print(f"docker-images: {image}: {exc}", file=sys.stderr)
                return 1
            print(
                f"docker-images: {image}: built in {time.monotonic() - began:.0f} s",
                file=sys.stderr,
            )
    print(f"docker-images: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
