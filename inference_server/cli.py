"""Command line: ``python -m inference_server [--config FILE] [--host H] [--port P]
[--workers N] [--check-config] [--print-config]``.

Settings are validated completely before anything binds; ``--workers N`` forks N processes that
share one port through SO_REUSEPORT (each with its own event loop, session and providers),
supervised by the parent (see supervisor.py).  Exit codes: 0 clean stop, 1 bad settings or a
failed stop, 3 cannot listen (busy port).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from inference_server import __version__, metrics
from inference_server.providers.loader import installed_plugins
from inference_server.scrub import mask_url
from inference_server.settings import ConfigError, Settings, load_settings, masked
from inference_server.supervisor import EXIT_CANNOT_START, Supervisor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m inference_server",
        description="OpenAI-compatible inference gateway.",
    )
    parser.add_argument("--config", metavar="FILE", help="settings file (default ./settings.yaml)")
    parser.add_argument("--host", help="interface to bind (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to bind (overrides server.port)")
    parser.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate settings and plugins, then exit"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print effective settings (secrets masked)"
    )
    parser.add_argument("--version", action="version", version=f"inference-server {__version__}")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.host is not None:
        out["server.host"] = args.host
    if args.port is not None:
        out["server.port"] = args.port
    if args.workers is not None:
        out["server.workers"] = args.workers
    return out


def _serve(
    settings: Settings,
    reuse_port: bool,
    on_ready: Callable[[], None] | None = None,
    parent_pid: int | None = None,
    loader: Callable[[], Settings] | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT; its exit code (3: it could not bind).

    Logging, uvloop, the app, then ``server.serve``: bind first (a busy port is one clear log
    line and exit code 3, no traceback), start the app, listen, and only then log "listening".
    """
    import uvloop

    from inference_server import logs
    from inference_server.app import create_app
    from inference_server.reload import RELOADER, request_reload
    from inference_server.server import BindError, serve

    # SIGHUP reloads once the loop's handler is installed (server.serve); until then it must
    # not kill the process (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    logs.setup_logging(settings.logging)
    from loguru import logger

    # Everything allocated so far (modules, settings, plugins) lives for the whole process:
    # move it out of the cyclic GC's reach so collections triggered by per-request garbage do
    # not rescan it every time.  A larger young generation lets a request's cyclic garbage die
    # before any collection instead of being promoted and rescanned (measured here: ~360 →
    # ~325 µs of CPU per request; the young generation holds a few MB at most).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)

    def banner(port: int) -> None:
        logger.info(
            "inference-server {} (env {}) listening on http://{}:{} pid {} providers: {}",
            __version__,
            settings.env,
            settings.server.host,
            port,
            os.getpid(),
            ", ".join(
                f"{n} ({c.plugin} → {mask_url(c.base_url)})" for n, c in settings.providers.items()
            ),
        )

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        app = create_app(settings, loader)
        app[RELOADER].supervisor_pid = parent_pid  # POST /admin/reload reloads every worker
        try:
            loop.run_until_complete(
                serve(
                    app,
                    settings.server,
                    reuse_port=reuse_port,
                    on_ready=on_ready,
                    banner=banner,
                    parent_pid=parent_pid,
                    on_hangup=lambda: request_reload(app),
                )
            )
        except BindError as exc:
            logger.error("{}", exc)
            code = EXIT_CANNOT_START
    finally:
        try:
            _finish_loop(loop)
            loop.run_until_complete(logs.complete())
        finally:
            loop.close()
            metrics.worker_exit()  # this worker's live gauges leave the merged view
    return code


def _finish_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (as ``web.run_app`` does) and close async generators."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def _worker(
    settings: Settings, on_ready: Callable[[], None], loader: Callable[[], Settings] | None = None
) -> int:
    """A supervised worker (forked: its parent is the supervisor, which it watches)."""
    return _serve(settings, True, on_ready, parent_pid=os.getppid(), loader=loader)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = _overrides(args)

    def loader() -> Settings:
        """The same sources and validation as start-up: what a hot reload re-reads."""
        return load_settings(args.config, overrides=overrides)

    try:
        settings = loader()
    except ConfigError as exc:
        print(
            f"configuration error(s) in env '{os.environ.get('RUN_ENV', 'development')}':",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if args.print_config:
        tree = masked(
            settings.raw,
            plugin_schemas={n: lp.plugin.settings for n, lp in settings.plugins.items()},
        )
        sys.stdout.write(
            orjson.dumps({"env": settings.env, **tree}, option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    if args.check_config:
        print(f"configuration OK (env {settings.env})")
        for name, cfg in settings.providers.items():
            print(f"  provider {name}: plugin {cfg.plugin} at {mask_url(cfg.base_url)}")
        for name, route in settings.routes.items():
            deps = ", ".join(d.id for d in route.deployments)
            print(f"  model {name} ({route.strategy}) → {deps}")
        for alias, target in settings.aliases.items():
            print(f"  alias {alias} → {target}")
        for model, exp in settings.experiments.items():
            variants = ", ".join(f"{v.name}={v.model}" for v in exp.variants)
            print(f"  experiment {exp.name} on {model}: {variants}")
        print(f"  installed plugins: {', '.join(installed_plugins())}")
        return 0
    # Before any fork: one clean directory for the workers' metric files (see metrics.py).
    cleanup_metrics = metrics.prepare_multiprocess(settings.metrics, settings.server.workers)
    try:
        if settings.server.workers > 1:
            return Supervisor(settings, _worker, loader).run()
        return _serve(settings, reuse_port=False, loader=loader)
    finally:
        cleanup_metrics()
