"""The dependency ranges, the lock and the build targets agree with each other.

Why: the pyprojects once allowed versions the code cannot run on (aiohttp 3.10 has no
`web.RequestKey`, marshmallow 3 no generic `fields.Field[T]`), installs were not reproducible and
CI did not lint. These tests hold: every requirement has a floor and a ceiling, the lock
(requirements/constraints.txt) pins every package exactly and inside every range, the suite runs on
exactly the locked versions, `make install` installs through the lock and `make test` (what
.ci/run runs) lints before it tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "constraints.txt"
PYPROJECTS = [REPO / "pyproject.toml", *sorted(REPO.glob("plugins/*/pyproject.toml"))]
OWN_PREFIX = "inference-server"  # the core and the plugins; never locked, never ranged here


def locked() -> dict[str, str]:
    """The lock's pins as {canonical name: version}; a line that is not `name==version` fails."""
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9][a-z0-9-]*)==([^\s=;]+)", line)
        assert match, f"{LOCK.name}: not an exact pin of a normalised name: {line!r}"
        name, version = match.groups()
        assert name not in pins, f"{LOCK.name}: {name} pinned twice"
        pins[name] = version
    return pins


def requirements() -> list[tuple[str, Requirement]]:
    """Every third-party requirement of the core and the plugins (runtime and every extra)."""
    found = []
    for path in PYPROJECTS:
        project = tomllib.loads(path.read_text())["project"]
        lists = [project.get("dependencies", [])]
        lists += project.get("optional-dependencies", {}).values()
        for reqs in lists:
            for text in reqs:
                req = Requirement(text)
                if not canonicalize_name(req.name).startswith(OWN_PREFIX):
                    found.append((str(path.relative_to(REPO)), req))
    return found


def applies_here(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate()


def test_every_requirement_has_a_floor_and_a_ceiling() -> None:
    missing = [
        f"{where}: {req}"
        for where, req in requirements()
        if not {">=", "<"} <= {spec.operator for spec in req.specifier}
    ]
    assert not missing, "requirements without both >= and <:\n" + "\n".join(missing)


def test_lock_pins_every_requirement_inside_its_range() -> None:
    pins = locked()
    problems = []
    for where, req in requirements():
        name = canonicalize_name(req.name)
        if not applies_here(req):
            continue
        if name not in pins:
            problems.append(f"{where}: {req} is not in the lock (run `make lock`)")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{where}: {req} does not allow the locked {name}=={pins[name]}")
    assert not problems, "\n".join(problems)


def test_lock_is_sorted_and_leaves_out_the_projects_own_packages() -> None:
    names = list(locked())
    assert names == sorted(names)
    assert not [n for n in names if n.startswith(OWN_PREFIX)]


def test_the_suite_runs_on_the_locked_versions() -> None:
    """What CI tests is what the lock says: `make install` installed through it."""
    differ = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ.append(f"{name}: locked {version}, not installed")
            continue
        if Version(installed) != Version(version):
            differ.append(f"{name}: locked {version}, installed {installed}")
    assert not differ, "this environment is not the lock's (run `make install`):\n" + "\n".join(
        differ
    )


def make_dry_run(target: str) -> list[str]:
    """The commands `make TARGET` would run (all of them: -B ignores the install stamp)."""
    make = shutil.which("make")
    assert make, "make is needed to build and test this project"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    out = subprocess.run(
        [make, "--no-print-directory", "-n", "-B", target],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.splitlines()


def index_of(lines: list[str], needle: str) -> int:
    hits = [i for i, line in enumerate(lines) if needle in line]
    assert hits, f"no command with {needle!r} in:\n" + "\n".join(lines)
    return hits[0]


def test_make_install_installs_through_the_lock() -> None:
    lines = make_dry_run("install")
    pip = lines[index_of(lines, "pip install")]
    assert f"-c {LOCK.relative_to(REPO)}" in pip
    assert "-e '.[dev]'" in pip
    for path in PYPROJECTS[1:]:
        assert f"-e {path.parent.relative_to(REPO)}" in pip


def test_make_test_lints_then_runs_every_tier_on_the_lock() -> None:
    lines = make_dry_run("test")
    fmt = index_of(lines, "ruff format --check")
    check = index_of(lines, "ruff check")
    mypy = index_of(lines, "mypy inference_server")
    pytest_line = index_of(lines, "-m pytest")
    assert max(fmt, check, mypy) < pytest_line, "make test must lint before pytest"
    command = lines[pytest_line]
    assert " -m " not in command.split("-m pytest", 1)[1], "make test must run every tier"
    assert f"PIP_CONSTRAINT={LOCK}" in command  # pip run by a test (tests/thirdparty) too


@pytest.mark.parametrize("target", ["test", "test-fast", "test-latest", "lint", "lock"])
def test_readme_documents_the_targets(target: str) -> None:
    assert f"make {target} " in (REPO / "README.md").read_text()


def test_ci_runs_exactly_make_test() -> None:
    script = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [
        line.strip()
        for line in script
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]
