"""`cnn-serve` and `cnn-train` before any server starts: missing TensorFlow, and `--check`,
which loads the models on the serving backend, as a runner does."""

from __future__ import annotations

import pytest

from tests.conftest import LABELS, run_python, write_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("program", "module", "options"),
    [("cnn-serve", "service", ["--check"]), ("cnn-train", "training", ["--synthetic", "shapes"])],
)
def test_missing_tensorflow_is_one_line_naming_the_extra(
    tmp_path, model_dir, program, module, options
):
    target = ["--model-dir", str(model_dir)] if module == "service" else ["--out", str(tmp_path)]
    result = run_python(["-m", module, *options, *target], tmp_path, hide_tensorflow=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: TensorFlow is not installed")
    assert "pip install 'cnn-serving[cpu]'" in lines[0]
    assert not list(tmp_path.glob("shapes*")), "nothing is trained without TensorFlow"


def test_check_vets_the_model_on_the_serving_backend(tmp_path, model_dir):
    script = (
        "import sys\n"
        "from service import cli\n"
        "from service.settings import Settings\n"
        f"[files] = cli.check_models(Settings(model_dir={str(model_dir)!r}))\n"
        "print(files.name, files.version, len(files.labels), 'tensorflow' in sys.modules)\n"
    )
    result = run_python(["-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shapes", "2", str(len(LABELS)), "True"]


def test_check_command_reports_the_model_and_exits_0(tmp_path, cnn):
    folder = write_model(tmp_path / "m" / "4", cnn, LABELS)
    result = run_python(["-m", "service", "--check", "--model-dir", str(folder.parent)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cnn-serve: m version 4 loads: 3 classes"


def test_check_of_a_repository_reports_each_model_version_its_policy_serves(tmp_path, cnn):
    repository = tmp_path / "repo"
    for version in (1, 2, 3):
        write_model(repository / "shapes" / str(version), cnn, LABELS)
    (repository / "shapes" / "config.json").write_text('{"version_policy": "latest:2"}')
    write_model(repository / "digits", cnn, LABELS)
    result = run_python(
        ["-m", "service", "--check", "--model-repository", str(repository)], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "cnn-serve: digits version 1 loads: 3 classes",
        "cnn-serve: shapes version 2 loads: 3 classes",
        "cnn-serve: shapes version 3 loads: 3 classes",
    ]


def test_a_broken_newest_version_is_reported_and_the_one_before_is_served(tmp_path, cnn):
    write_model(tmp_path / "m" / "1", cnn, LABELS)
    (write_model(tmp_path / "m" / "2", cnn, LABELS) / "model.json").write_text("{")
    result = run_python(["-m", "service", "--check", "--model-dir", str(tmp_path / "m")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cnn-serve: m version 1 loads: 3 classes"
    [warning] = result.stderr.strip().splitlines()
    assert warning.startswith("cnn-serve: warning: version refused: ")
    assert "2/model.json: not valid JSON" in warning


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"MODEL_DIR": "a", "MODEL_REPOSITORY": "b"}, "MODEL_DIR and MODEL_REPOSITORY are both"),
        ({"MODEL_VERSION_POLICY": "newest"}, "version policy 'newest' is not one of"),
        ({"MODEL_POLL_S": "-1"}, "MODEL_POLL_S must not be negative"),
    ],
)
def test_bad_model_settings_stop_start_up_with_one_line(tmp_path, environment, expected):
    result = run_python(["-m", "service", "--check"], timeout_s=120, **environment)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cnn-serve: error: ") and expected in line


def test_a_repository_model_with_no_version_that_loads_stops_start_up(tmp_path, cnn):
    repository = tmp_path / "repo"
    write_model(repository / "good" / "1", cnn, LABELS)
    (write_model(repository / "bad" / "1", cnn, LABELS) / "labels.json").write_text("[]")
    result = run_python(
        ["-m", "service", "--check", "--model-repository", str(repository)], tmp_path
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cnn-serve: error: ")
    assert "bad/1/labels.json: must be a non-empty JSON array" in line
