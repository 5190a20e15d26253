"""The ``container`` tier's fixtures: podman ready (or a loud skip), the image built once per run.

``make test`` runs this tier; everything it needs (podman, runc, debootstrap, the base image, the
locked wheels) is installed or made on first use and cached (scripts/container-base.sh, ``make
wheels``), so a fresh Debian machine with apt and PyPI runs it as it is.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.podman import REPO, Podman, PodmanUnavailable, prepare

IMAGE = "localhost/inference-server:test"


#: Lines for the end of the run (the build's time; a skip must not go unnoticed).
NOTES: list[str] = []


def _loud(line: str) -> None:
    NOTES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Printed after the run, outside output capture, whatever the verbosity."""
    if NOTES:
        terminalreporter.section("container tier")
        for line in NOTES:
            terminalreporter.write_line(line, yellow=line.startswith("WARNING"), bold=True)


@pytest.fixture(scope="session")
def podman() -> Podman:
    try:
        return prepare()
    except PodmanUnavailable as exc:
        reason = f"PODMAN CANNOT RUN CONTAINERS HERE, the container tier did not run: {exc}"
        _loud(f"WARNING: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def gateway_image(podman: Podman) -> str:
    """The image from the Dockerfile, built on the local base from wheels/ (no index)."""
    if not any(Path(REPO, "wheels").glob("*.whl")):
        started = time.monotonic()
        subprocess.run(["make", "-s", "wheels"], cwd=REPO, check=True, timeout=600)
        _loud(f"container tier: make wheels took {time.monotonic() - started:.1f} s")
    secs = podman.build(IMAGE)
    _loud(f"container tier: image built in {secs:.1f} s (podman build, {IMAGE})")
    return IMAGE
