"""The ``--workers`` supervisor with forked stand-in workers: start-up failures back off and stop
the server after ``server.worker_max_boot_failures``; a worker that cannot start stops it at once.

(The real gateway under supervision: see test_lifecycle.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from inference_server.settings import Settings
from inference_server.supervisor import EXIT_CANNOT_START, Supervisor, describe_exit
from tests.conftest import SettingsFactory


def dies_at_start(_settings: Settings, _ready: Callable[[], None], _loader: object) -> int:
    return 1


def cannot_start(_settings: Settings, _ready: Callable[[], None], _loader: object) -> int:
    return EXIT_CANNOT_START


def settings_for(make_settings: SettingsFactory) -> Settings:
    return make_settings(
        {
            "inference": {"provider": "mock"},
            "server": {
                "workers": 2,
                "worker_restart_backoff_secs": 0.05,
                "worker_max_boot_failures": 4,
                "shutdown_timeout_secs": 1,
            },
        }
    )


def test_workers_dying_at_start_up_back_off_then_stop_the_server(
    make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    code = Supervisor(settings_for(make_settings), dies_at_start).run()
    took = time.monotonic() - began
    out = capsys.readouterr().out
    assert code == 1
    waits = [line.rsplit(" in ", 1)[1] for line in out.splitlines() if "restarting it in" in line]
    assert waits[:3] == ["0.05 s", "0.1 s", "0.2 s"]  # doubling per consecutive failure
    assert "during start-up" in out
    assert "stopping: workers died at start-up 4 times in a row" in out
    assert took >= 0.05 + 0.1  # the backoff was waited, not just logged
    assert took < 10


def test_a_worker_that_cannot_start_stops_the_server_at_once(
    make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    code = Supervisor(settings_for(make_settings), cannot_start).run()
    out = capsys.readouterr().out
    assert code == 1
    assert "cannot start (exited with code 3" in out
    assert "restarting" not in out


def test_exit_descriptions() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(None) == "is still running"
