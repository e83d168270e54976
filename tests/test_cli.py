"""`cnn-serve` and `cnn-train` before any server starts: missing TensorFlow, and the launcher's
model check, which must not import TensorFlow (each worker does that once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LABELS, ROOT, write_model

pytestmark = pytest.mark.slow


def run_python(args: list[str], tmp_path: Path, hide_tensorflow: bool = False):
    """Run this interpreter on `args` from the repository root; return the finished process."""
    path = [str(ROOT)]
    if hide_tensorflow:
        # As if TensorFlow were not installed: an import of it fails, find_spec finds nothing.
        site = tmp_path / "no-tensorflow"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text('import sys\nsys.modules["tensorflow"] = None\n')
        path.insert(0, str(site))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    environment.pop("KERAS_BACKEND", None)
    return subprocess.run(
        [sys.executable, *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


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


def test_check_vets_the_model_without_importing_tensorflow(tmp_path, model_dir):
    script = (
        "import sys\n"
        "from service import cli\n"
        f"files = cli.check_model({str(model_dir)!r})\n"
        "print(files.name, files.version, len(files.labels), 'tensorflow' in sys.modules)\n"
    )
    result = run_python(["-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shapes", "2", str(len(LABELS)), "False"]


def test_check_command_reports_the_model_and_exits_0(tmp_path, cnn):
    folder = write_model(tmp_path / "m" / "4", cnn, LABELS)
    result = run_python(["-m", "service", "--check", "--model-dir", str(folder.parent)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cnn-serve: m version 4 loads: 3 classes"
