"""The Dockerfile's inputs agree with the project: every plugin is in the image, its dependencies
are the lock's, and ``make test`` prepares the container tier.

Why: the image installs dependencies in a layer built from the pyprojects alone (so a code change
does not reinstall them); a plugin added to plugins/ but not to the Dockerfile's lists would be
missing from the image without any build error, and a dependency outside the lock would make the
offline build (``make wheels``) fail only on a fresh machine.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.runtime_requirements import runtime_requirements
from tests.unit.test_dependencies import index_of, locked, make_dry_run

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PLUGINS = sorted(p.parent.name for p in REPO.glob("plugins/*/pyproject.toml"))


def test_every_plugin_is_installed_in_the_image() -> None:
    copied = re.findall(r"^COPY plugins/([^/]+)/pyproject\.toml ", DOCKERFILE, re.M)
    assert sorted(copied) == PLUGINS
    install = re.search(r"pip install -q --no-deps \.(.*?);", DOCKERFILE, re.S)
    assert install
    listed = re.findall(r"plugins/([A-Za-z0-9_-]+)", install.group(1))
    assert sorted(listed) == PLUGINS


def test_runtime_requirements_are_locked_and_leave_out_the_projects_own() -> None:
    reqs = runtime_requirements([REPO / "pyproject.toml", *REPO.glob("plugins/*/pyproject.toml")])
    names = {canonicalize_name(Requirement(r).name) for r in reqs}
    assert "aiohttp" in names
    assert "jinja2" in names  # the triton plugin's own dependency
    assert not any(n.startswith("inference-server") for n in names)
    assert names <= locked().keys()
    # Test and dev tools stay out of the image.
    assert not names & {"pytest", "mypy", "ruff", "openai", "kubernetes-validate"}


def test_make_test_prepares_the_container_tier() -> None:
    lines = make_dry_run("test")
    assert index_of(lines, "container-base.sh") < index_of(lines, "-m pytest")
    wheel = lines[index_of(lines, "pip wheel")]
    assert "-w wheels" in wheel
    assert "-c requirements/constraints.txt" in wheel
