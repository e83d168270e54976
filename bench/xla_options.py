"""The service's XLA options on a CPU (service/runner/runtime.py CPU_COMPILER_OPTIONS) against XLA's
defaults, for the reference CNN on JAX: images/s and build time (tracing and compiling, as
the service's runtime does it) at each batch size.

Run: KERAS_BACKEND=jax python bench/xla_options.py [SIZES]. Both programs of a size are
built in this one process and timed in alternation, 7 rounds of 0.15 s each, so that the
machine's drift falls on both alike; it prints the median of the rounds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import write_reference_model
from service.runner import runtime

ROUNDS = 7
ROUND_S = 0.15


def main() -> None:
    sizes = [
        int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,32,64,128").split(",")
    ]
    with tempfile.TemporaryDirectory(prefix="cnn-xla-") as folder:
        model, _, spec = runtime.check_model(write_reference_model(Path(folder) / "model"))
    device = runtime.configure_jax()
    softmax = not runtime.ends_in_softmax(model)
    variants = {"service": dict(runtime.CPU_COMPILER_OPTIONS), "xla-defaults": {}}
    forwards, compile_s = {}, {}
    for size in sizes:
        for name, options in variants.items():
            # The service's own compile path (service/runner/runtime.py), on each set of options.
            runtime.CPU_COMPILER_OPTIONS.clear()
            runtime.CPU_COMPILER_OPTIONS.update(options)
            started = time.perf_counter()
            [forwards[size, name]] = runtime._jax_forwards(
                model, softmax, (size,), spec.shape, device.strip("/")
            ).values()
            compile_s[size, name] = time.perf_counter() - started
    rates: dict[tuple[int, str], list[float]] = {key: [] for key in forwards}
    for _ in range(ROUNDS):
        for (size, name), forward in forwards.items():
            inputs = np.random.default_rng(size).random((size, *spec.shape), dtype=np.float32)
            forward(inputs)
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < ROUND_S:
                forward(inputs)
                calls += 1
            rates[size, name].append(size * calls / (time.perf_counter() - started))
    print(f"service options: {variants['service']}; device {device}")
    print("| batch | service images/s | XLA defaults images/s | ratio | build s (ours / XLA's) |")
    print("|---:|---:|---:|---:|---|")
    for size in sizes:
        ours, theirs = (statistics.median(rates[size, n]) for n in variants)
        print(
            f"| {size} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} | "
            f"{compile_s[size, 'service']:.2f} / {compile_s[size, 'xla-defaults']:.2f} |"
        )


if __name__ == "__main__":
    main()
