"""The model alone, in-process, on the Keras backend KERAS_BACKEND names: images/s by batch size.

Run: KERAS_BACKEND=jax python bench/compute_limit.py MODEL_DIR SECONDS [SIZES]; prints one
JSON line: the device and the images/s at each batch size (SIZES: comma-separated, default
1,32,128).
It goes through the service's own runtime (service/runner/runtime.py: padded sizes, compiled once),
so it is the most that runtime can do with no HTTP, decoding or batching around it. On JAX on
a CPU it times the runtime twice, with its XLA options and with XLA's defaults, and keeps the
faster at each size: the limit is the best that XLA can do, not only what the service chose.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.runner import runtime

SIZES = (1, 32, 128)


def images_per_s(folder: Path, seconds: float, sizes: tuple[int, ...]) -> tuple[str, dict]:
    """Return the runtime's device and its images/s at each batch size."""
    classifier = runtime.load_classifier(folder, max_batch_size=max(sizes))
    classifier.warm_up()
    rates = {}
    for size in sizes:
        inputs = np.random.default_rng(size).random((size, 32, 32, 3), dtype=np.float32)
        classifier.predict_batch(inputs)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            classifier.predict_batch(inputs)
            count += size
        rates[size] = count / (time.perf_counter() - started)
    return classifier.info.device, rates


def main() -> None:
    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
    sizes = tuple(int(size) for size in sys.argv[3].split(",")) if len(sys.argv) > 3 else SIZES
    device, rates = images_per_s(folder, seconds, sizes)
    if runtime.BACKEND == "jax" and device.startswith("CPU") and runtime.CPU_COMPILER_OPTIONS:
        runtime.CPU_COMPILER_OPTIONS.clear()
        _, defaults = images_per_s(folder, seconds, sizes)
        rates = {size: max(rates[size], defaults[size]) for size in sizes}
    print(json.dumps({"backend": runtime.BACKEND, "device": device, "rates": rates}))


if __name__ == "__main__":
    main()
