"""Issue 21's figures: the runner split against the code before it, the 16-PNG stack ceiling,
and one device fed by every core.

1. Before and after: the code of --baseline (a git worktree, default e75c164, the last
   commit before the split) and this tree, each served with WORKERS=2 on the reference CNN,
   in turn (twice each, the better pass kept): ready after start, p50 of one PNG at
   concurrency 1, req/s and mean batch of one PNG at concurrency 32, and the server's total
   RSS (VmRSS over its processes) after that load.
2. 16 PNGs per request at concurrency 32 against its stack ceiling 1/(1/floor + 1/limit):
   the floor is bench/floor_app.py under gunicorn with the same workers, the limit the best
   in-process rate of the model over its batch sizes.
3. A simulated GPU (bench/sim_device.py: each forward pass waits 0.2 ms + 2 us per image):
   images/s with WORKERS=1 and WORKERS=nproc, for the PNG and the 640x480 JPEG; the front
   end's images/s per core says how many cores one GPU needs.

Run: python bench/split.py [--duration S] [--baseline REF]. Loopback only; every process it
starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402 - after the path above

BASELINE = "e75c164"
TARGETS = {
    "mean batch, 1 PNG at c=32 / before": (">=", 1.5),
    "req/s, 1 PNG at c=32 / before": (">=", 1.1),
    "total RSS after load / before": ("<=", 0.7),
    "ready after start / before": ("<=", 1.0),
    "p50 at c=1 minus before (ms)": ("<=", 0.3),
    "16 PNGs at c=32 / stack ceiling": (">=", 0.75),
    "simulated GPU: WORKERS=nproc / (nproc x WORKERS=1)": (">=", 0.8),
}


def rss_mb(pid: int) -> float:
    """Return the resident memory (VmRSS) of a process and its descendants, in MB."""
    total = 0
    for member in run.process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def start(root: Path, model_dir: Path, folder: Path, env: dict[str, str]) -> tuple:
    """Start `python -m service` from the tree at `root`; return it and its URL."""
    port = run.free_port()
    metrics = folder / f"metrics-{port}"
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "GRPC_PORT": "0",  # no gRPC front end unless `env` asks for one
        "MODEL_DIR": str(model_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(root),
        **env,
    }
    log = open(folder / f"service-{port}.log", "wb")  # noqa: SIM115 - lives with the server
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=root, env=environment, stdout=log, stderr=log
    )
    return process, f"http://127.0.0.1:{port}"


def one_side(side: str, root: Path, model_dir: Path, folder: Path, payloads, duration: int):
    process, url = start(root, model_dir, folder, {"WORKERS": "2"})
    try:
        ready_s = run.wait_ready(url + "/readyz", process)
        single = run.run_wrk(url, payloads["png32"], 1, duration, side, True)
        loaded = run.run_wrk(url, payloads["png32"], 32, duration, side, True)
        sixteen = run.run_wrk(url, payloads["16xpng32"], 32, duration, side, True)
        memory = rss_mb(process.pid)
    finally:
        run.stop(process)
    return {
        "ready_s": ready_s,
        "p50_c1_ms": single.p50_ms,
        "rps_c32": loaded.requests_per_s,
        "mean_batch_c32": loaded.mean_batch or 0.0,
        "rss_mb": memory,
        "images_16": sixteen.images_per_s,
    }


def better(a: dict, b: dict) -> dict:
    """Return the better of two passes, figure by figure."""
    lower = ("ready_s", "p50_c1_ms", "rss_mb")
    return {k: (min if k in lower else max)(a[k], b[k]) for k in a}


def simulated(model_dir: Path, folder: Path, payloads, duration: int, workers: int) -> dict:
    env = {"WORKERS": str(workers), "RUNTIME": "bench.sim_device:load", "PYTHONPATH": str(ROOT)}
    process, url = start(ROOT, model_dir, folder, env)
    try:
        run.wait_ready(url + "/readyz", process)
        return {
            name: run.run_wrk(url, payloads[name], 64, duration, "sim", False).images_per_s
            for name in ("png32", "jpeg640x480")
        }
    finally:
        run.stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="cnn-split-") as tmp:
        folder = Path(tmp)
        before_root = folder / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before_root), args.baseline],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            model_dir = run.write_reference_model(folder / "model")
            payloads = {p.name: p for p in run.build_payloads(folder)}
            passes: dict[str, list[dict]] = {"before": [], "now": []}
            for _ in range(2):
                for side, root in (("before", before_root), ("now", ROOT)):
                    passes[side].append(
                        one_side(side, root, model_dir, folder, payloads, args.duration)
                    )
            before, now = (better(*passes[side]) for side in ("before", "now"))

            port = run.free_port()
            floor = run.start_floor(port, 2, 16, folder)
            try:
                run.wait_ready_naive(f"http://127.0.0.1:{port}", floor)
                floor_16 = run.run_wrk(
                    f"http://127.0.0.1:{port}",
                    payloads["16xpng32"],
                    32,
                    args.duration,
                    "floor",
                    False,
                ).images_per_s
            finally:
                run.stop(floor)
            _, limits = run.compute_limit(model_dir, 3.0, "tensorflow", (1, 8, 32, 128))
            limit = max(limits.values())

            sim = {w: simulated(model_dir, folder, payloads, args.duration, w) for w in (1, cores)}
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(before_root)], cwd=ROOT, check=False
            )
    ceiling = 1 / (1 / floor_16 + 1 / limit)
    ratios = {
        "mean batch, 1 PNG at c=32 / before": now["mean_batch_c32"] / before["mean_batch_c32"],
        "req/s, 1 PNG at c=32 / before": now["rps_c32"] / before["rps_c32"],
        "total RSS after load / before": now["rss_mb"] / before["rss_mb"],
        "ready after start / before": now["ready_s"] / before["ready_s"],
        "p50 at c=1 minus before (ms)": now["p50_c1_ms"] - before["p50_c1_ms"],
        "16 PNGs at c=32 / stack ceiling": now["images_16"] / ceiling,
        "simulated GPU: WORKERS=nproc / (nproc x WORKERS=1)": sim[cores]["png32"]
        / (cores * sim[1]["png32"]),
    }
    report = {
        "cores": cores,
        "before": before,
        "now": now,
        "passes": passes,
        "floor_16_images_per_s": floor_16,
        "limit_images_per_s": limits,
        "stack_ceiling_16": ceiling,
        "simulated_gpu_images_per_s": sim,
        "ratios": ratios,
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict) -> None:
    before, now, cores = report["before"], report["now"], report["cores"]
    print(f"{cores} cores; WORKERS=2, reference CNN, TensorFlow; better of two passes each")
    print("| figure | before | now |")
    print("|---|---:|---:|")
    rows = [
        ("ready after start (s)", "ready_s", "{:.2f}"),
        ("p50, 1 PNG at c=1 (ms)", "p50_c1_ms", "{:.2f}"),
        ("req/s, 1 PNG at c=32", "rps_c32", "{:,.0f}"),
        ("mean batch, 1 PNG at c=32", "mean_batch_c32", "{:.1f}"),
        ("total RSS after load (MB)", "rss_mb", "{:,.0f}"),
        ("images/s, 16 PNGs at c=32", "images_16", "{:,.0f}"),
    ]
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(before[key])} | {fmt.format(now[key])} |")
    sim = report["simulated_gpu_images_per_s"]
    print(
        f"\n16 PNGs: floor {report['floor_16_images_per_s']:,.0f} images/s, limit "
        f"{max(report['limit_images_per_s'].values()):,.0f}, ceiling "
        f"{report['stack_ceiling_16']:,.0f}"
    )
    print("\n| simulated GPU | WORKERS=1 | WORKERS=" + f"{cores} | per core |")
    print("|---|---:|---:|---:|")
    for name in ("png32", "jpeg640x480"):
        one, all_ = sim[1][name], sim[cores][name]
        print(f"| {name} images/s | {one:,.0f} | {all_:,.0f} | {all_ / cores:,.0f} |")
    print("\n| target | measured | needed | met |")
    print("|---|---:|---:|---|")
    for name, value in report["ratios"].items():
        op, bound = TARGETS[name]
        met = value >= bound if op == ">=" else value <= bound
        print(f"| {name} | {value:.2f} | {op} {bound} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    sys.exit(main())
