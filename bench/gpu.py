"""The GPU path, measured: the service on JAX on the GPU against the in-process GPU limit.

Run through bench/gpu.sh on a machine with JAX and CUDA (TensorFlow is not needed). It
1. times the reference model alone, in-process, at batch 1 to 256: the GPU's limit;
2. starts `cnn-serve` on JAX (one runner on the GPU) and checks that /readyz names a GPU,
   once for each front-end worker count of --workers (default: 1, then the machine's cores);
3. loads it with one 32x32 PNG per request at concurrency 1, 32 and 128, and with 16 PNGs per
   request, from a multi-process client (wrk where it is installed would be faster, but GPU
   machines seldom have it);
4. reads the server's GPU memory before and after the load, which must stay bounded;
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
    parser.add_argument(
        "--workers",
        default=f"1,{len(os.sched_getaffinity(0))}",
        help="front-end worker counts to serve with, each against the same limit",
    )
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
        runs, memory, batches, ready = [], [], [0.0, 0.0], {}
        for workers in dict.fromkeys(int(w) for w in args.workers.split(",")):
            served = serve(model_dir, folder, payloads, device, workers, levels, args.seconds)
            runs += served["runs"]
            memory.append(served["memory"])
            batches = [a + b for a, b in zip(batches, served["batches"], strict=True)]
            ready[workers] = served["ready_s"]
    report = {
        "device": device,
        "ready_s": ready,
        "limit": limit,
        "runs": runs,
        "mean_batch": batches[0] / batches[1] if batches[1] else 0.0,
        "gpu_memory_mb": memory,
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    for before, after in memory:
        if before is not None and after - before > MEMORY_GROWTH_MB:
            print(f"GPU memory grew by {after - before:.0f} MB under load: unbounded")
            return 1
    return 0


def serve(
    model_dir: Path,
    folder: Path,
    payloads: dict[str, run.Payload],
    device: str,
    workers: int,
    levels: list[int],
    seconds: float,
) -> dict:
    """Serve with `workers` front-end workers and load it at each level; return the runs."""
    port = run.free_port()
    url = f"http://127.0.0.1:{port}"
    service = run.start_service(
        model_dir, port, folder, {"KERAS_BACKEND": "jax", "WORKERS": str(workers)}
    )
    try:
        ready_s = run.wait_ready(url + "/readyz", service, timeout=600)
        with urllib.request.urlopen(url + "/readyz", timeout=10) as answer:
            served = json.load(answer)["models"]
        devices = sorted({row["device"] for row in served})
        if devices != [device]:
            raise SystemExit(f"bench/gpu.py: /readyz says {devices}, the limit ran on {device}")
        processes = [pid for pid in run.process_tree(service.pid) if pid != service.pid]
        memory_before = gpu_memory_mb(processes)
        runs = [load(port, payloads["png32"], level, seconds) for level in levels]
        runs.append(load(port, payloads["16xpng32"], 32, seconds))
        memory_after = gpu_memory_mb(processes)
        batches = run.scrape_batches(url)
    finally:
        run.stop(service)
    for result in runs:
        result["workers"] = workers
    return {
        "runs": runs,
        "memory": (memory_before, memory_after),
        "batches": batches,
        "ready_s": ready_s,
    }


def print_report(report: dict) -> None:
    limit = report["limit"]
    best = max(limit.values())
    ready = ", ".join(f"{s:.1f} s with {w} workers" for w, s in report["ready_s"].items())
    print(f"Device: {report['device']}; ready after {ready}")
    print("In-process limit: " + ", ".join(f"batch {b}: {r:,.0f}" for b, r in limit.items()))
    for before, after in report["gpu_memory_mb"]:
        if before is not None:
            print(f"Server's GPU memory: {before:.0f} MB after warm-up, {after:.0f} MB after load")
    print(f"Mean batch over all levels: {report['mean_batch']:.1f}")
    print(
        "| workers | payload | concurrency | images/s | p50 ms | p99 ms | / best in-process limit |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in report["runs"]:
        print(
            f"| {r['workers']} | {r['payload']} | {r['concurrency']} | "
            f"{r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['images_per_s'] / best:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
