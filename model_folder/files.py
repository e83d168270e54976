"""One model folder: its file names, and reading and vetting its files (no Keras here).

Vetting refuses, before Keras sees the architecture, anything that could run code: custom
objects, `Lambda` layers and layers that read other files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_folder.errors import ModelFolderError
from model_folder.json_file import read_json, read_text
from model_folder.metadata import Metadata
from model_folder.preprocessing import InputSpec

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
    name: str
    version: str
    architecture: str
    weights: Path
    labels: tuple[str, ...]
    metadata: Metadata = field(default_factory=Metadata)

    def input_spec(self, height: int, width: int, channels: int) -> InputSpec:
        """Combine the model's input shape with the metadata's pixel scaling."""
        return self.metadata.input.spec((height, width, channels), self.folder / METADATA)


def read(folder: Path, name: str | None = None, version: str | None = None) -> ModelFiles:
    """Read and vet one model folder without building the model.

    `name` and `version` are the repository's (the folder names); without them they come
    from metadata.json, else from the folder: `<name>/<number>/` or `<name>/` (version "1").
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist")
    architecture = read_text(folder / MODEL_JSON)
    try:
        config = json.loads(architecture)
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{folder / MODEL_JSON}: not valid JSON ({exc})") from None
    if isinstance(config, dict):
        # A compiled model's to_json() names its optimizer, loss and metrics; serving never
        # compiles, so that part is dropped unread rather than deserialized.
        config.pop("compile_config", None)
        architecture = json.dumps(config)
    refuse_unsafe_objects(config, folder / MODEL_JSON)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ModelFolderError(f"{weights}: weights file is missing")
    labels = read_json(folder / LABELS)
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ModelFolderError(f"{folder / LABELS}: must be a non-empty JSON array of strings")
    if len(set(labels)) != len(labels):
        raise ModelFolderError(f"{folder / LABELS}: class names must be unique")
    metadata = Metadata.read(folder / METADATA)
    numbered = folder.name.isdigit()
    name = name or metadata.name or (folder.parent.name if numbered else folder.name)
    version = version or metadata.version or (folder.name if numbered else "1")
    return ModelFiles(folder, name, version, architecture, weights, tuple(labels), metadata)


def refuse_unsafe_objects(config: Any, source: Path) -> None:
    """Raise ModelFolderError if the architecture names anything but built-in Keras objects."""
    if isinstance(config, list):
        for item in config:
            refuse_unsafe_objects(item, source)
        return
    if not isinstance(config, dict):
        return
    if "class_name" in config:
        name, module = config.get("class_name"), config.get("module")
        if name in _REFUSED_CLASSES or name == "__lambda__":
            raise ModelFolderError(f"{source}: refused layer {name!r}: it would run code")
        if module not in _ALLOWED_MODULES or config.get("registered_name") is not None:
            shown = config.get("registered_name") or f"{module}.{name}"
            raise ModelFolderError(
                f"{source}: refused custom object {shown!r}: only built-in Keras objects load"
            )
    for value in config.values():
        refuse_unsafe_objects(value, source)
