"""Labelled images in, model batches out: image folders, stratified splits, streaming batches.

Every image, from a file or from memory, becomes model input through `model_folder.preprocessing`,
the very function the service runs on uploads, so training and serving cannot drift apart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from model_folder.errors import ImageRejected
from model_folder.preprocessing import InputSpec, decode_image, preprocess
from training import shapes

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """The data cannot be trained on; the message is one line naming the folder and fault."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file, or encoded image bytes held in memory."""

    source: Path | bytes
    label: int

    def read(self) -> bytes:
        """Return the encoded image bytes."""
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()


@dataclass(frozen=True)
class Dataset:
    """Class names and the train/val/test samples, with the unreadable files left out."""

    classes: tuple[str, ...]
    splits: dict[str, list[Sample]]
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason)

    def counts(self) -> dict[str, dict[str, int]]:
        """Return the number of images per split and class."""
        return {
            split: {name: sum(s.label == i for s in samples) for i, name in enumerate(self.classes)}
            for split, samples in self.splits.items()
        }


def split_sizes(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Return (train, val, test) sizes for one class: every non-zero fraction gets an image."""
    val = max(1, round(count * val_fraction)) if val_fraction else 0
    test = max(1, round(count * test_fraction)) if test_fraction else 0
    return count - val - test, val, test


def stratified_split(
    samples: Sequence[Sample],
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[Sample]]:
    """Split samples into train/val/test, class by class, in an order fixed by `seed`."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for label, name in enumerate(classes):
        members = [s for s in samples if s.label == label]
        sizes = split_sizes(len(members), val_fraction, test_fraction)
        if sizes[0] < 1:
            raise DatasetError(
                f"class {name!r} has {len(members)} usable image(s): too few to split off "
                f"{val_fraction:.0%} for validation and {test_fraction:.0%} for test and "
                "keep one to train on"
            )
        shuffled = [members[i] for i in rng.permutation(len(members))]
        ends = np.cumsum(sizes)
        for split, start, end in zip(SPLITS, (0, *ends[:-1]), ends, strict=True):
            splits[split] += shuffled[start:end]
    return splits


def load_folder(
    root: Path, spec: InputSpec, val_fraction: float, test_fraction: float, seed: int
) -> Dataset:
    """Read `root/<class>/*`, or `root/train|val|test/<class>/*`, and split what is not split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    folders = _subfolders(root)
    if "train" in folders:
        return _load_split_folders(root, folders, spec, val_fraction, test_fraction, seed)
    classes = _classes(root, folders)
    samples, skipped = _read_class_folders(root, classes, spec)
    splits = stratified_split(samples, classes, val_fraction, test_fraction, seed)
    return Dataset(tuple(classes), splits, tuple(skipped))


def load_shapes(
    samples_per_class: int, val_fraction: float, test_fraction: float, seed: int
) -> Dataset:
    """Make the synthetic shapes dataset in memory and split it."""
    samples = [Sample(data, label) for data, label in shapes.make_images(samples_per_class, seed)]
    splits = stratified_split(samples, shapes.SHAPES, val_fraction, test_fraction, seed)
    return Dataset(shapes.SHAPES, splits)


class ImageBatches(keras.utils.PyDataset):
    """Batches of (preprocessed images, one-hot labels), read from their sources as needed.

    Only one batch of pixels is in memory at a time, so a folder larger than memory trains.
    With a `shuffle_seed`, the order is reshuffled after every epoch, reproducibly.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        spec: InputSpec,
        batch_size: int,
        shuffle_seed: int | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=False)
        self.samples = list(samples)
        self.num_classes = num_classes
        self.spec = spec
        self.batch_size = batch_size
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)
        self._order = np.arange(len(self.samples))
        self._rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picked = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        images = np.stack([preprocess(self.samples[i].read(), self.spec) for i in picked])
        return images, np.eye(self.num_classes, dtype=np.float32)[self.labels[picked]]

    def on_epoch_end(self) -> None:
        if self._rng is not None:
            self._rng.shuffle(self._order)


def _load_split_folders(
    root: Path,
    folders: list[str],
    spec: InputSpec,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """Read train/ and whichever of val/ and test/ exist; carve the others out of train/."""
    others = sorted(set(folders) - set(SPLITS))
    if others:
        raise DatasetError(
            f"{root}: mixes split folders (train/) with other folders ({', '.join(others)}/)"
        )
    classes = _classes(root / "train", _subfolders(root / "train"))
    given: dict[str, list[Sample]] = {}
    skipped: list[tuple[str, str]] = []
    for split in SPLITS:
        if split not in folders:
            continue
        if _subfolders(root / split) != classes:
            raise DatasetError(f"{root / split}: class folders differ from those of train/")
        given[split], unreadable = _read_class_folders(root / split, classes, spec)
        skipped += unreadable
    carved = stratified_split(
        given["train"],
        classes,
        0.0 if "val" in given else val_fraction,
        0.0 if "test" in given else test_fraction,
        seed,
    )
    splits = carved | {split: given[split] for split in ("val", "test") if split in given}
    dataset = Dataset(tuple(classes), splits, tuple(skipped))
    for split, counts in dataset.counts().items():
        missing = [name for name, count in counts.items() if not count]
        if missing:
            raise DatasetError(f"{root / split}: no readable image of class {missing[0]!r}")
    return dataset


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _classes(root: Path, folders: list[str]) -> list[str]:
    if not folders:
        if any(_image_files(root)):
            raise DatasetError(
                f"{root}: images must sit in one sub-folder per class ({root}/<class>/*)"
            )
        raise DatasetError(f"{root}: empty; expected one sub-folder of images per class")
    if len(folders) == 1:
        raise DatasetError(
            f"{root}: found one class ({folders[0]!r}); a classifier needs at least two"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _read_class_folders(
    root: Path, classes: Sequence[str], spec: InputSpec
) -> tuple[list[Sample], list[tuple[str, str]]]:
    files = [
        (path, label) for label, name in enumerate(classes) for path in _image_files(root / name)
    ]
    if not files:
        raise DatasetError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # Decode every file once up front: an unreadable one is left out now, not mid-training.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        faults = list(pool.map(lambda file: _fault(file[0], spec), files))
    samples = [
        Sample(path, label) for (path, label), fault in zip(files, faults, strict=True) if not fault
    ]
    skipped = [(str(path), fault) for (path, _), fault in zip(files, faults, strict=True) if fault]
    if not samples:
        raise DatasetError(f"{root}: none of the {len(files)} image files could be read")
    return samples, skipped


def _fault(path: Path, spec: InputSpec) -> str:
    """Return why the image file cannot be used, or "" if it can."""
    try:
        decode_image(path.read_bytes(), spec)
    except ImageRejected as exc:
        return str(exc)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return ""
