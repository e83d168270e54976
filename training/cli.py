"""The `cnn-train` command: parse options, train, print where the model went and how it did."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_folder.requirements import missing_tensorflow

if TYPE_CHECKING:
    from training.pipeline import TrainingRun

# training.pipeline imports TensorFlow: it is imported only once main() has checked for it.


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; each option's destination is a TrainingOptions field."""
    from training.pipeline import SYNTHETIC_DATASETS, TrainingOptions

    defaults = {field.name: field.default for field in dataclasses.fields(TrainingOptions)}
    parser = argparse.ArgumentParser(
        prog="cnn-train",
        description="Train the CNN image classifier and save it as the next model version.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="image folder: DIR/<class>/* or DIR/train|val|test/<class>/*",
    )
    source.add_argument("--synthetic", choices=SYNTHETIC_DATASETS, help="built-in dataset")
    option = _option_adder(parser, defaults)
    option("--samples-per-class", int, "images per class of the synthetic dataset", metavar="N")
    option("--out", Path, "models are saved to OUT/NAME/<next version>/", metavar="OUT")
    parser.add_argument(
        "--name", help="model name (default: the dataset's or the data folder's name)"
    )
    option("--img-size", _image_size, "input size: N, or HEIGHTxWIDTH", metavar="SIZE")
    parser.add_argument("--grayscale", action="store_true", help="one input channel, not three")
    option("--epochs", int, "most epochs to train; early stopping may end sooner")
    option("--batch-size", int, "images per training step")
    option("--seed", int, "fixes the split, synthetic images, initial weights and order")
    option("--val-split", float, "fraction of each class for validation, unless pre-split")
    option("--test-split", float, "fraction of each class for the test, unless pre-split")
    option("--patience", int, "epochs without a lower validation loss before stopping")
    option("--learning-rate", float, "Adam's learning rate")
    option = _option_adder(parser.add_argument_group("architecture"), defaults)
    option("--filters", int, "filters of each convolution block, one number per block", nargs="+")
    option("--convs-per-block", int, "3x3 convolutions per block")
    option("--dense-units", int, "width of the hidden Dense layer")
    option("--dropout", float, "dropout after each convolution block")
    parser.add_argument(
        "--quiet",
        dest="verbose",
        action="store_const",
        const=0,
        default=defaults["verbose"],
        help="no model summary, no progress bars",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit status."""
    if missing := missing_tensorflow():
        print(f"cnn-train: error: {missing}", file=sys.stderr)
        return 1
    from training.data import DatasetError
    from training.pipeline import TrainingOptions, train

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args["filters"] = tuple(args["filters"])
    try:
        options = TrainingOptions(**args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        run = train(options)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(run))
    return 0


def summary(run: TrainingRun) -> str:
    """Describe where the model went and how it did on the test split."""
    evaluation = run.evaluation
    per_class = evaluation.per_class()
    width = max(len("class"), *(len(label) for label in per_class))
    lines = [
        f"Model saved to {run.folder}",
        f"Test accuracy {evaluation.accuracy:.4f}, loss {evaluation.loss:.4f}, "
        f"on {int(evaluation.confusion.sum())} images",
        f"{'class':<{width}}  precision  recall  support",
    ]
    for label, scores in per_class.items():
        lines.append(
            f"{label:<{width}}  {scores['precision']:>9.4f}  {scores['recall']:>6.4f}"
            f"  {scores['support']:>7}"
        )
    return "\n".join(lines)


def _option_adder(
    group: argparse._ActionsContainer, defaults: dict[str, Any]
) -> Callable[..., None]:
    """Return a function adding an option whose default is the TrainingOptions field's."""

    def add(flag: str, kind: Callable[[str], object], help: str, **extra: Any) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        default = defaults[dest]
        shown = default
        if isinstance(default, tuple):  # as typed: image size "32x32", filters "32 64"
            shown = ("x" if dest == "img_size" else " ").join(map(str, default))
        group.add_argument(
            flag, type=kind, default=default, help=f"{help} (default: {shown})", **extra
        )

    return add


def _image_size(text: str) -> tuple[int, int]:
    """Parse "32" or "48x64" (height x width) into (height, width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or HEIGHTxWIDTH")
    height, width = int(parts[0]), int(parts[-1])
    return height, width
