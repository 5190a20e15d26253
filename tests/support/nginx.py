"""A real nginx (the Debian package ``make system-deps`` installs) load-balancing gateway
replicas on loopback, as a deployment would put them behind one address (issue 16).

Why the upstream block is configured as it is (open-source nginx has no active health checks,
so it cannot poll ``/health/ready`` itself; an orchestrator's endpoint controller does that):

- ``proxy_next_upstream error timeout non_idempotent``: a replica that stopped listening
  refuses the connection, and a keep-alive connection it closed while shutting down fails on
  first use; both mean the request never reached a handler, so nginx tries the next replica.
  ``non_idempotent`` is needed because chat requests are POSTs; the price is that a replica dying
  *while* it handles a request (after it read it) may see the request sent again to another
  one.  ``http_502``/``http_503`` are deliberately absent: those are answers (an upstream
  provider failure, a shutdown-deadline cut) and retrying them would double upstream load.
- ``max_fails=1 fail_timeout=2s``: one refused connection takes the replica out for 2 s, so
  during a restart nginx stops trying it at once instead of paying a failed connect per request.
- ``keepalive``: pooled connections to the replicas, as a production config has; the test of a
  rolling restart then also covers the keep-alive race above.
- The gateway's ``server.drain_delay_secs`` keeps the listener open (and ``/health/ready`` at 503)
  for a moment after SIGTERM, which is what lets an orchestrator take the replica out of the
  rotation before connections are refused; nginx's retry covers whatever still arrives.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import free_port, running_process


def nginx_config(prefix: Path, port: int, upstreams: list[int]) -> str:
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstreams)
    temp = "\n".join(
        f"  {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
{temp}
  upstream gateways {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout non_idempotent;
      proxy_next_upstream_tries 3;
      proxy_connect_timeout 2s;
      proxy_read_timeout 30s;
      proxy_buffering off;
      add_header X-Upstream $upstream_addr always;
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx(prefix: Path, upstreams: list[int]) -> Iterator[int]:
    """nginx on a free port in front of ``upstreams``; yields its port once it proxies."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        raise RuntimeError("nginx is not installed: `make system-deps` installs it")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, port, upstreams))
    with running_process(
        [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        env=None,
        ready_url=f"http://127.0.0.1:{port}/health/live",
        timeout=15,
        log_path=prefix / "nginx.log",
    ):
        yield port
