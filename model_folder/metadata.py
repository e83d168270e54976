"""`metadata.json`, typed: what training writes and what the service reads, field for field.

    {
      "name": "shapes",                  the model's name (a repository names it by its folder)
      "version": "3",                    the version folder it was written to
      "created": "2026-12-01T10:00:00+00:00",
      "input": {"height": 32, "width": 32, "channels": 3, "color_mode": "rgb",
                "rescale": 0.00392156862745098, "offset": 0.0},
      "training": {...}                  the run that made it: dataset, options, epochs,
    }                                    evaluation, library versions

Every field is optional: a hand-made model folder needs no metadata.json at all, and its
input is then scaled by 1/255 (preprocessing.DEFAULT_RESCALE).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_folder.errors import ModelFolderError
from model_folder.json_file import read_json
from model_folder.preprocessing import DEFAULT_OFFSET, DEFAULT_RESCALE, InputSpec

COLOR_MODES = ("grayscale", "rgb")


@dataclass(frozen=True)
class InputMetadata:
    """What metadata.json says of the input; the size, where given, must match the model's."""

    height: int | None = None
    width: int | None = None
    channels: int | None = None
    color_mode: str | None = None
    rescale: float = DEFAULT_RESCALE
    offset: float = DEFAULT_OFFSET

    @classmethod
    def of(cls, spec: InputSpec) -> InputMetadata:
        """Return the metadata that describes `spec` completely."""
        return cls(
            spec.height, spec.width, spec.channels, spec.color_mode, spec.rescale, spec.offset
        )

    def spec(self, shape: tuple[int, int, int], source: Path) -> InputSpec:
        """Return the InputSpec of a model whose input is `shape` (height, width, channels)."""
        height, width, channels = shape
        expected_mode = "grayscale" if channels == 1 else "rgb"
        if self.color_mode not in (None, expected_mode):
            raise ModelFolderError(
                f"{source}: color_mode {self.color_mode!r} does not fit the model's "
                f"{channels} input channel(s) (expected {expected_mode!r})"
            )
        given = (self.height, self.width, self.channels)
        if any(mine not in (None, theirs) for mine, theirs in zip(given, shape, strict=True)):
            raise ModelFolderError(
                f"{source}: input {list(given)} does not match the model's input {list(shape)}"
            )
        return InputSpec(height, width, channels, rescale=self.rescale, offset=self.offset)


@dataclass(frozen=True)
class Metadata:
    """The typed contents of metadata.json."""

    name: str | None = None
    version: str | None = None
    created: str | None = None
    input: InputMetadata = field(default_factory=InputMetadata)
    # The training run's record (dataset, options, epochs, evaluation, library versions):
    # shown by the service as it is, so its inner shape is training's to choose.
    training: Mapping[str, Any] = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        """Return the accuracy training measured on its held-out test split, if recorded."""
        evaluation = self.training.get("evaluation")
        value = evaluation.get("test_accuracy") if isinstance(evaluation, Mapping) else None
        return float(value) if isinstance(value, int | float) else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON document, leaving out fields that are not set."""
        document: dict[str, Any] = {}
        for key in ("name", "version", "created"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        document["input"] = {
            key: value for key, value in vars(self.input).items() if value is not None
        }
        if self.training:
            document["training"] = dict(self.training)
        return document

    @classmethod
    def from_json(cls, document: object, source: Path) -> Metadata:
        """Parse a metadata.json document; raise ModelFolderError naming `source` if malformed."""
        if not isinstance(document, dict):
            raise ModelFolderError(f"{source}: must be a JSON object")
        texts = {}
        for key in ("name", "version", "created"):
            value = document.get(key)
            if value is not None and not isinstance(value, str | int):
                raise ModelFolderError(f"{source}: {key!r} must be a string")
            texts[key] = None if value is None else str(value)
        training = document.get("training", {})
        if not isinstance(training, dict):
            raise ModelFolderError(f"{source}: 'training' must be an object")
        return cls(**texts, input=_input(document.get("input", {}), source), training=training)

    @classmethod
    def read(cls, path: Path) -> Metadata:
        """Read metadata.json at `path`; a missing file is empty metadata."""
        if not path.exists():
            return cls()
        document = read_json(path)
        return cls.from_json(document, path)

    def write(self, path: Path) -> None:
        """Write metadata.json at `path`."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def _input(document: object, source: Path) -> InputMetadata:
    if not isinstance(document, dict):
        raise ModelFolderError(f"{source}: 'input' must be an object")
    sizes: dict[str, int | None] = {}
    for key in ("height", "width", "channels"):
        value = document.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ModelFolderError(f"{source}: input {key!r} must be a positive integer")
        sizes[key] = value
    color_mode = document.get("color_mode")
    if color_mode is not None and color_mode not in COLOR_MODES:
        raise ModelFolderError(f"{source}: input color_mode must be one of {COLOR_MODES}")
    scaling: dict[str, float] = {}
    for key, default in (("rescale", DEFAULT_RESCALE), ("offset", DEFAULT_OFFSET)):
        value = document.get(key, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ModelFolderError(f"{source}: input {key!r} must be a finite number")
        scaling[key] = float(value)
    return InputMetadata(
        sizes["height"],
        sizes["width"],
        sizes["channels"],
        color_mode,
        scaling["rescale"],
        scaling["offset"],
    )
