"""The model folder contract shared with training: find, read and vet its files (no Keras here).

A model folder holds `model.json` (Keras `to_json()`), `model.weights.h5` (`save_weights`),
`labels.json` (class names in output order) and optionally `metadata.json`. MODEL_DIR names
such a folder or a folder of numbered versions (`1/`, `2/`, ...), of which the highest is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ModelLoadError
from service.preprocessing import InputSpec

MODEL_JSON = "model.json"
WEIGHTS = "model.weights.h5"
LABELS = "labels.json"
METADATA = "metadata.json"

# Modules a model.json may name: built-in Keras objects only. Anything else (a custom class,
# a `function`, a module path into Keras internals) could run code and is refused.
_ALLOWED_MODULES = frozenset(
    {
        "keras",
        "keras.layers",
        "keras.models",
        "keras.initializers",
        "keras.regularizers",
        "keras.constraints",
        "keras.activations",
    }
)
# Built-in layers that execute code or read other files named in the JSON.
_REFUSED_CLASSES = frozenset({"Lambda", "TFSMLayer"})


@dataclass(frozen=True)
class ModelInfo:
    """What the service knows of the model it serves."""

    name: str
    version: str
    labels: tuple[str, ...]
    spec: InputSpec
    device: str = "CPU"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (height, width, channels)."""
        return self.spec.shape


@dataclass(frozen=True)
class ModelFiles:
    """The vetted contents of a model folder, ready for the runtime to build."""

    folder: Path
    architecture: str
    weights: Path
    labels: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Return the model name from metadata, else from the folder."""
        default = self.folder.parent.name if self.folder.name.isdigit() else self.folder.name
        return str(self.metadata.get("name") or default)

    @property
    def version(self) -> str:
        """Return the model version from metadata, else the numbered folder, else "1"."""
        default = self.folder.name if self.folder.name.isdigit() else "1"
        return str(self.metadata.get("version") or default)

    def input_spec(self, height: int, width: int, channels: int) -> InputSpec:
        """Combine the model's input shape with the metadata's pixel scaling."""
        meta = self.metadata.get("input") or {}
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{self.folder / METADATA}: 'input' must be an object")
        mode = meta.get("color_mode", "grayscale" if channels == 1 else "rgb")
        expected = "grayscale" if channels == 1 else "rgb"
        if mode != expected:
            raise ModelLoadError(
                f"{self.folder / METADATA}: color_mode {mode!r} does not fit the model's "
                f"{channels} input channel(s) (expected {expected!r})"
            )
        try:
            return InputSpec(
                height,
                width,
                channels,
                rescale=float(meta.get("rescale", 1.0 / 255.0)),
                offset=float(meta.get("offset", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{self.folder / METADATA}: bad 'input': {exc}") from None


def resolve(path: Path) -> Path:
    """Return the model folder to serve: `path` itself, or its highest numbered version."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model folder does not exist")
    if (path / MODEL_JSON).exists():
        return path
    versions = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ModelLoadError(
            f"{path / MODEL_JSON}: file is missing (and {path} has no numbered version folders)"
        )
    return max(versions, key=lambda p: int(p.name))


def read(path: Path) -> ModelFiles:
    """Read and vet a model folder (or its newest version) without building the model."""
    folder = resolve(path)
    architecture = _read_text(folder / MODEL_JSON)
    try:
        config = json.loads(architecture)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{folder / MODEL_JSON}: not valid JSON ({exc})") from None
    if isinstance(config, dict):
        # A compiled model's to_json() names its optimizer, loss and metrics; serving never
        # compiles, so that part is dropped unread rather than deserialized.
        config.pop("compile_config", None)
        architecture = json.dumps(config)
    refuse_unsafe_objects(config, folder / MODEL_JSON)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: weights file is missing")
    labels = _read_json(folder / LABELS)
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ModelLoadError(f"{folder / LABELS}: must be a non-empty JSON array of strings")
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"{folder / LABELS}: class names must be unique")
    metadata: dict[str, Any] = {}
    if (folder / METADATA).exists():
        loaded = _read_json(folder / METADATA)
        if not isinstance(loaded, dict):
            raise ModelLoadError(f"{folder / METADATA}: must be a JSON object")
        metadata = loaded
    return ModelFiles(folder, architecture, weights, tuple(labels), metadata)


def refuse_unsafe_objects(config: Any, source: Path) -> None:
    """Raise ModelLoadError if the architecture names anything but built-in Keras objects."""
    if isinstance(config, list):
        for item in config:
            refuse_unsafe_objects(item, source)
        return
    if not isinstance(config, dict):
        return
    if "class_name" in config:
        name, module = config.get("class_name"), config.get("module")
        if name in _REFUSED_CLASSES or name == "__lambda__":
            raise ModelLoadError(f"{source}: refused layer {name!r}: it would run code")
        if module not in _ALLOWED_MODULES or config.get("registered_name") is not None:
            shown = config.get("registered_name") or f"{module}.{name}"
            raise ModelLoadError(
                f"{source}: refused custom object {shown!r}: only built-in Keras objects load"
            )
    for value in config.values():
        refuse_unsafe_objects(value, source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
