# inference-server image: `docker build -t inference-server .` then `docker run -p 8080:8080 inference-server`.
#
# Two stages on the same base: `build` makes a venv with the core, every plugin and their runtime
# dependencies at the lock's exact versions; the final stage copies only that venv and the
# settings, and runs as an unprivileged user. README "Deploying" documents the knobs.
#
# Offline builds: when wheels/ holds wheels (`make wheels` writes the locked ones there), pip
# installs from it with no index at all; otherwise from the package index.
#
# BASE: any Debian-like image with python3 (3.11+) and its venv module. The default is the official
# slim Python image; the tests build on a local debootstrap image (no registry reachable there).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/inference-server
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when the lock, a pyproject or the
# wheels change, never for a code change.
COPY requirements/constraints.txt requirements/constraints.txt
COPY scripts/runtime_requirements.py scripts/runtime_requirements.py
COPY pyproject.toml pyproject.toml
COPY plugins/lmstudio/pyproject.toml plugins/lmstudio/pyproject.toml
COPY plugins/mock/pyproject.toml plugins/mock/pyproject.toml
COPY plugins/openai/pyproject.toml plugins/openai/pyproject.toml
COPY plugins/triton/pyproject.toml plugins/triton/pyproject.toml
COPY wheels/ wheels/
RUN set -eu; \
    if ls wheels/*.whl >/dev/null 2>&1; then \
      echo "installing from wheels/ (no index)"; \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheels; \
    else \
      echo "wheels/ is empty: installing from the package index"; \
    fi; \
    python3 scripts/runtime_requirements.py pyproject.toml plugins/*/pyproject.toml \
      > /tmp/runtime.txt; \
    /opt/inference-server/bin/pip install -q -c requirements/constraints.txt -r /tmp/runtime.txt
# Then the project itself (core + plugins, built from this source, no dependency resolution).
COPY README.md README.md
COPY inference_server/ inference_server/
COPY plugins/ plugins/
RUN set -eu; \
    if ls wheels/*.whl >/dev/null 2>&1; then \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheels; \
    fi; \
    /opt/inference-server/bin/pip install -q --no-deps . plugins/lmstudio plugins/mock \
      plugins/openai plugins/triton; \
    /opt/inference-server/bin/python -m inference_server --version

FROM ${BASE}
# A fixed numeric uid (Kubernetes' runAsNonRoot can verify it); no home, no shell.
RUN set -eu; \
    if command -v useradd >/dev/null; then \
      groupadd --system --gid 10001 inference; \
      useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin inference; \
    else \
      echo 'inference:x:10001:10001::/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
      echo 'inference:x:10001:' >> /etc/group; \
    fi
COPY --from=build /opt/inference-server /opt/inference-server
# settings.yaml (mount your own over it, or the whole directory) and .secrets.yaml beside it
# (mount it; never bake secrets into an image). INFERENCE_* variables override both.
COPY settings.yaml /etc/inference-server/settings.yaml
# RUN_ENV=production: bind 0.0.0.0, JSON log lines on stdout (settings.yaml's production section).
# PYTHONSAFEPATH: `python -m` does not put the working directory on sys.path, which is also not
# writable by the server's user (a read-only root filesystem leaves only /tmp writable).
ENV RUN_ENV=production \
    INFERENCE_SERVER_PORT=8080 \
    PATH=/opt/inference-server/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /opt/inference-server
EXPOSE 8080
# Liveness: the process serves. Python's urllib (the image has no curl); the port follows
# INFERENCE_SERVER_PORT. (Docker runs it by itself; podman needs --format docker at build time.)
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/opt/inference-server/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('INFERENCE_SERVER_PORT', '8080'), timeout=2)"]
# The server is PID 1: it handles SIGTERM itself (asyncio signal handlers: in-flight requests get
# server.shutdown_timeout_secs, then it exits 0), and with --workers N its supervisor forwards
# the signal and reaps every worker. STOPSIGNAL is the default SIGTERM.
ENTRYPOINT ["/opt/inference-server/bin/python", "-m", "inference_server", "--config", "/etc/inference-server/settings.yaml"]
CMD []
