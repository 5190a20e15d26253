"""Print the runtime requirements of the core and every plugin, one per line.

Why: the image installs only what the gateway needs at run time (not the test and dev extras the
lock also pins), and it installs them in a layer of its own, before the source is copied, so a
change to the code does not reinstall every dependency. Both need the list without installing the
project: it is read here from the pyproject files (the project's own distributions are left out;
they are built from the source afterwards). `make wheels` uses the same list.

Usage: python scripts/runtime_requirements.py PYPROJECT...
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def own_name(requirement: str) -> str:
    """The distribution name a requirement string starts with, PEP 503 normalised."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""


def runtime_requirements(pyprojects: list[Path]) -> list[str]:
    projects = [tomllib.loads(p.read_text())["project"] for p in pyprojects]
    ours = {own_name(p["name"]) for p in projects}
    out: list[str] = []
    for project in projects:
        for req in project.get("dependencies", []):
            if own_name(req) not in ours and req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for req in runtime_requirements([Path(a) for a in argv]):
        print(req)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
