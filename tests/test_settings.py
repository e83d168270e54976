"""Settings: read from the environment in one place, checked, with derived worker counts."""

from __future__ import annotations

import os
import re
from dataclasses import fields, make_dataclass
from pathlib import Path

import pytest

from service import settings_docs
from service.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"


def test_environment_variables_set_fields_and_overrides_win():
    environ = {"PORT": "9000", "MAX_BATCH_DELAY_MS": "2.5", "MODEL_DIR": "/m", "HOST": ""}
    settings = Settings.from_env(environ, port=9100)
    assert settings.port == 9100
    assert settings.max_batch_delay_ms == 2.5
    assert settings.model_path == Path("/m")
    assert settings.host == "0.0.0.0", "an empty variable keeps the default"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "http"}, "PORT='http' is not a valid int"),
        ({"PORT": "70000"}, "PORT must be in 1..65535"),
        ({"MAX_QUEUE": "0"}, "MAX_QUEUE must be positive"),
        ({"DRAIN_S": "-1"}, "DRAIN_S must not be negative"),
        ({"MAX_IMAGES_PER_REQUEST": "1000"}, "must not exceed MAX_QUEUE"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(environ, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


def test_as_env_round_trips():
    settings = Settings(port=1234, workers=3, max_batch_delay_ms=1.5)
    assert Settings.from_env(settings.as_env()) == settings


def test_a_worker_per_core_and_the_runners_share_tensorflows_threads(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("service.settings.CGROUP_CPU_MAX", "/nonexistent")
    cores = len(os.sched_getaffinity(0))
    auto = Settings()
    assert auto.worker_count == cores
    assert auto.runner_count == 1 or Path("/dev/nvidia0").exists()
    assert Settings(runners=2).tf_threads == max(1, cores // 2)
    explicit = Settings(workers=1, tf_intra_op_threads=3)
    assert (explicit.worker_count, explicit.tf_threads) == (1, 3)


def test_token_file_wins_over_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert Settings(api_token="inline").bearer_token == "inline"
    assert Settings(api_token="inline", api_token_file=str(token_file)).bearer_token == "from-file"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot be read"), ("  \n", "the file is empty"), (b"\xff\xfe", "cannot be read")],
    ids=["missing", "blank", "not-utf8"],
)
def test_bad_token_file_is_a_settings_error_naming_the_file(tmp_path, content, message):
    token_file = tmp_path / "token"
    if isinstance(content, str):
        token_file.write_text(content)
    elif isinstance(content, bytes):
        token_file.write_bytes(content)
    with pytest.raises(SettingsError, match=f"API_TOKEN_FILE {token_file}: {message}"):
        _ = Settings(api_token_file=str(token_file)).bearer_token


def test_max_batch_size_is_used_as_given_and_zero_means_the_device_default():
    assert Settings().max_batch_size == 0
    assert Settings.from_env({"MAX_BATCH_SIZE": "64"}).max_batch_size == 64
    with pytest.raises(SettingsError, match="MAX_BATCH_SIZE must not be negative"):
        Settings(max_batch_size=-1)


def test_graceful_timeout_outlasts_the_drain_and_a_requests_whole_lifetime():
    settings = Settings(drain_s=1.5, request_timeout_s=4)
    # A request accepted at the end of the drain waits up to its deadline (4 s) and then, if
    # its batch is already running, up to the grace (4 s) for that batch.
    assert settings.running_batch_grace_s == 4
    assert settings.request_lifetime_s == 8
    assert settings.graceful_timeout_s == 15  # ceil(1.5 + 8 + the 5 s exit margin)


def test_automatic_workers_follow_the_cgroup_cpu_quota(monkeypatch, tmp_path):
    # The machine's cores and quota are the environment, not the code under test: pretend.
    monkeypatch.setattr("service.settings.os.sched_getaffinity", lambda pid: set(range(32)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr("service.settings.CGROUP_CPU_MAX", str(quota))
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two workers keep them busy
    assert Settings().worker_count == 2
    quota.write_text("max 100000\n")
    assert Settings().worker_count == 32
    assert Settings(workers=12).worker_count == 12


@pytest.mark.parametrize(("visible", "runners"), [("0,1", 2), ("3", 1), ("", 1), ("-1", 1)])
def test_one_runner_per_visible_gpu_by_default(monkeypatch, visible, runners):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert Settings().runner_count == runners
    assert Settings(runners=3).runner_count == 3


def test_a_request_may_carry_as_many_images_as_the_queue_holds_but_no_more():
    assert Settings(max_queue=8, max_images_per_request=8).max_images_per_request == 8
    with pytest.raises(SettingsError, match="must not exceed MAX_QUEUE"):
        Settings(max_queue=8, max_images_per_request=9)


def _table_rows(table: str) -> list[list[str]]:
    """Return the cells of a Markdown table's rows, header and rule left out."""
    lines = table.strip().splitlines()[2:]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_every_setting_says_what_it_means():
    assert settings_docs.undocumented(Settings) == []
    for f in fields(Settings):
        assert str(f.metadata.get("default_doc", "x")).strip(), f"{f.name}: blank default_doc"


def test_a_setting_added_without_documentation_is_caught():
    grown = make_dataclass("Grown", [("new_knob", int, 0)], bases=(Settings,), frozen=True)
    assert settings_docs.undocumented(grown) == ["new_knob"]
    with pytest.raises(LookupError, match="without documentation: new_knob"):
        settings_docs.table(grown)


def test_the_reference_lists_every_setting_once_in_field_order():
    names = [row[0].strip("`") for row in _table_rows(settings_docs.table())]
    others = [variable for variable, _, _ in settings_docs.OTHER_VARIABLES]
    assert names == [f.name.upper() for f in fields(Settings)] + others
    assert len(set(names)) == len(names)


def test_the_reference_shows_the_defaults_settings_has():
    shown = {row[0].strip("`"): row[1] for row in _table_rows(settings_docs.table())}
    defaults = Settings()
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        literal = "(empty)" if value == "" else f"`{value}`"
        if "default_doc" in f.metadata:
            # What 0 or empty stands for may be told, but the real default comes first.
            assert shown[f.name.upper()].startswith(f"{literal}:"), f.name
        else:
            assert shown[f.name.upper()] == literal, f.name


def test_the_variables_read_outside_settings_are_read_by_the_service():
    generator = Path(settings_docs.__file__).resolve()
    sources = "".join(
        path.read_text() for path in (ROOT / "service").rglob("*.py") if path != generator
    )
    for variable, _, _ in settings_docs.OTHER_VARIABLES:
        assert f'"{variable}"' in sources, variable


def test_the_configuration_reference_is_the_generated_one():
    text = CONFIGURATION_DOC.read_text(encoding="utf-8")
    assert settings_docs.between_markers(text) == settings_docs.table(), (
        "docs/configuration.md is stale: run "
        "python -m service.settings_docs --write docs/configuration.md"
    )


def test_the_generator_writes_between_the_markers_and_checks(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    start, end = settings_docs.START, settings_docs.END
    page.write_text(f"# Configuration\n\n{start}\n| old |\n{end}\n\nAfter.\n")
    assert settings_docs.main(["--check", str(page)]) == 1
    assert settings_docs.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith(f"# Configuration\n\n{start}\n| variable |")
    assert text.endswith(f"|\n{end}\n\nAfter.\n")
    assert settings_docs.between_markers(text) == settings_docs.table()
    assert settings_docs.main(["--check", str(page)]) == 0
    page.write_text("# Configuration\n")
    assert settings_docs.main(["--write", str(page)]) == 2
    assert page.read_text() == "# Configuration\n"
    assert "settings-table:start" in capsys.readouterr().err
