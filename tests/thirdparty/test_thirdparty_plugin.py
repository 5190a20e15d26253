"""A provider plugin we do not ship works when installed the way its author would install it.

``echo_plugin/`` beside this file is a separate distribution (``inference-server-echo``, entry
point ``echo``) that exists only here.  The module fixture builds it into a wheel and installs it,
together with the core and the mock plugin, into a brand-new venv with one pip command, as
docs/plugins.md tells authors to.  Then the gateway runs as a real process from that venv: it must
find ``echo`` through its entry point, apply its declared settings and serve chats with it, and a
misspelled plugin name must stop start-up with a message listing what is installed.

Why a fresh venv and not the main one: installing into .venv would leave the plugin behind for
every later test, and an editable install would not prove the wheel's entry-point metadata.
The core and mock are installed from copies so that building them writes nothing into the repo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from inference_server.providers.loader import installed_plugins
from tests.support.procs import free_port, running_process

REPO = Path(__file__).resolve().parents[2]
ECHO_SRC = Path(__file__).resolve().parent / "echo_plugin"
#: Building three wheels and resolving the core's dependencies takes ~15 s with a warm pip cache.
INSTALL_TIMEOUT = 300
_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a step; on failure show its output, so a broken install says why."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return proc


def clean_env() -> dict[str, str]:
    """Our environment without settings overrides from the developer's shell."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_") and k != "RUN_ENV"
    }


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the core, the mock plugin and the echo plugin's wheel."""
    work = tmp_path_factory.mktemp("thirdparty")
    started = time.monotonic()
    # Build from copies: setuptools writes build/ and *.egg-info next to the sources.
    echo_src = work / "echo-src"
    shutil.copytree(ECHO_SRC, echo_src, ignore=_IGNORE)
    core_src = work / "core-src"
    shutil.copytree(REPO / "inference_server", core_src / "inference_server", ignore=_IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, core_src / name)
    mock_src = work / "mock-src"
    shutil.copytree(REPO / "plugins" / "mock", mock_src, ignore=_IGNORE)

    dist = work / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "-q", "-w", str(dist), str(echo_src)], timeout=INSTALL_TIMEOUT)
    [wheel] = dist.glob("inference_server_echo-*.whl")

    venv = work / "venv"
    # No pip inside: the main venv's pip installs into it (--python), which saves ~3 s.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # One pip command for core and plugins: an unrelated 'inference-server' exists on PyPI.
    run(
        [*pip, "--python", str(python), "install", "-q", str(core_src), str(mock_src), str(wheel)],
        timeout=INSTALL_TIMEOUT,
    )
    print(f"throwaway venv with the echo plugin ready in {time.monotonic() - started:.1f} s")
    return python


def write_config(path: Path, plugin: str) -> Path:
    config = {
        "default": {
            "logging": {"level": "warning"},
            "providers": {"echoer": {"plugin": plugin, "prefix": "you said: "}},
            "models": {"echo-1": {"provider": "echoer"}},
        }
    }
    path.write_text(json.dumps(config))
    return path


@contextmanager
def gateway(python: Path, config: Path, log: Path) -> Iterator[str]:
    """The gateway as a real process from the throwaway venv; yields its base URL."""
    port = free_port()
    cmd = [str(python), "-m", "inference_server", "--config", str(config), "--port", str(port)]
    with running_process(
        cmd,
        env=clean_env(),
        ready_url=f"http://127.0.0.1:{port}/",
        timeout=60,
        log_path=log,
    ):
        yield f"http://127.0.0.1:{port}"


def test_echo_is_not_installed_in_the_main_venv() -> None:
    # Otherwise the test below would not prove anything about the wheel.
    assert "echo" not in installed_plugins()


def test_installed_third_party_plugin_serves_chats(venv_python: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "settings.yaml", "echo")
    check = run(
        [str(venv_python), "-m", "inference_server", "--config", str(config), "--check-config"],
        env=clean_env(),
        timeout=60,
    )
    assert "provider echoer: plugin echo at echo://local" in check.stdout
    assert "installed plugins: echo, mock" in check.stdout

    with gateway(venv_python, config, tmp_path / "gateway.log") as url:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            health = json.load(resp)
        assert health["providers"]["echoer"] == {
            "status": "healthy",
            "plugin": "echo",
            "detail": "echo needs no upstream",
        }

        sdk = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            reply = sdk.chat.completions.create(
                model="echo-1", messages=[{"role": "user", "content": "hello there"}]
            )
            assert reply.choices[0].message.content == "you said: hello there"

            stream = sdk.chat.completions.create(
                model="echo-1",
                messages=[{"role": "user", "content": "stream me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text = ""
            usage = None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            assert text == "you said: stream me"
            assert usage is not None  # synthesised by the gateway: echo sends none
            assert usage.completion_tokens == 4
        finally:
            sdk.close()


def test_misspelled_plugin_fails_start_up_naming_installed_plugins(
    venv_python: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "settings.yaml", "ecko")
    proc = subprocess.run(
        [
            str(venv_python),
            "-m",
            "inference_server",
            "--config",
            str(config),
            "--port",
            str(free_port()),
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "provider plugin(s) not installed: ecko (installed: echo, mock)" in proc.stderr
