"""What an explanation costs: POST /predict?explain=gradcam against a plain /predict.

One server (the reference CNN, WORKERS=2), one 32x32 PNG per request, one request at a time,
the two kinds alternating; the medians of their latencies and their ratio. Loopback only;
the server is stopped by PID.

Run: python bench/explain.py [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import run, split  # noqa: E402 - after the path above


def post(url: str, body: bytes) -> float:
    """Return the seconds one POST of `body` took (it must answer 200)."""
    request = urllib.request.Request(url, body, {"Content-Type": "image/png"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests of each kind")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnn-explain-") as tmp:
        folder = Path(tmp)
        model_dir = run.write_reference_model(folder / "model")
        body = next(p for p in run.build_payloads(folder) if p.name == "png32").path.read_bytes()
        process, url = split.start(split.ROOT, model_dir, folder, {"WORKERS": "2"})
        try:
            run.wait_ready(url + "/readyz", process)
            for _ in range(20):  # warm both paths (the Grad-CAM graph is made on first use)
                post(url + "/predict", body)
                post(url + "/predict?explain=gradcam", body)
            plain, explained = [], []
            for _ in range(args.requests):
                plain.append(post(url + "/predict", body))
                explained.append(post(url + "/predict?explain=gradcam", body))
        finally:
            run.stop(process)
    p50_plain, p50_explained = statistics.median(plain), statistics.median(explained)
    print("| request | p50 ms | p90 ms |")
    print("|---|---:|---:|")
    for name, times in (("plain /predict", plain), ("?explain=gradcam", explained)):
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"| {name} | {statistics.median(times) * 1000:.2f} | {p90 * 1000:.2f} |")
    print(f"\nexplained / plain, p50: {p50_explained / p50_plain:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
