"""Write the model folder the service loads, as the next version, all at once or not at all.

The files go to a hidden staging folder beside the versions, which is renamed to `<N>/` only
when complete: the service ignores folders whose names are not numbers, so a crash leaves
nothing it would load, and a rename never replaces a folder that holds files.
"""

from __future__ import annotations

import errno
import json
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras

from model_folder import files
from model_folder.metadata import Metadata
from model_folder.repository import next_version
from training import report

CURVES = "training_curves.png"
CONFUSION = "confusion_matrix.png"


def save_version(
    model: keras.Model,
    parent: Path,
    labels: Sequence[str],
    metadata: Metadata,
    history: Mapping[str, Sequence[float]],
    evaluation: report.Evaluation,
) -> Path:
    """Write model, labels, metadata and plots to `parent/<next version>/`; return that folder."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        (staging / files.MODEL_JSON).write_text(model.to_json(), encoding="utf-8")
        model.save_weights(staging / files.WEIGHTS)
        _write_json(staging / files.LABELS, list(labels))
        report.plot_training_curves(history, staging / CURVES)
        report.plot_confusion_matrix(evaluation, staging / CONFUSION)
        while True:
            version = next_version(parent)
            replace(metadata, version=str(version)).write(staging / files.METADATA)
            try:
                staging.rename(parent / str(version))
            except OSError as exc:
                # Another run took this version between the scan and the rename: take the next.
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise
            return parent / str(version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
