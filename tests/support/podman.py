"""podman for the ``container`` tier: the real image built from the Dockerfile, run on loopback.

Why this shape: this machine kind (and CI's) pulls from no registry and cannot run crun, so every
call goes through ``podman --runtime runc`` with the containers.conf that
``scripts/container-base.sh`` writes (``default_ulimits = []``), and images build on the local
debootstrap base that script imports. Every call is bounded by a timeout; every container a test
starts is removed at the end (``Container.remove``), whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASE_SCRIPT = REPO / "scripts" / "container-base.sh"


class PodmanUnavailable(RuntimeError):
    """podman cannot run containers here (the tier skips, loudly, with this reason)."""


@dataclass
class Podman:
    conf: Path
    base: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", "--runtime", "runc", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc

    def build(self, tag: str, context: Path = REPO, timeout: float = 900.0) -> float:
        """Build the Dockerfile on the local base; the seconds it took."""
        started = time.monotonic()
        self.run(
            "build",
            "--format",
            "docker",  # keeps HEALTHCHECK (the OCI format has no field for it)
            "--build-arg",
            f"BASE={self.base}",
            "-t",
            tag,
            str(context),
            timeout=timeout,
        )
        return time.monotonic() - started

    def start(self, image: str, *args: str, name: str | None = None) -> Container:
        """``podman run -d`` (args: run options, then ``--`` and the command's arguments)."""
        name = name or f"isv-test-{uuid.uuid4().hex[:10]}"
        opts: list[str] = list(args)
        command: list[str] = []
        if "--" in opts:
            cut = opts.index("--")
            opts, command = opts[:cut], opts[cut + 1 :]
        self.run("run", "-d", "--name", name, *opts, image, *command)
        return Container(self, name)


def prepare() -> Podman:
    """Install what is missing, import the base image once; PodmanUnavailable if it cannot run."""
    try:
        proc = subprocess.run(
            ["bash", str(BASE_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PodmanUnavailable(f"{BASE_SCRIPT.name} failed: {exc}") from exc
    if proc.returncode != 0 or not proc.stdout.strip():
        raise PodmanUnavailable(
            f"{BASE_SCRIPT.name} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        )
    base = proc.stdout.strip().splitlines()[-1]
    cache = Path(
        os.environ.get("CONTAINER_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "inference-server"
        / "containers"
    )
    podman = Podman(cache / "containers.conf", base)
    try:
        probe = podman.run("run", "--rm", base, "true", timeout=120, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PodmanUnavailable("`podman run` of the base image hung for 120 s") from exc
    if probe.returncode != 0:
        raise PodmanUnavailable(f"`podman run {base} true` failed: {probe.stderr.strip()[-1500:]}")
    return podman


@dataclass
class Container:
    podman: Podman
    name: str
    removed: bool = field(default=False)

    def inspect(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = json.loads(self.podman.run("inspect", self.name).stdout)
        return out[0]

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def logs(self) -> str:
        proc = self.podman.run("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *command: str) -> str:
        return self.podman.run("exec", self.name, *command).stdout

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        """Until ``url`` answers 200 (bounded); the logs if the container stopped or never did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as resp,
            ):
                if resp.status == 200:
                    return
            if not self.running():
                raise AssertionError(f"container {self.name} stopped:\n{self.logs()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{url} not ready in {timeout} s:\n{self.logs()[-4000:]}")

    def remove(self) -> None:
        if not self.removed:
            self.podman.run("rm", "-f", "-t", "0", self.name, check=False, timeout=60)
            self.removed = True
