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


def _loud(config: pytest.Config, line: str) -> None:
    """A line on the terminal even with output captured (a skip must not go unnoticed)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, yellow=True, bold=True)


@pytest.fixture(scope="session")
def podman(request: pytest.FixtureRequest) -> Podman:
    try:
        return prepare()
    except PodmanUnavailable as exc:
        reason = f"PODMAN CANNOT RUN CONTAINERS HERE, the container tier did not run: {exc}"
        _loud(request.config, f"WARNING: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def gateway_image(podman: Podman, request: pytest.FixtureRequest) -> str:
    """The image from the Dockerfile, built on the local base from wheels/ (no index)."""
    if not any(Path(REPO, "wheels").glob("*.whl")):
        started = time.monotonic()
        subprocess.run(["make", "-s", "wheels"], cwd=REPO, check=True, timeout=600)
        _loud(
            request.config, f"container tier: make wheels took {time.monotonic() - started:.1f} s"
        )
    secs = podman.build(IMAGE)
    _loud(request.config, f"container tier: image built in {secs:.1f} s (podman build, {IMAGE})")
    return IMAGE
