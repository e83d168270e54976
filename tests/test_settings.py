"""Settings: read from the environment in one place, checked, with derived worker counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import MAX_AUTO_WORKERS, Settings, SettingsError


def test_environment_variables_set_fields_and_overrides_win():
    environ = {"PORT": "9000", "MAX_BATCH_DELAY_MS": "2.5", "MODEL_DIR": "/m", "HOST": ""}
    settings = Settings.from_env(environ, port=9100)
    assert settings.port == 9100
    assert settings.max_batch_delay_ms == 2.5
    assert settings.model_dir == Path("/m")
    assert settings.host == "0.0.0.0", "an empty variable keeps the default"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "http"}, "PORT='http' is not a valid int"),
        ({"PORT": "70000"}, "PORT must be in 1..65535"),
        ({"MAX_QUEUE": "0"}, "MAX_QUEUE must be positive"),
        ({"DRAIN_S": "-1"}, "DRAIN_S must not be negative"),
        ({"MAX_IMAGES_PER_REQUEST": "500"}, "must not exceed MAX_QUEUE"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(environ, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


def test_as_env_round_trips():
    settings = Settings(port=1234, workers=3, max_batch_delay_ms=1.5)
    assert Settings.from_env(settings.as_env()) == settings


def test_workers_and_tensorflow_threads_share_out_the_cores():
    cores = len(os.sched_getaffinity(0))
    auto = Settings()
    assert auto.worker_count == min(cores, MAX_AUTO_WORKERS)
    assert auto.tf_threads == max(1, cores // auto.worker_count)
    explicit = Settings(workers=1, tf_intra_op_threads=3)
    assert (explicit.worker_count, explicit.tf_threads) == (1, 3)


def test_token_file_wins_over_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert Settings(api_token="inline").bearer_token == "inline"
    assert Settings(api_token="inline", api_token_file=str(token_file)).bearer_token == "from-file"
