"""The model alone, in-process, on the Keras backend KERAS_BACKEND names: images/s by batch size.

Run: KERAS_BACKEND=jax python bench/compute_limit.py MODEL_DIR SECONDS [SIZES]; prints one
JSON line: the device and the images/s at each batch size (SIZES: comma-separated, default
1,32,128).
It goes through the service's own runtime (service/runtime.py: padded sizes, compiled once),
so it is the most that runtime can do with no HTTP, decoding or batching around it.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.runtime import BACKEND, load_classifier

SIZES = (1, 32, 128)


def main() -> None:
    folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
    sizes = tuple(int(size) for size in sys.argv[3].split(",")) if len(sys.argv) > 3 else SIZES
    classifier = load_classifier(folder, max_batch_size=max(sizes))
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
    print(json.dumps({"backend": BACKEND, "device": classifier.info.device, "rates": rates}))


if __name__ == "__main__":
    main()
