"""Settings layering, validation and masking (settings.yaml → RUN_ENV → .secrets → env)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from inference_server import envvars
from inference_server.settings import ConfigError, masked


def test_defaults_match_the_seed(make_settings) -> None:
    s = make_settings(base=False)
    assert s.server.port == 3000
    assert s.primary_provider.plugin == "lmstudio"
    assert s.primary_provider.base_url == "http://127.0.0.1:1234/v1"
    assert s.default_model == "gpt-oss-20b"
    assert dict(s.http_config) == {"timeout_secs": 30, "connect_timeout_secs": 30, "max_retries": 3}
    assert s.logging.level == "info"
    assert s.logging.format == "pretty"
    assert s.server.max_body_bytes == 10 * 1024 * 1024


def test_seed_environment_variable_names_override(make_settings) -> None:
    s = make_settings(
        env={
            "INFERENCE_SERVER_PORT": "8080",
            "INFERENCE_INFERENCE_BASE_URL": "http://localhost:1234/v1",
            "INFERENCE_INFERENCE_DEFAULT_MODEL": "llama-2-7b",
            "INFERENCE_LOGGING_LEVEL": "debug",
        }
    )
    assert s.server.port == 8080
    assert s.primary_provider.base_url == "http://localhost:1234/v1"
    assert s.default_model == "llama-2-7b"
    assert s.logging.level == "debug"


def test_double_underscore_form_and_lists_replace(make_settings) -> None:
    s = make_settings(
        {"inference": {"allowed_models": ["a", "b"]}},
        env={
            "INFERENCE_SERVER__PORT": "9090",
            "INFERENCE_INFERENCE__ALLOWED_MODELS": '["x"]',
            "INFERENCE_LOGGING__FILE__PATH": "logs/x.log",
        },
    )
    assert s.server.port == 9090
    assert s.allowed_models == ("x",)  # replaced, not appended to
    assert s.logging.file.path == "logs/x.log"


def test_seed_form_resolves_nested_keys() -> None:
    assert envvars.resolve("INFERENCE_LOGGING_FILE_PATH") == ["logging", "file", "path"]
    assert envvars.resolve("INFERENCE_INFERENCE_CONNECT_TIMEOUT_SECS") == [
        "inference",
        "connect_timeout_secs",
    ]
    assert envvars.resolve("INFERENCE_NO_SUCH_THING") is None


def test_run_env_selects_section_and_keeps_other_leaves(make_settings) -> None:
    sections = {"production": {"logging": {"format": "json"}, "server": {"port": 4000}}}
    dev = make_settings(sections=sections)
    assert dev.env == "development"
    assert dev.logging.format == "pretty"
    prod = make_settings(sections=sections, env={"RUN_ENV": "production"})
    assert prod.env == "production"
    assert prod.logging.format == "json"
    assert prod.server.port == 4000
    assert prod.logging.level == "warning"  # from default, merged leaf by leaf


def test_secrets_file_layers_over_settings(make_settings) -> None:
    s = make_settings(secrets={"default": {"inference": {"api_key": "sk-from-secrets"}}})
    assert s.primary_provider.api_key == "sk-from-secrets"


def test_secret_reference_resolves_from_env(make_settings) -> None:
    s = make_settings(
        {"providers": {"a": {"plugin": "mock", "api_key": "@secret my_key"}}},
        env={"INFERENCE_SECRETS__MY_KEY": "s3cret"},
    )
    assert s.providers["a"].api_key == "s3cret"


def test_every_problem_is_reported_with_its_path(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(
            {
                "server": {"port": 0, "prot": 1},
                "inference": {"timeout_secs": "soon", "max_retries": -1},
                "logging": {"format": "xml"},
            },
            env={"INFERENCE_SERVR_PORT": "1"},
        )
    text = "\n".join(info.value.problems)
    assert "server.port: must be an integer from 1 to 65535, got 0" in text
    assert "server.prot: unknown key (did you mean 'server.port'?)" in text
    assert "inference.timeout_secs" in text
    assert "inference.max_retries" in text
    assert "logging.format: must be one of pretty, json" in text
    assert "INFERENCE_SERVR_PORT" in text
    assert len(info.value.problems) == 6


def test_unknown_plugin_lists_installed_ones(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings({"inference": {"provider": "nope"}})
    assert "not installed: nope" in info.value.problems[0]
    assert "mock" in info.value.problems[0]


def test_model_table_rejects_unknown_provider(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings({"providers": {"a": {"plugin": "mock"}}, "models": {"m": {"provider": "b"}}})
    assert "models.m.provider: unknown provider 'b' (configured: a)" in info.value.problems


def test_plugin_keys_are_validated(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings({"providers": {"a": {"plugin": "mock", "latency": 5, "reply_tokens": 0}}})
    text = "\n".join(info.value.problems)
    assert "providers.a.latency: unknown key" in text
    assert "providers.a.reply_tokens: must be >= 1" in text


def test_named_providers_inherit_global_timeouts(make_settings) -> None:
    s = make_settings(
        {
            "inference": {"timeout_secs": 12, "stream_idle_timeout_secs": 3},
            "providers": {"a": {"plugin": "mock", "connect_timeout_secs": 1.5}},
            "models": {"pub": {"provider": "a", "upstream_model": "up"}},
        }
    )
    t = s.providers["a"].timeouts
    assert (t.total, t.connect, t.idle, t.first_byte) == (12, 1.5, 3, 12)
    assert s.routes["pub"].deployments[0].upstream_model == "up"
    assert s.routes["pub"].deployments[0].timeouts == t


def test_masking_hides_secrets() -> None:
    tree = {
        "inference": {"api_key": "sk-1", "base_url": "u"},
        "providers": {"p": {"api_key": "sk-2", "plugin": "openai"}},
        "secrets": {"x": "y"},
    }
    out = masked(tree)
    assert out["inference"]["api_key"] == "***"
    assert out["providers"]["p"]["api_key"] == "***"
    assert out["secrets"] == "***"
    assert out["inference"]["base_url"] == "u"


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "inference_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_check_config_exits_non_zero_listing_every_problem(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text('{"default": {"server": {"port": 70000, "x": 1}}}')
    result = _cli(tmp_path, "--check-config")
    assert result.returncode == 1
    assert "server.port" in result.stderr
    assert "server.x: unknown key" in result.stderr


def test_print_config_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text('{"default": {}}')
    (tmp_path / ".secrets.yaml").write_text('{"default": {"inference": {"api_key": "sk-hidden"}}}')
    result = _cli(tmp_path, "--print-config", "--port", "4321")
    assert result.returncode == 0, result.stderr
    assert "sk-hidden" not in result.stdout
    assert '"api_key": "***"' in result.stdout
    assert '"port": 4321' in result.stdout


def test_plugin_validate_options_hook_reports_problems(make_settings) -> None:
    from inference_server_mock import plugin as mock_plugin

    def validate(provider: str, options: Mapping[str, Any]) -> list[str]:
        return [f"providers.{provider}.models.X: bad"] if options.get("models") == ["X"] else []

    fussy = dataclasses.replace(mock_plugin, validate_options=validate)
    with pytest.raises(ConfigError) as info:
        make_settings(
            {"providers": {"p": {"plugin": "mock", "models": ["X"]}}}, plugins={"mock": fussy}
        )
    assert info.value.problems == ["providers.p.models.X: bad"]
    ok = make_settings({"providers": {"p": {"plugin": "mock"}}}, plugins={"mock": fussy})
    assert ok.providers["p"].plugin == "mock"


def test_user_chosen_names_keep_their_case(make_settings) -> None:
    s = make_settings(
        {
            "providers": {"Local": {"plugin": "mock"}},
            "models": {"Llama-3-8B": {"provider": "Local", "upstream_model": "Meta/L3"}},
        }
    )
    route = s.routes["Llama-3-8B"]
    assert route.deployments[0].id == "Local/Meta/L3"


def test_masking_honours_plugin_declared_secrets() -> None:
    from inference_server.providers.base import Setting

    tree = {"providers": {"p": {"plugin": "x", "signing_blob": "s3cret", "region": "eu"}}}
    out = masked(tree, plugin_schemas={"x": {"signing_blob": Setting((str,), None, secret=True)}})
    assert out["providers"]["p"] == {"plugin": "x", "signing_blob": "***", "region": "eu"}
