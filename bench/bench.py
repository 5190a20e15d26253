"""Benchmark harness: measure what the gateway adds on top of the unavoidable.

One run starts every arm (direct upstream, nginx proxy, bare aiohttp
pass-through, the gateway, optionally LiteLLM) against the same local
upstreams, then measures them in interleaved rounds (every arm once per round,
order rotated) so that drift on a shared 2-core machine hits all arms alike.
Numbers are medians over rounds with their spread; "added" numbers are paired
per round against the direct arm. The report goes to stdout and --out. Nothing
here asserts on timings: it is a measuring tool, not a test.

Run it through bench/run.sh, which installs nginx, wrk and Go first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "bench"
AUTH = "Bearer sk-bench"
BASELINES = ("direct", "passthrough")  # every ratio needs them, so they always run
REQUIRED_SERVERS = ("nginx-", "stream-upstream", "passthrough-")  # their death ends the run
SERVER_CPU, LOADGEN_CPU = ("taskset", "-c", "1"), ("taskset", "-c", "0")  # for --pin
_MESSAGES = [{"role": "user", "content": "Say hello."}]
# "user" is the key of gateway-routed's sticky A/B assignment; every arm gets the same bytes
CHAT_BODY = json.dumps(
    {"model": "bench-model", "messages": _MESSAGES, "max_tokens": 16, "user": "bench-user"}
)
STREAM_BODY = json.dumps(
    {"model": "bench-model", "messages": _MESSAGES, "max_tokens": 16, "stream": True}
)
_COMPACT = (",", ":")
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    },
    separators=_COMPACT,
)
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "bench-model", "object": "model"}]},
    separators=_COMPACT,
)


Stats = dict[str, float]
K = TypeVar("K")
# Gateway arms that differ from "gateway" (production defaults) in one feature each; they run
# the closed-loop measures only and are reported against the gateway arm, paired per round.
FEATURE_ARMS = {
    "gateway-routed": (
        "routing",
        "model table: weighted route over 2 lmstudio providers (same upstream) + a fallback "
        "route; A/B experiment on bench-model, sticky by `user`",
    ),
    "gateway-nometrics": ("metrics off", "`INFERENCE_METRICS__ENABLED=false`"),
    "gateway-trace-1.0": (
        "tracing, 100 % sampled",
        "`OTEL_TRACES_EXPORTER=otlp` (http/protobuf to a local nginx sink), "
        "`parentbased_traceidratio` 1.0",
    ),
    "gateway-trace-0.1": ("tracing, 10 % sampled", "the same with sampler argument 0.1"),
    "gateway-cache-hit": (
        "response cache, hits",
        "`INFERENCE_CACHE__ENABLED=true` (memory): every request after the first is a hit",
    ),
    "gateway-cache-miss": (
        "response cache, misses",
        "the same, every request with `Cache-Control: max-age=0`: looked up, missed, sent "
        "upstream, stored again",
    ),
    "gateway-keys": (
        "keys + limits (memory)",
        "`auth.enabled`, the bench key (key_sha256) with rpm, tpm, max_parallel and a budget, "
        "`limits.global` and `limits.models.bench-model`; `state.backend: memory`",
    ),
    "gateway-keys-redis": (
        "keys + limits (Redis)",
        "the same with `state.backend: redis` (a local redis-server on loopback): one Lua "
        "script per admission; settlements batched, one script call per 5 ms",
    ),
}
#: Extra request headers of an arm (post.lua sends BENCH_CACHE_CONTROL as Cache-Control).
ARM_CACHE_CONTROL = {"gateway-cache-miss": "max-age=0"}
CHAT_ARMS = ("direct", "nginx", "passthrough", "gateway", *FEATURE_ARMS, "gateway-w2", "litellm")
# WebSocket measures (bench/ws_bench.py) on the gateway arm's streaming process: no own process.
WS_ARM = "gateway-ws"
WS_SOCKETS = 1000  # idle sockets opened for the memory-per-socket measure
CLOSED_LOOP_ONLY = frozenset({"gateway-w2", *FEATURE_ARMS})
STREAM_ARMS = ("direct", "nginx", "passthrough", "gateway", "litellm")
RATE_FRACTIONS = (0.25, 0.5, 0.75)
STREAM_CONCURRENCY = (1, 64)
SAT_CONNS = 32
RSS_FLAT_MB = 5.0  # growth first->last round still called "flat" (allocator noise)
SINK_LOG = "otlp-sink.log"  # the upstream nginx's log of OTLP exports (tracing arms)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on, fixed after argument parsing."""

    rounds: int
    duration: int
    only: frozenset[str]
    pin: bool
    stream_chunks: int
    stream_interval_ms: float
    out: Path
    quick: bool
    argv: tuple[str, ...]


def _lists() -> defaultdict[Any, list[Stats]]:
    return defaultdict(list)


@dataclasses.dataclass
class Results:
    """Raw samples; every list holds one entry per round, in round order."""

    latency: dict[str, list[Stats]] = dataclasses.field(default_factory=_lists)
    saturation: dict[str, list[Stats]] = dataclasses.field(default_factory=_lists)
    open_loop: dict[tuple[str, float], list[Stats]] = dataclasses.field(default_factory=_lists)
    stream: dict[tuple[str, int], list[Stats]] = dataclasses.field(default_factory=_lists)
    rss_idle: dict[str, float] = dataclasses.field(default_factory=dict)
    rss_peak: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    rss_after: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    rates: dict[float, float] = dataclasses.field(default_factory=dict)
    #: The pass-through's open-loop capacity (req/s) the rates are fractions of, per measurement.
    open_capacity: list[float] = dataclasses.field(default_factory=list)
    first_error: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: gateway-ws: TTFT pairs (WebSocket against SSE) per round, and one idle-memory measure.
    websocket: list[Stats] = dataclasses.field(default_factory=list)
    ws_memory: Stats = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Target:
    """A running arm: where to send requests and whose process tree to weigh."""

    arm: str
    origin: str
    pid: int | None = None
    proc: str = ""  # name in Processes, for servers the harness started
    cache_control: str = ""  # the Cache-Control header its requests carry (none: "")

    def url(self, path: str = "/v1/chat/completions") -> str:
        """Return the full URL of a request path on this arm."""
        return self.origin + path


def say(msg: str) -> None:
    """Print progress to stderr, so stdout stays the report."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- processes


class Processes:
    """Own every server the run starts, so one finally-block tears all down.

    Each child gets its own session (Ctrl-C reaches only the harness, which then
    stops children in order) and is killed by process group, which also takes
    any workers it forked. With pin=True servers run on CPU 1 only.
    """

    def __init__(self, workdir: Path, pin: bool) -> None:
        """Log files go to workdir."""
        self.workdir = workdir
        self.pin = pin
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
        """Start a server with its output in <workdir>/<name>.log; return its pid."""
        # setpriv: the child gets SIGTERM should the harness die without cleaning up
        cmd = ["setpriv", "--pdeathsig", "TERM", *(SERVER_CPU if self.pin else ()), *argv]
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )
        self.children.append((name, proc))
        return proc.pid

    def dead(self) -> dict[str, str]:
        """Map every server that has exited to its exit code and log tail."""
        out = {}
        for name, proc in self.children:
            if proc.poll() is not None:
                log = (self.workdir / f"{name}.log").read_text(errors="replace")
                tail = " / ".join([ln.strip() for ln in log.splitlines() if ln.strip()][-2:])
                out[name] = f"{name} exited with {proc.returncode}; log ends: {tail}"
        return out

    def stop(self, only: str | None = None) -> None:
        """SIGTERM the process groups (all, or the one named), allow 5 s, then SIGKILL."""
        chosen = [(n, p) for n, p in self.children if only in (None, n)]
        for _, proc in reversed(chosen):
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in chosen:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.children = [c for c in self.children if c not in chosen]


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """Pick an unused 127.0.0.1 port, never the same twice in a run.

    Racy until the server binds it; a server that loses the race dies and readiness
    catches that. Remembering the ports handed out stops two arms (a dozen servers
    start at once) from being given the same one.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def wait_ready(url: str, procs: Processes, name: str, timeout: float = 90.0) -> None:
    """Poll url until it answers 200; fail fast if the server named has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if error := procs.dead().get(name):
            raise RuntimeError(error)
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def tree_pids(pid: int) -> list[int]:
    """Return pid and all its descendants (the gateway's worker processes)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                children[int(stat[stat.rindex(")") + 2 :].split()[1])].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def rss_mb(pids: Sequence[int]) -> float:
    """Sum VmRSS over pids, in MB.

    Pages shared between workers count once per process, so with --workers
    this overstates the footprint; it is what process monitors show.
    """
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


# ----------------------------------------------------------------------- servers


def start_nginx(procs: Processes, workdir: Path, name: str, servers: str) -> None:
    """Run one foreground nginx with its own pid file, logs and temp paths."""
    base = workdir / name
    temp = ""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (base / sub).mkdir(parents=True)
        (base / sub).chmod(0o777)  # workers drop to 'nobody' when started as root
        temp += f"    {sub}_temp_path {base / sub};\n"
    conf = base / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type application/json;
    keepalive_requests 1000000;
{temp}{servers}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    procs.start(name, [nginx, "-p", str(base), "-c", str(conf), "-e", "stderr"])


def upstream_servers(port: int, sink_log: Path) -> str:
    """Describe the fixed-response upstream: nginx 'return 200' costs ~nothing.

    It is also the tracing arms' OTLP/HTTP sink: any path ending in /v1/traces answers 200
    with an empty body (an empty ExportTraceServiceResponse) and logs path, status and size,
    so the report can show that exports arrived and were accepted.
    """
    return f"""
    log_format otlp_sink '$uri $status $content_length';
    server {{
        listen 127.0.0.1:{port};
        location = / {{ return 200 '{{"message":"Ok"}}'; }}
        location ~ /v1/traces$ {{
            client_max_body_size 0;
            default_type application/x-protobuf;
            access_log {sink_log} otlp_sink;
            return 200 '';
        }}
        location ~ /chat/completions$ {{ return 200 '{COMPLETION}'; }}
        location ~ /models$ {{ return 200 '{MODELS}'; }}
        location / {{ return 404; }}
    }}"""


def proxy_server(name: str, port: int, upstream: int, buffering: str) -> str:
    """Describe nginx as keepalive reverse proxy: the compiled-proxy reference."""
    return f"""
    upstream {name} {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering {buffering};
        }}
    }}"""


@dataclasses.dataclass(frozen=True)
class Gateway:
    """How to start the gateway (argv template), or why it cannot be started."""

    argv: tuple[str, ...] | None
    label: str
    python: Path | None = None  # set for the real gateway only: the feature arms need it


def find_gateway() -> Gateway:
    """Use BENCH_GATEWAY_CMD if set, else .venv if it imports inference_server.

    The override is a command template with {python} {repo} {port} {origin}
    {base_url} and optionally {workers} (without it the 2-worker arm is
    skipped). A gateway that is missing is reported missing, never faked.
    """
    override = os.environ.get("BENCH_GATEWAY_CMD", "").strip()
    if override:
        return Gateway(tuple(shlex.split(override)), f"stand-in: {override}")
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        return Gateway(None, "missing (no .venv/bin/python)")
    probe = [str(python), "-c", "import inference_server"]
    if subprocess.run(probe, cwd=REPO, capture_output=True, timeout=60, check=False).returncode:
        return Gateway(None, "missing (.venv/bin/python cannot import inference_server)")
    argv = f"{python} -m inference_server --host 127.0.0.1 --port {{port}} --workers {{workers}}"
    return Gateway(tuple(argv.split()), "inference_server from .venv", python)


def gateway_env(origin: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gateway's environment: production defaults, provider lmstudio at origin.

    Inherited INFERENCE_* and OTEL_* variables are dropped, so the gateway arm really runs
    with production defaults (metrics on, tracing off); extra adds a feature arm's changes.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_", "OTEL_"))}
    env |= {
        "INFERENCE_INFERENCE_PROVIDER": "lmstudio",
        "INFERENCE_INFERENCE_BASE_URL": origin + "/v1",
        "INFERENCE_INFERENCE_DEFAULT_MODEL": "bench-model",
        "INFERENCE_LOGGING_LEVEL": "info",
        "RUN_ENV": "production",
    }
    return env | dict(extra or {})


def start_gateway(
    procs: Processes,
    gateway: Gateway,
    arm: str,
    name: str,
    origin: str,
    workers: int,
    *,
    extra_env: Mapping[str, str] | None = None,
    config: Path | None = None,
) -> Target | None:
    """Start the gateway (or stand-in) on a free port; None if it cannot run so.

    extra_env and config (a --config settings file) configure a feature arm.
    """
    if gateway.argv is None:
        return None
    template = list(gateway.argv)
    if "{workers}" not in " ".join(template):
        if workers > 1:
            return None
    elif workers == 1 and "--workers" in template:  # production default: no flag
        del template[template.index("--workers") : template.index("--workers") + 2]
    port = free_port()
    values = {
        "{python}": sys.executable,
        "{repo}": str(REPO),
        "{port}": str(port),
        "{origin}": origin,
        "{base_url}": origin + "/v1",
        "{workers}": str(workers),
    }

    def fill(part: str) -> str:
        for key, value in values.items():
            part = part.replace(key, value)
        return part

    argv = [fill(part) for part in template]
    if config is not None:
        argv += ["--config", str(config)]
    env = gateway_env(origin, extra_env)
    return Target(arm, f"http://127.0.0.1:{port}", procs.start(name, argv, env), name)


def effective_settings(gateway: Gateway, origin: str) -> dict[str, Any]:
    """The gateway arm's effective settings (`--print-config` under the same environment)."""
    if gateway.python is None:
        raise RuntimeError("this arm needs the real gateway")
    argv = [str(gateway.python), "-m", "inference_server", "--print-config"]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=gateway_env(origin),
        cwd=REPO,
        timeout=120,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"--print-config failed: {proc.stderr.strip()[-500:]}")
    tree: dict[str, Any] = json.loads(proc.stdout)
    tree.pop("env", None)
    return tree


def keys_settings(gateway: Gateway, workdir: Path, origin: str, redis_url: str | None) -> Path:
    """gateway-keys(-redis): the gateway arm's settings plus keys and limits that never bind.

    Every limit kind is on (so every admission runs the whole check: key, model and global
    scopes, rpm + tpm, a concurrency slot, the budget), with values far above what the bench
    can send, so every request is admitted and the arms measure the cost, not refusals.
    """
    tree = effective_settings(gateway, origin)
    digest = hashlib.sha256(AUTH.removeprefix("Bearer ").encode()).hexdigest()
    huge = {"rpm": 1_000_000_000, "tpm": 1_000_000_000, "max_parallel": 100_000}
    tree["auth"] = {
        "enabled": True,
        "keys": {
            "bench": {
                "key_sha256": digest,
                **huge,
                "budget": {"tokens": 10**15, "period": "month"},
            }
        },
    }
    tree["limits"] = {"global": huge, "models": {"bench-model": huge}}
    if redis_url is not None:
        tree["state"] = {**tree.get("state", {}), "backend": "redis", "redis_url": redis_url}
    path = workdir / ("gateway-keys-redis.yaml" if redis_url else "gateway-keys.yaml")
    path.write_text(json.dumps({"default": tree}, indent=2))
    return path


def start_redis(procs: Processes) -> str:
    """A redis-server for gateway-keys-redis on a free loopback port (no persistence)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    procs.start("redis", argv)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not answer PING within 10 s")
        time.sleep(0.05)


def routed_settings(gateway: Gateway, workdir: Path, origin: str) -> Path:
    """Write gateway-routed's settings file: the gateway arm's settings plus a routing table.

    The base is the gateway arm's effective settings, as `--print-config` shows them under
    the same environment (settings.yaml with its production section), so the two arms differ
    in providers, models and experiments only. Two provider instances reach the same upstream;
    the public name bench-model is an A/B experiment (sticky by the body's `user`) whose
    variants both use a weighted route of the two, with a fallback route behind it.
    """
    tree = effective_settings(gateway, origin)
    base_url = origin + "/v1"
    tree["providers"] = {
        "bench-a": {"plugin": "lmstudio", "base_url": base_url},
        "bench-b": {"plugin": "lmstudio", "base_url": base_url},
    }
    tree["models"] = {
        "bench-route": {
            "strategy": "weighted",
            "deployments": [
                {"provider": "bench-a", "upstream_model": "bench-model", "weight": 50},
                {"provider": "bench-b", "upstream_model": "bench-model", "weight": 50},
            ],
            "fallbacks": ["bench-fallback"],
        },
        "bench-fallback": {"provider": "bench-a", "upstream_model": "bench-model-fallback"},
    }
    tree["experiments"] = {
        "bench-ab": {
            "model": "bench-model",
            "key": "user",
            "variants": {
                "control": {"model": "bench-route", "weight": 50},
                "treatment": {"model": "bench-route", "weight": 50},
            },
        }
    }
    path = workdir / "gateway-routed.yaml"  # JSON is YAML
    path.write_text(json.dumps({"default": tree}, indent=2))
    return path


def trace_env(sink: str, ratio: str) -> dict[str, str]:
    """The standard OTEL_* variables for OTLP/HTTP export to sink (telemetry.resolve())."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink,  # the exporter appends /v1/traces
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": ratio,
    }


def start_feature_arms(
    cfg: Config, procs: Processes, gateway: Gateway, origin: str, notes: list[str]
) -> dict[str, Target]:
    """Start the selected feature arms against the chat upstream (real gateway only)."""
    wanted = [arm for arm in FEATURE_ARMS if arm in cfg.only]
    if not wanted or gateway.argv is None:
        return {}
    if gateway.python is None:
        notes.append(f"{', '.join(wanted)} skipped: they need the real gateway, not a stand-in")
        return {}
    out: dict[str, Target] = {}
    for arm in wanted:
        config, extra = None, {}
        if arm == "gateway-routed":
            try:
                config = routed_settings(gateway, procs.workdir, origin)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                notes.append(f"{arm} left out: {exc}")
                continue
        elif arm == "gateway-nometrics":
            extra = {"INFERENCE_METRICS__ENABLED": "false"}
        elif arm.startswith("gateway-cache-"):
            extra = {"INFERENCE_CACHE__ENABLED": "true"}
        elif arm.startswith("gateway-keys"):
            try:
                redis_url = start_redis(procs) if arm == "gateway-keys-redis" else None
                config = keys_settings(gateway, procs.workdir, origin, redis_url)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                notes.append(f"{arm} left out: {exc}")
                continue
        else:  # gateway-trace-<ratio>: a path per arm, so the sink's log tells them apart
            extra = trace_env(f"{origin}/{arm}", arm.removeprefix("gateway-trace-"))
        target = start_gateway(procs, gateway, arm, arm, origin, 1, extra_env=extra, config=config)
        if target is not None:
            target.cache_control = ARM_CACHE_CONTROL.get(arm, "")
            out[arm] = target
    return out


def start_litellm(procs: Processes, name: str, origin: str) -> Target | None:
    """Start LiteLLM proxy, one worker, routing an openai/ model to our upstream."""
    exe = REPO / ".venv-litellm" / "bin" / "litellm"
    if not exe.exists():
        return None
    conf = procs.workdir / f"{name}.yaml"
    conf.write_text(
        "model_list:\n  - model_name: bench-model\n    litellm_params:\n"
        f"      model: openai/bench-model\n      api_base: {origin}/v1\n"
        "      api_key: sk-upstream\ngeneral_settings:\n  master_key: sk-bench\n"
    )
    port = free_port()
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    argv = f"{exe} --config {conf} --host 127.0.0.1 --port {port} --num_workers 1"
    pid = procs.start(name, argv.split(), env)
    return Target("litellm", f"http://127.0.0.1:{port}", pid, name)


def start_all(
    cfg: Config, procs: Processes, gateway: Gateway, notes: list[str]
) -> tuple[dict[str, Target], dict[str, Target]]:
    """Start both upstreams and every selected arm; return chat and stream targets.

    A gateway or LiteLLM that fails to come up is stopped and left out (with
    its log tail in the notes) so the other arms still get measured.
    """
    up, stream_up, px_chat, px_stream = (free_port() for _ in range(4))
    sink_log = procs.workdir / SINK_LOG
    start_nginx(procs, procs.workdir, "nginx-upstream", upstream_servers(up, sink_log))
    script = HERE / "stream_upstream.py"
    procs.start(
        "stream-upstream",
        f"{sys.executable} {script} --port {stream_up} --chunks {cfg.stream_chunks} "
        f"--interval-ms {cfg.stream_interval_ms}".split(),
    )
    origins = {
        "chat": f"http://127.0.0.1:{up}",
        "stream": f"http://127.0.0.1:{stream_up}",
    }
    arms: dict[str, dict[str, Target]] = {
        "chat": {"direct": Target("direct", origins["chat"], proc="nginx-upstream")},
        "stream": {"direct": Target("direct", origins["stream"], proc="stream-upstream")},
    }
    if "nginx" in cfg.only:
        servers = proxy_server("chat_up", px_chat, up, "on")
        servers += proxy_server("stream_up", px_stream, stream_up, "off")
        start_nginx(procs, procs.workdir, "nginx-proxy", servers)
        arms["chat"]["nginx"] = Target("nginx", f"http://127.0.0.1:{px_chat}", proc="nginx-proxy")
        px_stream_url = f"http://127.0.0.1:{px_stream}"
        arms["stream"]["nginx"] = Target("nginx", px_stream_url, proc="nginx-proxy")
    for kind, origin in origins.items():
        port = free_port()
        script = HERE / "passthrough.py"
        argv = f"{sys.executable} {script} --port {port} --upstream {origin}"
        name = f"passthrough-{kind}"
        pid = procs.start(name, argv.split())
        arms[kind]["passthrough"] = Target("passthrough", f"http://127.0.0.1:{port}", pid, name)
        gw = None
        if "gateway" in cfg.only:
            gw = start_gateway(procs, gateway, "gateway", f"gateway-{kind}", origin, 1)
        if gw:
            arms[kind]["gateway"] = gw
        if "litellm" in cfg.only and (ll := start_litellm(procs, f"litellm-{kind}", origin)):
            arms[kind]["litellm"] = ll
    w2 = "gateway-w2" in cfg.only and not cfg.pin
    if w2 and (gw := start_gateway(procs, gateway, "gateway-w2", "gateway-w2", origins["chat"], 2)):
        arms["chat"]["gateway-w2"] = gw
    arms["chat"] |= start_feature_arms(cfg, procs, gateway, origins["chat"], notes)
    for kind, targets in arms.items():
        for arm, target in list(targets.items()):
            ready = "/health/liveliness" if arm == "litellm" else "/"
            try:
                wait_ready(target.origin + ready, procs, target.proc)
            except RuntimeError as exc:
                if arm in BASELINES or arm == "nginx":
                    raise
                notes.append(f"{arm} ({kind}) left out, it did not start: {exc}")
                say(notes[-1])
                procs.stop(target.proc)
                del targets[arm]
    return arms["chat"], arms["stream"]


# ----------------------------------------------------------------------- load tools


def wrk(
    cfg: Config, url: str, conns: int, weigh: int | None = None, cache_control: str = ""
) -> tuple[Stats, float]:
    """Closed-loop load with wrk; one thread, so the servers keep the other core.

    Returns wrk's summary and the peak RSS (MB) of the weigh pid's tree during it
    (the tree is listed once, before the load, to keep sampling cheap).
    """
    pids = tree_pids(weigh) if weigh is not None else []
    lua = HERE / "post.lua"
    argv = f"wrk -t1 -c{conns} -d{cfg.duration}s --timeout 10s -s {lua} {url}"
    cmd = [*(LOADGEN_CPU if cfg.pin else ()), *argv.split()]
    env = dict(os.environ, BENCH_BODY=CHAT_BODY, BENCH_AUTH=AUTH)
    if cache_control:
        env["BENCH_CACHE_CONTROL"] = cache_control
    peak, deadline = 0.0, time.monotonic() + cfg.duration + 60
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        while proc.poll() is None and time.monotonic() < deadline:
            if pids:
                peak = max(peak, rss_mb(pids))
            time.sleep(0.25)
        if proc.poll() is None:
            proc.kill()
        out, err = (b.decode(errors="replace") for b in proc.communicate(timeout=30))
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip()[-500:]}")
    raw: dict[str, float] = json.loads(line.removeprefix("BENCH_JSON "))
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_us": raw["p50_us"],
        "p99_us": raw["p99_us"],
        "errors": sum(v for k, v in raw.items() if k.endswith("errors") or k == "timeouts"),
    }, peak


def loadgen(cfg: Config, binary: Path, **flags: object) -> tuple[Stats, str]:
    """Run bench/loadgen.go's binary with -key=value flags; return numbers, first error."""
    duration = flags.pop("duration", cfg.duration)
    argv = [str(binary), *(f"-{k}={v}" for k, v in flags.items())]
    argv += [f"-auth={AUTH}", f"-duration={duration}s"]
    cmd = [*(LOADGEN_CPU if cfg.pin else ()), *argv]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=cfg.duration + 90, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr[-500:]}")
    summary: dict[str, object] = json.loads(proc.stdout)
    numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
    return numbers, str(summary.get("first_error") or "")


def build_loadgen(workdir: Path) -> Path:
    """Compile bench/loadgen.go offline: it uses the Go standard library only."""
    binary = workdir / "loadgen"
    env = dict(os.environ, GOPROXY="off", GOFLAGS="", CGO_ENABLED="0")
    argv = ["go", "build", "-o", str(binary), str(HERE / "loadgen.go")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if proc.returncode:
        raise RuntimeError(f"go build failed: {proc.stderr[-1000:]}")
    return binary


# ----------------------------------------------------------------------- phases


def alive(procs: Processes, targets: dict[str, Target], arm: str, notes: list[str]) -> bool:
    """Check the servers before a measurement; drop an optional arm whose server died.

    A dead upstream, nginx or pass-through makes every later number meaningless,
    so that aborts the run; a dead gateway or LiteLLM only ends that arm.
    """
    dead = procs.dead()
    if fatal := [err for name, err in dead.items() if name.startswith(REQUIRED_SERVERS)]:
        raise RuntimeError(fatal[0])
    target = targets.get(arm)
    if target is not None and target.proc in dead:
        notes.append(f"{arm} left out from here on: {dead[target.proc]}")
        say(notes[-1])
        del targets[arm]
    return arm in targets


def run_or_drop(
    procs: Processes, targets: dict[str, Target], arm: str, notes: list[str], exc: Exception
) -> None:
    """A load tool failed against arm: abort for a baseline, else note it and drop the arm.

    An optional arm (gateway, feature arms, LiteLLM) failing should not cost the whole run;
    the note says whether its server was still running and how its log ends.
    """
    if arm in BASELINES or arm == "nginx":
        raise exc
    target = targets[arm]
    time.sleep(0.5)  # a server that is going down gets to exit
    state = procs.dead().get(target.proc)
    if state is None:
        log = procs.workdir / f"{target.proc}.log"
        with contextlib.suppress(OSError):
            lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
            state = "still running; log ends: " + " / ".join([ln for ln in lines if ln][-2:])
    notes.append(f"{arm} left out from here on: {exc}; server {state}")
    say(notes[-1])
    procs.stop(target.proc)
    del targets[arm]


def rotated(arms: Sequence[str], round_no: int) -> list[str]:
    """Start round r at arm r, so no arm always runs first (cold) or last (warm)."""
    k = round_no % len(arms)
    return [*arms[k:], *arms[:k]]


def phase_closed_loop(cfg: Config, procs: Processes, chat: dict[str, Target], res: Results) -> None:
    """Latency at 1 connection and saturation at SAT_CONNS; RSS after each round."""
    arms = [a for a in CHAT_ARMS if a in chat]
    say("warm-up")
    for arm in arms:
        try:
            wrk(
                dataclasses.replace(cfg, duration=1),
                chat[arm].url(),
                8,
                None,
                chat[arm].cache_control,
            )
        except RuntimeError as exc:
            run_or_drop(procs, chat, arm, res.notes, exc)
    arms = [a for a in arms if a in chat]
    for arm in arms:
        if (pid := chat[arm].pid) is not None:
            res.rss_idle[arm] = rss_mb(tree_pids(pid))
    for r in range(cfg.rounds):
        for arm in rotated(arms, r):
            if not alive(procs, chat, arm, res.notes):
                continue
            target = chat[arm]
            say(f"round {r + 1}/{cfg.rounds}: {arm}: latency @1, load @{SAT_CONNS}")
            try:
                cc = target.cache_control
                latency = None if arm == "gateway-w2" else wrk(cfg, target.url(), 1, None, cc)[0]
                stats, peak = wrk(cfg, target.url(), SAT_CONNS, target.pid, cc)
            except RuntimeError as exc:
                run_or_drop(procs, chat, arm, res.notes, exc)
                continue
            if latency is not None:
                res.latency[arm].append(latency)
            res.saturation[arm].append(stats)
            if target.pid is not None:
                res.rss_peak[arm] = max(res.rss_peak[arm], peak)
                res.rss_after[arm].append(rss_mb(tree_pids(target.pid)))


def phase_open_loop(
    cfg: Config, procs: Processes, binary: Path, chat: dict[str, Target], res: Results
) -> None:
    """Offer fixed arrival rates at fractions of the pass-through's open-loop capacity.

    That capacity is measured with this generator, not taken from wrk: without the batching a
    closed loop of 32 busy connections gives (several requests per event-loop wake), every
    server spends about twice the CPU per request at a fixed arrival rate (measured: the
    pass-through 150 -> 290 µs), and the generator's own CPU comes off the same two cores.  So
    the floor's capacity is searched for with this generator (:func:`open_loop_capacity`);
    75 % of wrk's figure would overload the floor itself.
    """
    floor = [s["rps"] for s in res.saturation.get("passthrough", [])]
    if not floor or "passthrough" not in chat:
        res.notes.append("open loop skipped: no pass-through saturation measured")
        return
    capacity = open_loop_capacity(cfg, binary, chat["passthrough"].url(), statistics.median(floor))
    res.open_capacity.append(capacity)
    res.rates = {f: round(capacity * f) for f in RATE_FRACTIONS}
    arms = [a for a in CHAT_ARMS if a in chat and a not in CLOSED_LOOP_ONLY]
    for r in range(cfg.rounds):
        for frac, rate in res.rates.items():
            for arm in rotated(arms, r):
                if not alive(procs, chat, arm, res.notes):
                    continue
                say(f"round {r + 1}/{cfg.rounds}: {arm}: open loop {rate:.0f} req/s")
                url = chat[arm].url()
                stats, error = loadgen(cfg, binary, mode="rate", url=url, rate=rate, body=CHAT_BODY)
                res.open_loop[(arm, frac)].append(stats)
                if stats["dropped"]:
                    error = error or "no free connection (all 1024 busy): request dropped"
                if error:
                    res.first_error.setdefault(f"{arm}, open loop", error)


def open_loop_capacity(cfg: Config, binary: Path, url: str, start_rate: float) -> float:
    """The rate the server completes when offered slightly more than it can take.

    Each probe offers a rate for one measurement period and reads ``ok_rate`` (successes per
    second, first send to last completion).  Far past capacity that reads low (a thousand
    queued connections cost the server too), well below it reads the offered rate; so the
    offer moves until it is 5-35 % above what comes back, and that completion rate is the
    capacity.  At most six probes; the best completion rate seen otherwise.
    """
    rate, seen = start_rate, []
    for _ in range(6):
        say(f"open loop: capacity probe at {rate:.0f} req/s")
        stats, _error = loadgen(cfg, binary, mode="rate", url=url, rate=rate, body=CHAT_BODY)
        done = stats["ok_rate"]
        seen.append(done)
        if done >= 0.95 * rate:  # kept up: offer more
            rate *= 1.3
        elif rate > 1.35 * done:  # far past capacity: offer just above what came back
            rate = 1.15 * done
        else:
            return done
    return max(seen)


def phase_stream(
    cfg: Config, procs: Processes, binary: Path, stream: dict[str, Target], res: Results
) -> None:
    """Time to first chunk and inter-chunk gaps at 1 and 64 concurrent streams."""
    arms = [a for a in STREAM_ARMS if a in stream]
    for arm in arms:  # warm-up
        url = stream[arm].url()
        loadgen(cfg, binary, mode="stream", url=url, conns=4, body=STREAM_BODY, duration=1)
    for r in range(cfg.rounds):
        for conns in STREAM_CONCURRENCY:
            for arm in rotated(arms, r):
                if not alive(procs, stream, arm, res.notes):
                    continue
                say(f"round {r + 1}/{cfg.rounds}: {arm}: {conns} concurrent streams")
                url = stream[arm].url()
                stats, error = loadgen(
                    cfg, binary, mode="stream", url=url, conns=conns, body=STREAM_BODY
                )
                res.stream[(arm, conns)].append(stats)
                if error:
                    res.first_error.setdefault(f"{arm}, {conns} streams", error)


def phase_websocket(cfg: Config, procs: Processes, stream: dict[str, Target], res: Results) -> None:
    """gateway-ws: TTFT over a WebSocket against SSE, then memory per idle socket."""
    # bench/ is the script's directory (on sys.path), not a package: imported by name, and
    # only here (it imports aiohttp; only this arm needs it).
    ws_bench = importlib.import_module("ws_bench")

    target = stream.get("gateway")
    if target is None or not alive(procs, stream, "gateway", res.notes):
        res.notes.append(f"{WS_ARM} skipped: no gateway arm on the streaming upstream")
        return
    pairs = max(30, cfg.duration * 10)  # each pair ~2 streams of the upstream's length
    for r in range(cfg.rounds):
        say(f"round {r + 1}/{cfg.rounds}: {WS_ARM}: {pairs} TTFT pairs (WebSocket, SSE)")
        try:
            res.websocket.append(ws_bench.ttft(target.origin, STREAM_BODY, AUTH, pairs))
        except Exception as exc:
            res.first_error.setdefault(WS_ARM, f"{type(exc).__name__}: {exc}")
            return
    if target.pid is None:
        return
    pid = target.pid
    say(f"{WS_ARM}: {WS_SOCKETS} idle sockets")
    try:
        res.ws_memory = ws_bench.idle_memory(
            target.origin, AUTH, WS_SOCKETS, lambda: rss_mb(tree_pids(pid))
        )
    except Exception as exc:
        res.first_error.setdefault(f"{WS_ARM} memory", f"{type(exc).__name__}: {exc}")


def websocket_table(res: Results) -> str:
    """TTFT over a WebSocket against SSE (paired per round), and memory per idle socket."""
    runs = res.websocket
    rows = [
        ["TTFT p50, SSE (µs)", spread([r["sse_ttft_p50_us"] for r in runs])],
        ["TTFT p50, WebSocket (µs)", spread([r["ws_ttft_p50_us"] for r in runs])],
        [
            "WebSocket − SSE, paired p50 (µs; budget ≤ +100)",
            spread([r["delta_p50_us"] for r in runs]),
        ],
    ]
    mem = res.ws_memory
    if mem:
        rows += [
            [
                f"RSS with {mem['sockets']:.0f} idle sockets (MB; before → open → closed)",
                f"{mem['rss_before_mb']:.1f} → {mem['rss_open_mb']:.1f} → "
                f"{mem['rss_after_close_mb']:.1f}",
            ],
            ["memory per idle socket (KB)", f"{mem['kb_per_socket']:.1f}"],
        ]
    return table("measure|value", rows)


# ----------------------------------------------------------------------- report


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """Format as 'median [min-max]' (NaN dropped; a single value stands alone)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    med = fmt.format(statistics.median(vals))
    if len(vals) == 1:
        return med
    return f"{med} [{fmt.format(min(vals))} to {fmt.format(max(vals))}]"


def paired(samples: Mapping[K, list[Stats]], arm: K, base: K, key: str) -> list[float]:
    """Per-round arm minus baseline: same round, so slow drift cancels out."""
    pairs = zip(samples.get(arm, []), samples.get(base, []), strict=False)
    return [a[key] - b[key] for a, b in pairs]


def ratio(nums: Sequence[float], dens: Sequence[float]) -> list[float]:
    """Per-round ratios; a non-positive denominator (noise) gives NaN, shown as n/a."""
    return [n / d if d > 0 else math.nan for n, d in zip(nums, dens, strict=False)]


def table(header: str, rows: Sequence[Sequence[str]]) -> str:
    """Render a markdown table; header is 'col|col|...'."""
    cols = header.split("|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def request_table(res: Results) -> str:
    """Latency at 1 connection and saturation, per arm."""
    rows = []
    for arm in (a for a in CHAT_ARMS if a in res.saturation):
        lat = res.latency.get(arm, [])
        added = [spread(paired(res.latency, arm, "direct", k)) for k in ("p50_us", "p99_us")]
        rows.append(
            [
                arm,
                spread([s["p50_us"] for s in lat]),
                spread([s["p99_us"] for s in lat]),
                *(["-", "-"] if arm == "direct" else added),
                spread([s["rps"] for s in res.saturation[arm]]),
                f"{sum(s['errors'] for s in res.saturation[arm]):.0f}",
            ]
        )
    header = "arm|p50 µs @1 conn|p99 µs @1 conn|added p50 µs|added p99 µs"
    return table(f"{header}|req/s @{SAT_CONNS} conns|errors", rows)


def open_loop_table(res: Results) -> str:
    """p99 and error count per arm at each fixed arrival rate."""
    header = "arm|" + "|".join(
        f"{frac:.0%} = {rate:.0f}/s: p99 µs, errors" for frac, rate in res.rates.items()
    )
    rows = []
    for arm in CHAT_ARMS:
        runs = [res.open_loop.get((arm, frac), []) for frac in res.rates]
        if all(runs):
            rows.append(
                [arm]
                + [
                    f"{spread([s['p99_us'] for s in r])}, "
                    f"{sum(s['errors'] + s['dropped'] for s in r):.0f}"
                    for r in runs
                ]
            )
    return table(header, rows)


def unbuffered(cfg: Config, res: Results, arm: str, conns: int) -> str:
    """Say whether client-side chunk timing tracks the upstream's send interval.

    A buffering proxy shows gaps near 0 (chunks arrive in bursts) and an added
    TTFT near the whole stream's length, so both are checked in every round.
    The TTFT bound is half the stream: queueing under 64 streams legitimately
    adds a few ms, buffering adds the whole stream.
    """
    interval = cfg.stream_interval_ms * 1000
    half_stream = interval * (cfg.stream_chunks - 1) / 2
    verdicts = [
        0.5 * interval <= s["gap_p50_us"] <= 1.5 * interval
        and s["ttft_p50_us"] - d["ttft_p50_us"] < half_stream
        and s["chunks_per_stream_median"] >= cfg.stream_chunks  # extra chunks (usage) are fine
        for s, d in zip(
            res.stream.get((arm, conns), []),
            res.stream.get(("direct", conns), []),
            strict=False,
        )
    ]
    if not verdicts:
        return "n/a"
    return "yes" if all(verdicts) else f"NO ({verdicts.count(False)}/{len(verdicts)} rounds)"


def stream_table(cfg: Config, res: Results) -> str:
    """TTFT and inter-chunk gaps per arm and concurrency, with the buffering check."""
    rows = []
    for conns in STREAM_CONCURRENCY:
        for arm in STREAM_ARMS:
            runs = res.stream.get((arm, conns), [])
            if not runs:
                continue
            keys = ("ttft_p50_us", "gap_p50_us", "gap_p99_us")
            added = [spread(paired(res.stream, (arm, conns), ("direct", conns), k)) for k in keys]
            rows.append(
                [
                    f"{arm} x{conns}",
                    f"{sum(s['streams'] for s in runs):.0f}",
                    f"{sum(s['errors'] for s in runs):.0f}",
                    spread([s["ttft_p50_us"] for s in runs]),
                    spread([s["gap_p50_us"] for s in runs]),
                    *(["-"] * 3 if arm == "direct" else added),
                    "-" if arm == "direct" else unbuffered(cfg, res, arm, conns),
                ]
            )
    header = "arm x streams|streams|errors|TTFT p50 µs|gap p50 µs|added TTFT p50 µs"
    return table(f"{header}|added gap p50 µs|added gap p99 µs|unbuffered", rows)


def memory_table(res: Results) -> str:
    """VmRSS idle, peak under load and after each round."""
    rows = []
    for arm in (a for a in CHAT_ARMS if a in res.rss_idle):
        after = res.rss_after.get(arm, [])
        rows.append(
            [
                arm,
                f"{res.rss_idle[arm]:.1f}",
                f"{res.rss_peak.get(arm, 0.0):.1f}",
                " / ".join(f"{v:.1f}" for v in after),
                f"{after[-1] - after[0]:+.1f}" if len(after) > 1 else "n/a",
            ]
        )
    return table("arm|idle|peak under load|after each round|growth first to last", rows)


def budget_rows(res: Results, gateway_label: str) -> list[list[str]]:
    """Check the gateway against its budget, relative to the pass-through floor."""
    if "gateway" not in res.saturation:
        return [["all", "n/a", "-", f"gateway not measured ({gateway_label}; see Notes)"]]

    def row(
        name: str, vals: list[float], limit: str, ok: Callable[[float], bool], fmt: str
    ) -> list[str]:
        clean = [v for v in vals if not math.isnan(v)]
        verdict = ("PASS" if ok(statistics.median(clean)) else "FAIL") if clean else "n/a"
        return [name, spread(vals, fmt), limit, verdict]

    def rps(arm: str) -> list[float]:
        return [s["rps"] for s in res.saturation.get(arm, [])]

    added = ratio(
        paired(res.latency, "gateway", "direct", "p50_us"),
        paired(res.latency, "passthrough", "direct", "p50_us"),
    )
    sat = ratio(rps("gateway"), rps("passthrough"))
    ttft = [v / 1000 for v in paired(res.stream, ("gateway", 1), ("direct", 1), "ttft_p50_us")]
    idle = [res.rss_idle.get("gateway", math.nan)]
    after = res.rss_after.get("gateway", [])
    growth = [after[-1] - after[0]] if len(after) > 1 else []
    runs75 = res.open_loop.get(("gateway", 0.75), [])
    err75 = [sum(s["errors"] + s["dropped"] for s in runs75)] if runs75 else []
    flat = f"flat (≤ +{RSS_FLAT_MB:g})"
    rows = [
        row(
            "added p50, gateway / passthrough",
            added,
            "≤ 1.5",
            lambda v: v <= 1.5,
            "{:.2f}",
        ),
        row(
            "saturation, gateway / passthrough",
            sat,
            "≥ 0.6",
            lambda v: v >= 0.6,
            "{:.2f}",
        ),
        row("streaming added TTFT p50 @1 (ms)", ttft, "≤ 1", lambda v: v <= 1, "{:.2f}"),
        row("RSS idle (MB)", idle, "≤ 80", lambda v: v <= 80, "{:.1f}"),
        row(
            "RSS growth, first to last round (MB)",
            growth,
            flat,
            lambda v: v <= RSS_FLAT_MB,
            "{:+.1f}",
        ),
        row("errors at 75% rate, all rounds", err75, "0", lambda v: v == 0, "{:.0f}"),
    ]
    if "gateway-w2" in res.saturation:
        w2 = ratio(rps("gateway-w2"), rps("gateway"))
        rows.append(["saturation, --workers 2 / 1", spread(w2, "{:.2f}"), "info", "-"])
    if "gateway-cache-hit" in res.saturation:  # issue 13: a hit never touches the upstream
        hit = ratio(rps("gateway-cache-hit"), rps("passthrough"))
        rows.append(
            row("saturation, cache hit / passthrough", hit, "≥ 1.5", lambda v: v >= 1.5, "{:.2f}")
        )
    if "gateway-cache-miss" in res.latency:
        miss = paired(res.latency, "gateway-cache-miss", "gateway", "p50_us")
        rows.append(
            row("added p50, cache miss − gateway (µs)", miss, "≤ 20", lambda v: v <= 20, "{:.0f}")
        )
    return rows


def feature_rows(res: Results) -> list[list[str]]:
    """Each feature arm against the gateway arm, paired per round (same round, minutes apart)."""
    if "gateway" not in res.saturation:
        return []

    def rps(arm: str) -> list[float]:
        return [s["rps"] for s in res.saturation.get(arm, [])]

    rows = []
    for arm, (feature, how) in FEATURE_ARMS.items():
        if arm not in res.saturation:
            continue
        rows.append(
            [
                f"{feature} ({arm})",
                how,
                spread(paired(res.latency, arm, "gateway", "p50_us")),
                spread(ratio(rps(arm), rps("gateway")), "{:.2f}"),
                f"{sum(s['errors'] for s in res.saturation[arm]):.0f}",
            ]
        )
    return rows


def log_notes(workdir: Path) -> list[str]:
    """Warnings and errors in the gateway arms' logs, and what the OTLP sink accepted.

    Read after the servers stopped, so a tracing arm's final flush is included.
    """
    notes = []
    json_marks = ('"level":"warning"', '"level":"error"', '"level":"critical"', "Traceback")
    marks = (*json_marks, "| WARNING ", "| ERROR ", "| CRITICAL ")  # and the pretty format
    for log in sorted(workdir.glob("gateway*.log")):
        with log.open(errors="replace") as lines:
            bad = [ln.strip() for ln in lines if any(m in ln for m in marks)]
        if bad:
            notes.append(f"{log.stem} logged {len(bad)} warning/error lines; first: {bad[0][:300]}")
    sink = workdir / SINK_LOG
    exports: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with contextlib.suppress(OSError):
        for line in sink.read_text().splitlines():
            uri, status, size = line.split()
            exports[uri].append((status, int(size)))
    for uri, got in sorted(exports.items()):
        statuses = ", ".join(
            f"{code} x{sum(1 for c, _ in got if c == code)}" for code in sorted({c for c, _ in got})
        )
        total = sum(size for _, size in got) / 1e6
        notes.append(f"OTLP sink, {uri}: {len(got)} exports, {total:.1f} MB, status {statuses}")
    return notes


def machine_info(gateway_label: str) -> list[tuple[str, str]]:
    """Collect what the numbers depend on, for the report header."""

    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return "not found"
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    return [
        ("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
        ("nproc", str(len(os.sched_getaffinity(0)))),
        ("CPU", models[0] if models else platform.processor()),
        ("kernel", platform.release()),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("aiohttp / uvloop", f"{version('aiohttp')} / {version('uvloop')}"),
        ("nginx", first_line(["nginx", "-v"])),
        ("wrk", first_line(["wrk", "-v"]).split(" [")[0]),
        ("go (builds bench/loadgen.go)", first_line(["go", "version"])),
        ("gateway", gateway_label),
    ]


def render(cfg: Config, res: Results, gateway_label: str, info: list[tuple[str, str]]) -> str:
    """Build the whole report as markdown (printed, and written to --out)."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("BENCH_"))
    overrides = [f"{k}={shlex.quote(v)}" for k, v in env if k != "BENCH_LAUNCHER"]
    launcher = os.environ.get("BENCH_LAUNCHER", "python bench/bench.py")
    command = " ".join([*overrides, launcher, *map(shlex.quote, cfg.argv)])
    pinning = "; load generators pinned to CPU 0, servers to CPU 1" if cfg.pin else ""
    parts = [
        "# Benchmarks" + (" (quick smoke run: too short to trust)" if cfg.quick else ""),
        "",
        (
            "Written by `bench/bench.py`; bench/README.md explains the arms, the "
            "measures and how to read the ratios. Cells are `median [min to max]` "
            "over rounds; `added` is paired per round against the direct arm."
        ),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info],
        "",
        "## Command",
        "",
        f"```\n{command}\n```",
        "",
        (
            f"{cfg.rounds} rounds of {cfg.duration} s per measurement, arm order "
            f"rotated every round{pinning}."
        ),
        "",
        "## Budget: the gateway against the bare aiohttp pass-through",
        "",
        table("check|measured|budget|verdict", budget_rows(res, gateway_label)),
        "",
        "## Request/response (wrk, 1 thread, POST with JSON body)",
        "",
        request_table(res),
    ]
    if features := feature_rows(res):
        header = "feature (arm)|differs from the gateway arm by|added p50 µs @1 conn"
        parts += [
            "",
            "## Feature costs (against the gateway arm)",
            "",
            (
                "Each arm is the gateway arm (production defaults: metrics on, tracing off) "
                "with one feature changed, measured in the same rounds; `added p50` is arm − "
                f"gateway and the ratio arm / gateway req/s at {SAT_CONNS} connections, both "
                "paired per round. Metrics' own cost is the metrics-off row with the sign "
                "flipped (and the inverse ratio)."
            ),
            "",
            table(f"{header}|saturation, arm / gateway|errors", features),
        ]
    if res.rates:
        parts += ["", "## Open loop (fixed arrival rate, bench/loadgen.go)", ""]
        floor = [s["rps"] for s in res.saturation.get("passthrough", [])]
        parts += [
            "Rates are fractions of the pass-through's capacity under this generator: "
            f"{statistics.median(res.open_capacity):.0f} req/s (what it completes per second "
            "when offered 5-35 % more; its wrk saturation is "
            f"{statistics.median(floor):.0f} req/s). At a fixed arrival rate no request shares "
            "an event-loop wake with another, so every server spends more per request than in "
            "wrk's closed loop (bench/README.md).",
            "",
        ]
        parts += [open_loop_table(res)]
    parts += [
        "",
        f"## Streaming ({cfg.stream_chunks} chunks, {cfg.stream_interval_ms:g} ms gap)",
        "",
        stream_table(cfg, res),
        "",
        "## Memory (VmRSS MB, summed over the process tree)",
        "",
        memory_table(res),
    ]
    if res.websocket or res.ws_memory:
        parts += [
            "",
            f"## WebSocket ({WS_ARM}: the gateway arm's streaming process)",
            "",
            (
                "Pairs of one SSE request and one request on an open chat WebSocket, same "
                "client (aiohttp), same upstream stream, order alternating; the difference is "
                "paired per request. Memory: 1,000 chat WebSockets opened and left idle "
                "(bench/ws_bench.py)."
            ),
            "",
            websocket_table(res),
        ]
    notes = [*res.notes, *(f"first error, {k}: {v}" for k, v in res.first_error.items())]
    lags = [s["sched_lag_p99_us"] for runs in res.open_loop.values() for s in runs]
    if late := [lag for lag in lags if lag > 1000]:
        notes.append(
            f"in {len(late)} of {len(lags)} open-loop runs loadgen itself sent late (send lag "
            f"p99 > 1 ms, worst {max(late) / 1000:.1f} ms): CPU contention, so those p99s "
            "overstate the server's"
        )
    if notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> Config:
    """Parse flags; --quick is a smoke run (2 rounds of 1 s), not a measurement."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s (smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 5)")
    parser.add_argument(
        "--only",
        help=(
            f"comma list of {','.join(CHAT_ARMS)},{WS_ARM}; direct and passthrough always run "
            "(and gateway with any feature arm)"
        ),
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="taskset load generators to CPU 0 and servers to CPU 1 (drops gateway-w2)",
    )
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--stream-interval-ms", type=float, default=10.0)
    parser.add_argument(
        "--out",
        type=Path,
        help="report file (default docs/benchmarks.md; with --quick bench/results/quick.md)",
    )
    args = parser.parse_args(argv)
    every = ",".join((*CHAT_ARMS, WS_ARM))
    only = {a.strip() for a in (args.only or every).split(",") if a.strip()}
    if unknown := only - {*CHAT_ARMS, WS_ARM}:
        parser.error(f"unknown arms: {', '.join(sorted(unknown))}")
    if only & FEATURE_ARMS.keys() or WS_ARM in only:
        only.add("gateway")  # feature arms are reported against it; gateway-ws runs on it
    if os.environ.get("BENCH_LITELLM") != "1":
        only.discard("litellm")
    rounds = args.rounds or (2 if args.quick else 3)
    duration = args.duration or (1 if args.quick else 5)
    if not (1 <= rounds <= 50 and 1 <= duration <= 600 and args.stream_chunks >= 2):
        parser.error("need 1 <= rounds <= 50, 1 <= duration <= 600, stream-chunks >= 2")
    return Config(
        rounds=rounds,
        duration=duration,
        only=frozenset(only | set(BASELINES)),
        pin=args.pin and len(os.sched_getaffinity(0)) >= 2,
        stream_chunks=args.stream_chunks,
        stream_interval_ms=args.stream_interval_ms,
        out=args.out or REPO / ("bench/results/quick.md" if args.quick else "docs/benchmarks.md"),
        quick=args.quick,
        argv=tuple(argv),
    )


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt so servers get torn down."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starting us in the background leaves it ignored
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str]) -> int:
    """Start everything, run the three phases, report; always tear down."""
    cfg = parse_args(argv)
    gateway = find_gateway()
    say(f"gateway: {gateway.label}")
    res = Results()
    if gateway.argv is None:
        res.notes.append(f"gateway {gateway.label}")
    elif "{workers}" not in " ".join(gateway.argv):
        res.notes.append("gateway-w2 skipped: the gateway command has no {workers}")
    if cfg.pin:
        res.notes.append("gateway-w2 skipped: --pin leaves the servers one core")
    if "litellm" in cfg.only and not (REPO / ".venv-litellm/bin/litellm").exists():
        res.notes.append("litellm skipped: .venv-litellm missing (run.sh installs it)")
    info = machine_info(gateway.label)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, signals_as_interrupt():
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as 'nobody'
        procs = Processes(workdir, cfg.pin)
        try:
            binary = build_loadgen(workdir)
            chat, stream = start_all(cfg, procs, gateway, res.notes)
            say(f"arms: {', '.join(chat)}; streaming: {', '.join(stream)}")
            phase_closed_loop(cfg, procs, chat, res)
            phase_open_loop(cfg, procs, binary, chat, res)
            phase_stream(cfg, procs, binary, stream, res)
            if WS_ARM in cfg.only:
                phase_websocket(cfg, procs, stream, res)
        except KeyboardInterrupt:
            say("interrupted: stopping servers")
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            say(f"benchmark failed: {exc}")
            return 1
        finally:
            procs.stop()
        res.notes += log_notes(workdir)
    report = render(cfg, res, gateway.label, info)
    print(report)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(report)
    say(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
