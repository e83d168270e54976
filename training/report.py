"""The evaluation report: confusion matrix, per-class precision and recall, and the plots.

Figures are drawn without pyplot, so no global state and no GUI backend: `savefig` renders
PNG files with Agg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True)
class Evaluation:
    """How the model did on the test split."""

    labels: tuple[str, ...]
    loss: float
    accuracy: float
    confusion: np.ndarray  # rows: true class, columns: predicted class

    def per_class(self) -> dict[str, dict[str, float | int]]:
        """Return precision, recall and support of every class (0.0 where undefined)."""
        hits = np.diag(self.confusion).astype(np.float64)
        predicted = self.confusion.sum(axis=0)
        actual = self.confusion.sum(axis=1)
        precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
        recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
        return {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "support": int(actual[i]),
            }
            for i, label in enumerate(self.labels)
        }


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (true class, predicted class) pairs into a num_classes x num_classes matrix."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    return confusion


def plot_training_curves(history: Mapping[str, Sequence[float]], path: Path) -> None:
    """Plot loss and accuracy per epoch, train against validation, to a PNG."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        axes.plot(epochs, history[metric], marker="o", label="train")
        axes.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        axes.set(title=metric.capitalize(), xlabel="epoch", ylabel=metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=100)


def plot_confusion_matrix(evaluation: Evaluation, path: Path) -> None:
    """Plot the test confusion matrix, counts in the cells, to a PNG."""
    confusion, labels = evaluation.confusion, evaluation.labels
    side = 2.0 + 0.6 * len(labels)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = np.arange(len(labels))
    axes.set_xticks(ticks, labels, rotation=45, ha="right")
    axes.set_yticks(ticks, labels)
    axes.set(
        title=f"Test confusion matrix (accuracy {evaluation.accuracy:.3f})",
        xlabel="predicted class",
        ylabel="true class",
    )
    # Dark text on light cells and light text on dark ones.
    threshold = confusion.max() / 2
    for (row, column), count in np.ndenumerate(confusion):
        colour = "white" if count > threshold else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=colour)
    figure.savefig(path, dpi=100)
