"""What the batcher's thread hand-off adds to one lone image, in-process, on one Keras backend.

Run: KERAS_BACKEND=jax python bench/handoff.py. It loads the reference CNN through the
service's runtime and sends one image at a time through a real Batcher, back to back and after
a 1.5 ms busy gap (about what a request spends in the web stack at concurrency 1). It prints
the p50 of the whole predict, of the forward pass inside it, and of the difference (the
enqueue, two thread wake-ups and the bookkeeping), and the same forward pass run on the
calling thread after the same gap.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="cnn-handoff-"))

from bench.run import write_reference_model
from service import metrics
from service.runner import runtime
from service.runner.batching import Batcher

CALLS = 2000
WARM = 200  # calls left out of the figures


def busy(seconds: float) -> None:
    """Hold the CPU (and the GIL) for `seconds`, as the web stack does between forwards."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="cnn-handoff-") as folder:
        classifier = runtime.load_classifier(write_reference_model(Path(folder) / "model"))
    forwards: list[float] = []

    def timed(inputs: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        outputs = classifier.predict_batch(inputs)
        forwards.append(time.perf_counter() - started)
        return outputs

    batcher = Batcher(
        timed,
        max_batch_size=classifier.max_batch_size,
        max_delay_s=0.005,
        max_queue=1024,
        model_metrics=metrics.for_model("bench", "1", classifier.info.labels),
        warm_up=classifier.warm_up,
    )
    batcher.start()
    image = np.random.default_rng(0).random(classifier.info.input_shape, dtype=np.float32)
    print(f"backend {runtime.BACKEND}, device {classifier.info.device}, {CALLS} calls each")
    for gap_s in (0.0, 0.0015):
        totals: list[float] = []
        forwards.clear()
        for _ in range(CALLS):
            busy(gap_s)
            started = time.perf_counter()
            with batcher.arrival() as arrival:
                [future] = batcher.submit([image], time.monotonic() + 10, arrival)
                future.result()
            totals.append(time.perf_counter() - started)
        pairs = list(zip(totals, forwards, strict=True))[WARM:]
        print(
            f"gap {gap_s * 1000:.1f} ms: predict p50 {_p50(t for t, _ in pairs)}, forward p50 "
            f"{_p50(f for _, f in pairs)}, hand-off p50 {_p50(t - f for t, f in pairs)}"
        )
    batcher.close()
    direct = []
    for _ in range(CALLS):
        busy(0.0015)
        started = time.perf_counter()
        classifier.predict_batch(image[None])
        direct.append(time.perf_counter() - started)
    print(f"the forward pass on the calling thread after a 1.5 ms gap: p50 {_p50(direct[WARM:])}")


def _p50(seconds) -> str:
    return f"{statistics.median(list(seconds)) * 1000:.3f} ms"


if __name__ == "__main__":
    main()
