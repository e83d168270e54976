"""The cnn-train command: bad input gets one error line and a non-zero exit; runs report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_training import SPEC, write_folder, write_image
from training import data, report
from training.cli import build_parser, main, summary
from training.pipeline import TrainingRun

TINY = ["--samples-per-class", "8", "--epochs", "1", "--batch-size", "8", "--filters", "4"]
TINY += ["--convs-per-block", "1", "--dense-units", "8", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run cnn-train in-process; return (exit status, stdout, stderr)."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG but not really")


def images_without_class_folders(root: Path) -> None:
    for i in range(2):
        write_image(root / f"{i}.png", "circle", i, "RGB", (20, 20))


BAD_FOLDERS = {
    "missing": (lambda root: None, "no such folder"),
    "a file": (lambda root: root.write_text("x"), "not a folder"),
    "empty": (lambda root: root.mkdir(), "empty; expected one sub-folder of images per class"),
    "no class folders": (images_without_class_folders, "one sub-folder per class"),
    "one class": (lambda root: write_folder(root, ("cat",), 5), "found one class ('cat')"),
    "too few images": (
        lambda root: (write_folder(root, ("cat",), 5), write_folder(root, ("dog",), 2)),
        "class 'dog' has 2 usable image(s): too few",
    ),
    "class without images": (
        lambda root: (write_folder(root, ("cat",), 5), (root / "dog").mkdir()),
        "class 'dog' has 0 usable image(s)",
    ),
    "nothing readable": (
        lambda root: (garbage(root / "cat" / "a.png"), garbage(root / "dog" / "b.jpg")),
        "none of the 2 image files could be read",
    ),
    "split folders beside class folders": (
        lambda root: write_folder(root, ("train", "cat"), 3),
        "mixes split folders (train/) with other folders (cat/)",
    ),
    "split folders with other classes": (
        lambda root: (
            write_folder(root / "train", ("cat", "dog"), 4),
            write_folder(root / "test", ("cat", "cow"), 2),
        ),
        "class folders differ from those of train/",
    ),
    "split folder without a readable image of a class": (
        lambda root: (
            write_folder(root / "train", ("cat", "dog"), 4),
            write_folder(root / "test", ("cat",), 2),
            garbage(root / "test" / "dog" / "a.png"),
        ),
        "test: no readable image of class 'dog'",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS, ids=str)
def test_bad_data_is_one_error_line_and_exit_1(case, tmp_path, capsys):
    build, message = BAD_FOLDERS[case]
    root = tmp_path / "data"
    build(root)
    status, out, err = run(capsys, "--data", root, *TINY, "--out", tmp_path / "models")
    assert (status, out) == (1, "")
    [line] = err.splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--synthetic", "shapes", "--data", "x"], "not allowed with argument"),
        (["--synthetic", "circles"], "invalid choice"),
        (["--synthetic", "shapes", "--img-size", "0"], "is not N or HEIGHTxWIDTH"),
        (["--synthetic", "shapes", "--img-size", "12"], "too small for 2 blocks"),
        (["--synthetic", "shapes", "--val-split", "0.6", "--test-split", "0.5"], "sum below 1"),
        (["--synthetic", "shapes", "--name", "../elsewhere"], "must be letters"),
        (["--synthetic", "shapes", "--epochs", "0"], "epochs must be at least 1"),
    ],
)
def test_bad_options_are_usage_errors(argv, message, capsys):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert message in err.splitlines()[-1]


def test_synthetic_run_prints_where_the_model_went_and_per_class_figures(tmp_path, capsys):
    status, out, _ = run(capsys, "--synthetic", "shapes", *TINY, "--out", tmp_path)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"Model saved to {tmp_path / 'shapes' / '1'}"
    assert lines[1].startswith("Test accuracy ") and lines[1].endswith("on 4 images")
    assert lines[2].split() == ["class", "precision", "recall", "support"]
    assert [line.split()[0] for line in lines[3:]] == ["circle", "square", "triangle", "cross"]
    status, out, _ = run(capsys, "--synthetic", "shapes", *TINY, "--out", tmp_path)
    assert out.splitlines()[0].endswith(str(Path("shapes") / "2"))


def test_python_dash_m_training_reports_errors_without_a_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [sys.executable, "-m", "training", "--data", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"error: {missing}: no such folder"
    assert "Traceback" not in result.stderr


def test_every_option_reaches_its_own_field():
    argv = "--data pics --out OUT --name n --img-size 24x40 --grayscale --epochs 3 --batch-size 5"
    argv += " --seed 9 --val-split 0.1 --test-split 0.3 --patience 6 --learning-rate 0.02"
    argv += " --filters 4 8 --convs-per-block 3 --dense-units 7 --dropout 0.2 --quiet"
    argv += " --samples-per-class 11"
    assert vars(build_parser().parse_args(argv.split())) == {
        "data": Path("pics"),
        "synthetic": None,
        "samples_per_class": 11,
        "out": Path("OUT"),
        "name": "n",
        "img_size": (24, 40),
        "grayscale": True,
        "epochs": 3,
        "batch_size": 5,
        "seed": 9,
        "val_split": 0.1,
        "test_split": 0.3,
        "patience": 6,
        "learning_rate": 0.02,
        "filters": [4, 8],
        "convs_per_block": 3,
        "dense_units": 7,
        "dropout": 0.2,
        "verbose": 0,
    }


def test_summary_lists_precision_recall_and_support_of_each_class():
    # Rows true class, columns predicted: blue 3 of 4 right, green 3 of 3, red 3 of 4.
    confusion = np.array([[3, 0, 1], [0, 3, 0], [0, 1, 3]])
    evaluation = report.Evaluation(("blue", "green", "red"), 0.25, 9 / 11, confusion)
    dataset = data.Dataset(evaluation.labels, {})
    run = TrainingRun(None, Path("models") / "colours" / "3", SPEC, dataset, evaluation)
    lines = summary(run).splitlines()
    assert lines[0] == f"Model saved to {Path('models') / 'colours' / '3'}"
    assert lines[1] == "Test accuracy 0.8182, loss 0.2500, on 11 images"
    assert [line.split() for line in lines[2:]] == [
        ["class", "precision", "recall", "support"],
        ["blue", "1.0000", "0.7500", "4"],
        ["green", "0.7500", "1.0000", "3"],
        ["red", "0.7500", "0.7500", "4"],
    ]
