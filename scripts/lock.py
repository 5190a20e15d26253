"""Write requirements/constraints.txt: exact pins of everything `make install` installs.

Why this way: pip's own resolver decides, exactly as it does for `make install` (the same
requirements in one command: the core with its dev and test extras and every plugin), but in
`--dry-run --report` mode, so nothing is installed and no extra tool (pip-tools) is needed. The
resolution runs in a throwaway venv made by the interpreter that runs this script (the one
`make install` makes .venv with), with `--ignore-installed`, so what is installed anywhere does
not matter and the old lock is not consulted: every package gets its newest release that the
pyproject ranges allow. The project's own distributions are left out: they come from the work
tree, never from an index (where an unrelated 'inference-server' exists).

Usage: python scripts/lock.py OUTPUT REQUIREMENT... (the Makefile's `make lock` passes them).
       python scripts/lock.py --diff LOCK   (`make test-latest`: which installed versions, in
       the running interpreter's environment, differ from the lock, so a failure there names
       the release that caused it)
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import venv
from importlib import metadata
from pathlib import Path

HEADER = """\
# Exact versions of every package `make install` installs: the core's runtime, test and dev
# extras and every plugin's dependencies (the project's own packages are not listed).
# `make install` (hence CI) installs with `-c` this file; `make lock` rewrites it.
# Resolved for CPython {python} on {system} by pip {pip}: do not edit by hand.
"""


def canonical(name: str) -> str:
    """PEP 503 normalised name, so the file sorts and diffs the same whatever a wheel says."""
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(requirements: list[str]) -> dict[str, object]:
    """pip's installation report for `requirements`, resolved from scratch in a throwaway venv."""
    with tempfile.TemporaryDirectory(prefix="inference-server-lock-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                str(env_dir / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                *requirements,
            ],
            check=True,
        )
        loaded: dict[str, object] = json.loads(report.read_text())
        return loaded


def pins(report: dict[str, object]) -> list[str]:
    """`name==version` for every resolved distribution that comes from an index, sorted."""
    installs = report["install"]
    assert isinstance(installs, list)
    versions = {}
    for item in installs:
        if "dir_info" in item["download_info"]:  # one of the project's own (editable) packages
            continue
        meta = item["metadata"]
        versions[canonical(meta["name"])] = meta["version"]
    return [f"{name}=={versions[name]}" for name in sorted(versions)]


def read_lock(path: Path) -> dict[str, str]:
    """The lock's pins as {canonical name: version}."""
    locked = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            locked[canonical(name)] = version
    return locked


def diff(lock: Path) -> int:
    """Print how this environment's distributions differ from the lock (always succeeds)."""
    locked = read_lock(lock)
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    changed = [
        f"  {name} {locked[name]} -> {installed[name]}"
        for name in sorted(locked)
        if name in installed and installed[name] != locked[name]
    ]
    added = [
        f"  {name} {v} (not in the lock)"
        for name, v in sorted(installed.items())
        if name not in locked
        and not name.startswith("inference-server")
        and name not in ("pip", "setuptools", "wheel")
    ]
    if changed or added:
        print(f"versions that differ from {lock}:", *changed, *added, sep="\n")
    else:
        print(f"every locked package is at its locked version ({lock})")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--diff":
        return diff(Path(argv[1]))
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    output, requirements = Path(argv[0]), argv[1:]
    report = resolve(requirements)
    locked = pins(report)
    if not locked:
        print("lock: pip resolved nothing; refusing to write an empty lock", file=sys.stderr)
        return 1
    header = HEADER.format(
        python=".".join(map(str, sys.version_info[:2])),
        system=platform.system(),
        pip=report.get("pip_version", "?"),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(header + "\n".join(locked) + "\n")
    print(f"lock: {len(locked)} packages pinned in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
