"""The GPU path, measured: the service on JAX on the GPU against the in-process GPU limit.

Run through bench/gpu.sh on a machine with JAX and CUDA (TensorFlow is not needed). It
1. times the reference model alone, in-process, at batch 1 to 256: the GPU's limit;
2. starts `cnn-serve` on JAX and checks that /readyz names a GPU;
3. loads it with one 32x32 PNG per request at concurrency 1, 32 and 128, and with 16 PNGs per
   request, from a multi-process client (wrk where it is installed would be faster, but GPU
   machines seldom have it);
4. reads the workers' GPU memory before and after the load, which must stay bounded;
5. prints each level's images/s as a ratio to the best in-process limit, and the mean batch.
`--allow-cpu` runs the same path on JAX on the CPU (tests/test_bench.py does, in CI).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run

LIMIT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The most a worker's GPU memory may grow under load, after warm-up: a leak would exceed it.
MEMORY_GROWTH_MB = 512


def _client(args: tuple[int, int, bytes, str, float, int]) -> tuple[list[float], float, float]:
    """One client process: `threads` keep-alive connections for `seconds`; return each
    request's seconds, and when the process's first request began and its last one ended."""
    port, threads, body, content_type, seconds, images = args
    latencies: list[float] = []
    failures: list[str] = []
    began = time.monotonic()
    end = began + seconds

    def loop() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < end:
            started = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200 or len(json.loads(answer)["predictions"]) != images:
                failures.append(f"{response.status} {answer[:200]!r}")
                return
            latencies.append(time.perf_counter() - started)
        connection.close()

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if failures:
        raise RuntimeError(f"a request failed: {failures[0]}")
    return latencies, began, time.monotonic()


def load(port: int, payload: run.Payload, concurrency: int, seconds: float) -> dict:
    """Drive the service at `concurrency` for `seconds`; return images/s, p50 and p99."""
    processes = min(concurrency, max(1, (os.cpu_count() or 2) // 2))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    body = payload.path.read_bytes()
    jobs = [(port, n, body, payload.content_type, seconds, payload.images) for n in shares]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_client, jobs)
    latencies = sorted(x for part, _, _ in parts for x in part)
    # From the first client's start to the last one's end: the pool's own start-up is not
    # counted (CLOCK_MONOTONIC is one clock for every process).
    elapsed = max(end for _, _, end in parts) - min(began for _, began, _ in parts)
    return {
        "payload": payload.name,
        "concurrency": concurrency,
        "images_per_s": len(latencies) * payload.images / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def gpu_memory_mb(pids: list[int]) -> float | None:
    """Return the GPU memory the processes `pids` hold, from nvidia-smi (None without it)."""
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in output.strip().splitlines() if line.strip()]
    return sum(float(used) for pid, used in rows if int(pid) in pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8, help="seconds per load level")
    parser.add_argument("--concurrency", default="1,32,128", help="levels for one PNG each")
    parser.add_argument("--allow-cpu", action="store_true", help="run on JAX's CPU too")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="cnn-gpu-") as tmp:
        folder = Path(tmp)
        model_dir = run.write_reference_model(folder / "model" / "1").parent
        payloads = {p.name: p for p in run.build_payloads(folder)}
        sizes = LIMIT_SIZES if not args.allow_cpu else LIMIT_SIZES[:4]
        device, limit = run.compute_limit(model_dir / "1", min(args.seconds, 3.0), "jax", sizes)
        if not device.startswith("GPU") and not args.allow_cpu:
            raise SystemExit(f"bench/gpu.py: JAX runs on {device}, not a GPU")
        port = run.free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"KERAS_BACKEND": "jax", "WORKERS": os.environ.get("WORKERS", "2")}
        service = run.start_service(model_dir, port, folder, env)
        try:
            ready_s = run.wait_ready(url + "/readyz", service, timeout=600)
            with urllib.request.urlopen(url + "/readyz", timeout=10) as answer:
                served = json.load(answer)["models"]
            devices = sorted({row["device"] for row in served})
            if devices != [device]:
                raise SystemExit(f"bench/gpu.py: /readyz says {devices}, the limit ran on {device}")
            workers = [pid for pid in run.process_tree(service.pid) if pid != service.pid]
            memory_before = gpu_memory_mb(workers)
            runs = [load(port, payloads["png32"], level, args.seconds) for level in levels]
            runs.append(load(port, payloads["16xpng32"], 32, args.seconds))
            memory_after = gpu_memory_mb(workers)
            batch_sum, batch_count = run.scrape_batches(url)
        finally:
            run.stop(service)
    mean_batch = batch_sum / batch_count if batch_count else 0.0
    report = {
        "device": device,
        "ready_s": ready_s,
        "limit": limit,
        "runs": runs,
        "mean_batch": mean_batch,
        "gpu_memory_mb": [memory_before, memory_after],
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if memory_before is not None and memory_after - memory_before > MEMORY_GROWTH_MB:
        print(f"GPU memory grew by {memory_after - memory_before:.0f} MB under load: unbounded")
        return 1
    return 0


def print_report(report: dict) -> None:
    limit = report["limit"]
    best = max(limit.values())
    print(f"Device: {report['device']}; ready after {report['ready_s']:.1f} s")
    print("In-process limit: " + ", ".join(f"batch {b}: {r:,.0f}" for b, r in limit.items()))
    before, after = report["gpu_memory_mb"]
    if before is not None:
        print(f"Workers' GPU memory: {before:.0f} MB after warm-up, {after:.0f} MB after the load")
    print(f"Mean batch over all levels: {report['mean_batch']:.1f}")
    print("| payload | concurrency | images/s | p50 ms | p99 ms | / best in-process limit |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        print(
            f"| {r['payload']} | {r['concurrency']} | {r['images_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['images_per_s'] / best:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
