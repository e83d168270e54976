"""Train one model end to end: data -> model -> fit -> evaluate -> export."""

from __future__ import annotations

import dataclasses
import logging
import platform
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model_folder.metadata import InputMetadata, Metadata
from model_folder.preprocessing import InputSpec
from training import data, export, report
from training.model import make_model, smallest_input_side

log = logging.getLogger(__name__)

SYNTHETIC_DATASETS = ("shapes",)
# Inputs centred on zero, in [-1, 1]: without batch normalisation the CNN leaves its
# chance-level start epochs sooner than with [0, 1] (measured on the shapes dataset).
INPUT_RESCALE = 1.0 / 127.5
INPUT_OFFSET = -1.0
# Threads that read and preprocess images while the model trains on the previous batch.
READER_THREADS = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class TrainingOptions:
    """Everything one training run depends on; checked when built."""

    data: Path | None = None  # image folder: DATA/<class>/* or DATA/train|val|test/<class>/*
    synthetic: str | None = None  # built-in dataset instead of a folder: "shapes"
    samples_per_class: int = 1000  # images per class of the synthetic dataset
    out: Path = Path("models")  # the model goes to OUT/<name>/<next version>/
    name: str | None = None  # default: the synthetic dataset's or the data folder's name
    img_size: tuple[int, int] = (32, 32)  # input (height, width); images are resized to it
    grayscale: bool = False  # one input channel instead of three
    epochs: int = 20  # at most; early stopping may end sooner
    batch_size: int = 32
    seed: int = 1  # fixes the split, the synthetic images, the initial weights and the order
    val_split: float = 0.15  # fraction of each class held out for validation (if not pre-split)
    test_split: float = 0.15  # fraction of each class held out for the test (if not pre-split)
    patience: int = 4  # epochs without a lower validation loss before training stops
    learning_rate: float = 1e-3  # Adam's
    filters: tuple[int, ...] = (32, 64)  # one convolution block per entry
    convs_per_block: int = 2  # 3x3 convolutions (each with ReLU) before each pooling
    dense_units: int = 128  # width of the hidden Dense layer
    dropout: float = 0.25  # after each convolution block (the hidden Dense layer has 0.5)
    verbose: int = 1  # 0: silent; 1: model summary and Keras progress bars

    def __post_init__(self) -> None:
        if (self.data is None) == (self.synthetic is None):
            raise ValueError("give either an image folder or a synthetic dataset, not both")
        if self.synthetic is not None and self.synthetic not in SYNTHETIC_DATASETS:
            raise ValueError(f"unknown synthetic dataset {self.synthetic!r}")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        at_least_one = {
            "samples per class": self.samples_per_class,
            "epochs": self.epochs,
            "batch size": self.batch_size,
            "filters": min(self.filters, default=0),
            "convolutions per block": self.convs_per_block,
            "dense units": self.dense_units,
        }
        for what, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{what} must be at least 1")
        fractions = (self.val_split, self.test_split)
        if not all(0 < f < 1 for f in fractions) or sum(fractions) >= 1:
            raise ValueError("validation and test splits must be fractions that sum below 1")
        if not 0 <= self.dropout < 1 or self.patience < 0 or self.learning_rate <= 0:
            raise ValueError("dropout must be in [0, 1), patience >= 0, learning rate > 0")
        side = smallest_input_side(len(self.filters), self.convs_per_block)
        if min(self.img_size) < side:
            raise ValueError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is too small for "
                f"{len(self.filters)} blocks: it needs at least {side}x{side}"
            )

    @property
    def model_name(self) -> str:
        """Return the name the model is saved under."""
        if self.name:
            return self.name
        return Path(self.data).resolve().name if self.data else str(self.synthetic)

    def input_spec(self) -> InputSpec:
        """Return the model input these options ask for."""
        height, width = self.img_size
        channels = 1 if self.grayscale else 3
        return InputSpec(height, width, channels, rescale=INPUT_RESCALE, offset=INPUT_OFFSET)


@dataclass(frozen=True)
class TrainingRun:
    """A trained model, where it was saved, and how it did."""

    model: keras.Model
    folder: Path
    spec: InputSpec
    dataset: data.Dataset
    evaluation: report.Evaluation


def load_dataset(options: TrainingOptions, spec: InputSpec) -> data.Dataset:
    """Return the dataset the options name, split into train, val and test."""
    fractions = (options.val_split, options.test_split)
    if options.data is not None:
        return data.load_folder(options.data, spec, *fractions, options.seed)
    return data.load_shapes(options.samples_per_class, *fractions, options.seed)


def train(options: TrainingOptions) -> TrainingRun:
    """Train, evaluate and export one model; return it with where it went and how it did."""
    keras.utils.set_random_seed(options.seed)
    spec = options.input_spec()

    # Data: every image becomes model input through the service's own preprocessing.
    dataset = load_dataset(options, spec)
    if dataset.skipped:
        file, reason = dataset.skipped[0]
        log.warning(
            "skipped %d unreadable image file(s), e.g. %s: %s", len(dataset.skipped), file, reason
        )
    sizes = ", ".join(f"{len(samples)} {split}" for split, samples in dataset.splits.items())
    log.info("%s: %d classes; %s images", options.model_name, len(dataset.classes), sizes)
    num_classes = len(dataset.classes)
    batches = {
        split: data.ImageBatches(
            samples,
            num_classes,
            spec,
            options.batch_size,
            shuffle_seed=options.seed if split == "train" else None,
            workers=READER_THREADS,
        )
        for split, samples in dataset.splits.items()
    }

    # Model.
    model = make_model(
        spec.shape,
        num_classes,
        options.filters,
        options.convs_per_block,
        options.dense_units,
        options.dropout,
    )
    if options.verbose:
        model.summary()
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )

    # Fit, then keep the weights of the epoch with the lowest validation loss.
    stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=options.patience,
        restore_best_weights=True,
        verbose=options.verbose,
    )
    history = model.fit(
        batches["train"],
        validation_data=batches["val"],
        epochs=options.epochs,
        callbacks=[stopping],
        shuffle=False,  # ImageBatches reshuffles the samples themselves every epoch
        verbose=options.verbose,
    )

    # Evaluate on the held-out test split.
    loss, accuracy = model.evaluate(batches["test"], verbose=options.verbose)
    predicted = np.argmax(model.predict(batches["test"], verbose=0), axis=1)
    confusion = report.confusion_matrix(batches["test"].labels, predicted, num_classes)
    evaluation = report.Evaluation(dataset.classes, float(loss), float(accuracy), confusion)

    # Export.
    metadata = _metadata(options, spec, dataset, evaluation, history.history, stopping.best_epoch)
    folder = export.save_version(
        model,
        Path(options.out) / options.model_name,
        dataset.classes,
        metadata,
        history.history,
        evaluation,
    )
    return TrainingRun(model, folder, spec, dataset, evaluation)


def _metadata(
    options: TrainingOptions,
    spec: InputSpec,
    dataset: data.Dataset,
    evaluation: report.Evaluation,
    history: dict[str, list[float]],
    best_epoch: int,
) -> Metadata:
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(options).items()
    }
    source = f"synthetic:{options.synthetic}" if options.synthetic else settings["data"]
    return Metadata(
        name=options.model_name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        input=InputMetadata.of(spec),
        training={
            "dataset": {
                "source": source,
                "counts": dataset.counts(),
                "skipped_files": len(dataset.skipped),
            },
            "options": settings,
            "epochs_run": len(history["loss"]),
            "best_epoch": best_epoch + 1,
            "evaluation": {
                "test_loss": evaluation.loss,
                "test_accuracy": evaluation.accuracy,
                "per_class": evaluation.per_class(),
            },
            "versions": {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "python": platform.python_version(),
            },
        },
    )
