"""Code run in a freshly spawned interpreter by test_metrics.py's multiprocess tests.

prometheus-client picks in-memory or multiprocess values when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; the pytest process imported it long before, so a "worker" must be
a new interpreter that inherits the variable (``spawn``), as cli.py's workers do after
``prepare_multiprocess``.
"""

from __future__ import annotations

import os
from typing import Any

from inference_server.context import RequestContext
from inference_server.metrics import Metrics, MetricsSettings, worker_exit

CHAT = "/v1/chat/completions"
NAMES: dict[str, list[str]] = {
    "endpoints": [CHAT],
    "models": ["gpt-oss-20b"],
    "routes": ["gpt-oss-20b"],
    "providers": ["local"],
    "deployments": ["local/gpt-oss-20b", "local/a"],
}


def finished(**fields: Any) -> RequestContext:
    """A context as the pipeline leaves it after a successful routed request."""
    ctx = RequestContext(request_id="r1")
    defaults: dict[str, Any] = {
        "endpoint": CHAT,
        "model": "gpt-oss-20b",
        "route": "gpt-oss-20b",
        "provider": "local",
        "deployment": "local/gpt-oss-20b",
        "upstream_model": "gpt-oss-20b",
        "attempts": 1,
        "status": 200,
        "upstream_secs": 0.2,
        "queue_secs": 0.0005,
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    for key, val in {**defaults, **fields}.items():
        setattr(ctx, key, val)
    return ctx


def worker(directory: str, requests: int, conn: Any) -> None:
    """A 'worker': its own Metrics on the shared directory, like cli.py's workers; exits with
    one request still in flight, which must vanish from the merged view with it."""
    m = Metrics(MetricsSettings(multiprocess_dir=directory))
    m.know(**NAMES)
    m.request_started(CHAT)
    for _ in range(requests):
        m.request_started(CHAT)
        m.request_finished(finished(), 0.1)
    m.breaker_state("local/gpt-oss-20b", "open")
    conn.send(os.getpid())
    conn.close()
    worker_exit()


def live(directory: str, conn: Any) -> None:
    """Two requests in flight, a half-open breaker and a finished stream; sends the rendering."""
    m = Metrics(MetricsSettings(multiprocess_dir=directory))
    m.know(**NAMES)
    m.request_started(CHAT)
    m.request_started(CHAT)
    m.breaker_state("local/a", "half_open")
    before = m.render()[0].decode()
    m.request_started(CHAT)
    m.request_finished(finished(stream=True, first_token_secs=0.1, stream_secs=0.5), 0.6)
    conn.send((before, m.render()[0].decode()))
    conn.close()
