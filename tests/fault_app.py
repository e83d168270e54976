"""A test-only runtime: the real model, wrapped to misbehave on command, in the runners.

The model is the real one loaded from MODEL_DIR, wrapped so that a batch holding an image
of one flat colour does something bad: all black (0) fails the forward pass, all white (255)
kills the inference thread, and mid grey (128) holds the forward pass until the test
releases it; dark grey (64) holds an explanation (Grad-CAM) instead. Holding is synchronised
through files in FAULT_DIR, since the test runs in another process: the model touches
`held-<n>` (`explain-held-<n>`) when its n-th held batch (explanation) starts, and waits for
the test to create `release-<n>` (`explain-release-<n>`) or `release-all`; a restarted
runner counts from 1 again.
FAULT_FORWARD_S makes every forward pass last that long, as on a busy device; while
FAULT_DIR/fail-load exists, every version fails to load.
Run: RUNTIME=tests.fault_app:load cnn-serve ...
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np

from model_folder.errors import ModelFolderError
from service.runner.runtime import load_classifier
from service.settings import Settings

# A held batch gives up after this long, so a broken test cannot hang a worker for ever.
HOLD_LIMIT_S = 120.0


class WrappedClassifier:
    """The real classifier, to be wrapped by a test's own misbehaviour in predict_batch."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info

    @property
    def max_batch_size(self) -> int:
        return self.inner.max_batch_size

    def warm_up(self) -> None:
        self.inner.warm_up()

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        return self.inner.predict_batch(inputs)

    def explain(self, inputs: np.ndarray):
        return self.inner.explain(inputs)

    def flat_values(self, inputs: np.ndarray) -> list[int]:
        """Return the pixel value (0-255) of each image in the batch that is one flat colour."""
        spec = self.info.spec
        return [
            round((float(x.flat[0]) - spec.offset) / spec.rescale)
            for x in inputs
            if x.min() == x.max()
        ]


class MisbehavingClassifier(WrappedClassifier):
    """The real classifier, failing, dying or held when a trigger image is in the batch."""

    def __init__(self, inner, fault_dir: Path) -> None:
        super().__init__(inner)
        self.fault_dir = fault_dir
        self._held = itertools.count(1)
        self._explanations_held = itertools.count(1)
        # A slow device: every forward pass takes at least this long (FAULT_FORWARD_S).
        self.forward_s = float(os.environ.get("FAULT_FORWARD_S", "0"))

    def predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        if self.forward_s:
            time.sleep(self.forward_s)
        flat = self.flat_values(inputs)
        if 0 in flat:
            raise RuntimeError("injected forward-pass failure")
        if 255 in flat:
            raise SystemExit("injected death of the inference thread")
        if 128 in flat:
            self._hold(next(self._held))
        return self.inner.predict_batch(inputs)

    def explain(self, inputs: np.ndarray):
        if 64 in self.flat_values(inputs):
            self._hold(next(self._explanations_held), "explain-")
        return self.inner.explain(inputs)

    def _hold(self, number: int, kind: str = "") -> None:
        (self.fault_dir / f"{kind}held-{number}").touch()
        releases = (self.fault_dir / f"{kind}release-{number}", self.fault_dir / "release-all")
        give_up = time.monotonic() + HOLD_LIMIT_S
        while not any(path.exists() for path in releases) and time.monotonic() < give_up:
            time.sleep(0.005)


def load(folder: Path, settings: Settings, name: str, version: str) -> MisbehavingClassifier:
    """Load a version as the service does, wrapped to misbehave (the runners' RUNTIME); fail
    while the test has made FAULT_DIR/fail-load."""
    fault_dir = Path(os.environ["FAULT_DIR"])
    if (fault_dir / "fail-load").exists():
        raise ModelFolderError(f"{folder}: injected load failure")
    inner = load_classifier(
        folder, settings.max_batch_size, settings.tf_threads, name=name, version=version
    )
    return MisbehavingClassifier(inner, fault_dir)


class FaultControl:
    """The test's side of the hold files: see which batches are held, and release them."""

    def __init__(self, fault_dir: Path) -> None:
        self.fault_dir = fault_dir

    def wait_held(self, number: int, within_s: float = 60, kind: str = "") -> None:
        """Wait until the `number`-th held batch (kind "explain-": explanation) has started."""
        deadline = time.monotonic() + within_s
        while not (self.fault_dir / f"{kind}held-{number}").exists():
            assert time.monotonic() < deadline, f"held {kind}batch {number} never started"
            time.sleep(0.01)

    def release(self, number: int, kind: str = "") -> None:
        """Let the `number`-th held batch (kind "explain-": explanation) finish."""
        (self.fault_dir / f"{kind}release-{number}").touch()

    def release_all(self) -> None:
        """Let every held batch finish, now and from now on."""
        (self.fault_dir / "release-all").touch()
