"""CPU instructions per request, counted by valgrind (callgrind): a noise-free cost ratio.

The timing arms of bench.py move by several percent from run to run on a shared 2-core
machine.  Instructions do not: the same server, request and environment execute the same
instructions whatever else the machine is doing (repeatable to ~0.1 % here).  So this script
answers "what does this feature cost per request?" exactly, as a ratio to the bare aiohttp
pass-through and to the plain gateway arm of the same run.  Instructions are not time (a cache
miss or a syscall's kernel work is not in them), so the timing arms stay the budget's measure;
this one tells which change moved them.

Each arm's server runs under ``valgrind --tool=callgrind --instr-atstart=no`` (near native speed
until instrumented), gets a warm-up of requests, then ``callgrind_control -i on``, exactly N
requests from 8 concurrent keep-alive connections (so the server batches as it does under
load), ``-i off``, a dump.  Every thread of the server counts (the log writer included); the
client runs outside valgrind.

    .venv/bin/python bench/instructions.py [--requests 2000] [--only gateway,gateway-keys]

Writes a table to stdout (and ``--out`` if given).  Needs valgrind (Debian ``valgrind``) and
nginx (the canned upstream, as in bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

# The repository, not this folder, first: ``bench`` is then the folder and bench.bench the harness.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench import bench  # noqa: E402 (the same arms, settings and upstream as the timing run)

ARMS = (
    "passthrough",
    "gateway",
    "gateway-nometrics",
    "gateway-routed",
    "gateway-cache-hit",
    "gateway-cache-miss",
    "gateway-keys",
    "gateway-keys-redis",
)
WARMUP = 300
CONCURRENCY = 8


async def drive(url: str, n: int, cache_control: str) -> int:
    """Send exactly n chat requests over CONCURRENCY keep-alive connections; return errors."""
    headers = {"Content-Type": "application/json", "Authorization": bench.AUTH}
    if cache_control:
        headers["Cache-Control"] = cache_control
    body = bench.CHAT_BODY.encode()
    left, errors = n, 0
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 200

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return errors


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def total_instructions(out_prefix: Path) -> int:
    """Sum the ``summary:``/``totals:`` lines of every dump callgrind wrote for the process."""
    total = 0
    for part in out_prefix.parent.glob(out_prefix.name + "*"):
        for line in part.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
    return total


def measure(
    procs: bench.Processes, target: bench.Target, out_prefix: Path, n: int, cache_control: str
) -> int:
    """Instructions per request of the target's server (started under callgrind)."""
    url = target.origin + "/v1/chat/completions"
    bench.wait_ready(target.origin + "/", procs, target.proc, timeout=300)
    if asyncio.run(drive(url, WARMUP, cache_control)):
        raise RuntimeError(f"{target.arm}: warm-up requests failed")
    assert target.pid is not None
    control(target.pid, "-i", "on")
    errors = asyncio.run(drive(url, n, cache_control))
    control(target.pid, "-i", "off")
    control(target.pid, "-d")
    time.sleep(0.5)  # the dump is written by the target between two of its own steps
    if errors:
        raise RuntimeError(f"{target.arm}: {errors} of {n} requests failed")
    return total_instructions(out_prefix) // n


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    wanted = [a for a in ARMS if a in args.only.split(",")]
    if "passthrough" not in wanted:
        wanted.insert(0, "passthrough")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install valgrind)", file=sys.stderr)
            return 2
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    results: dict[str, int] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp:
        workdir = Path(tmp)
        procs = bench.Processes(workdir, pin=False)
        try:
            up = bench.free_port()
            sink = workdir / bench.SINK_LOG
            bench.start_nginx(procs, workdir, "nginx-upstream", bench.upstream_servers(up, sink))
            origin = f"http://127.0.0.1:{up}"
            bench.wait_ready(origin + "/", procs, "nginx-upstream")
            real = bench.find_gateway()
            for arm in wanted:
                out = workdir / f"{arm}.callgrind"
                prefix = (*valgrind, f"--callgrind-out-file={out}")
                if arm == "passthrough":
                    port = bench.free_port()
                    script = bench.HERE / "passthrough.py"
                    argv = [*prefix, sys.executable, str(script), "--port", str(port)]
                    pid = procs.start(arm, [*argv, "--upstream", origin])
                    target = bench.Target(arm, f"http://127.0.0.1:{port}", pid, arm)
                else:
                    if real.argv is None or real.python is None:
                        notes.append(f"{arm}: {real.label}")
                        continue
                    gateway = bench.Gateway((*prefix, *real.argv), real.label, real.python)
                    cfg = bench.Config(
                        rounds=1, duration=1, only=frozenset({arm}), pin=False, stream_chunks=0,
                        stream_interval_ms=0.0, out=workdir / "unused.md", quick=True, argv=(),
                    )  # fmt: skip
                    if arm == "gateway":
                        found = bench.start_gateway(procs, gateway, arm, arm, origin, 1)
                        targets = {arm: found} if found is not None else {}
                    else:
                        targets = bench.start_feature_arms(cfg, procs, gateway, origin, notes)
                    if arm not in targets:
                        continue
                    target = targets[arm]
                cache_control = bench.ARM_CACHE_CONTROL.get(arm, "")
                try:
                    results[arm] = measure(procs, target, out, args.requests, cache_control)
                except (RuntimeError, subprocess.CalledProcessError) as exc:
                    notes.append(f"{arm} left out: {exc}")
                finally:
                    procs.stop(target.proc)
                bench.say(f"{arm}: {results.get(arm, 'failed')} instructions per request")
        finally:
            procs.stop()
    report = render(results, args.requests, notes)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0 if "passthrough" in results else 1


def render(results: dict[str, int], n: int, notes: list[str]) -> str:
    base = results.get("passthrough")
    gateway = results.get("gateway")
    lines = [
        f"Instructions per request (callgrind, {n} requests after {WARMUP} warm-up, "
        f"{CONCURRENCY} connections; every thread of the server counted).",
        "",
        "| arm | instructions / request | pass-through ÷ arm | gateway ÷ arm |",
        "|---|---|---|---|",
    ]
    for arm, count in results.items():
        vs_base = f"{base / count:.2f}" if base else "-"
        vs_gateway = f"{gateway / count:.2f}" if gateway and arm != "passthrough" else "-"
        lines.append(f"| {arm} | {count:,} | {vs_base} | {vs_gateway} |")
    lines.append("")
    lines.append(
        "A ratio above 1 means the arm costs fewer instructions than the baseline; "
        "`pass-through ÷ gateway` is the instruction-count counterpart of the saturation ratio."
    )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
