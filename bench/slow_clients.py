"""Slow-client benchmark: a checked canary's p99 under 256 trickling connections, over its p99
on the idle server, measured in the same run.

Run `python bench/slow_clients.py` (after `make install`); `--worker gthread` runs the same
attack against gunicorn's stock gthread worker for comparison. Loopback only; every process
it starts is stopped by PID. It prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.run import free_port, start_service, stop, wait_ready, write_reference_model  # noqa: E402
from tests.conftest import distinct_images  # noqa: E402
from tests.load import metric, scrape  # noqa: E402
from tests.slow_clients import KINDS, Trickler, canary  # noqa: E402

# A byte every half second for the kinds whose trickle is the point; "both" faster, so its
# connections reach their bodies within the attack.
EVERY_S = {"headers": 0.5, "bodies": 0.5, "both": 0.05}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--canary", type=int, default=100, help="canary requests per phase")
    parser.add_argument("--worker", default="", help="a gunicorn worker class instead")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="slow-bench-") as tmp:
        folder = Path(tmp)
        model_dir = write_reference_model(folder / "model")
        port = free_port()
        env = {"GUNICORN_CMD_ARGS": f"--worker-class {args.worker}"} if args.worker else {}
        server = start_service(model_dir, port, folder, env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url + "/readyz", server)
            images = distinct_images(5)
            # The idle server's own answers are what the canary must keep getting.
            expected = [reference(url, data) for data in images]
            canary(url, images, expected, 20, timeout_s=10)  # warm-up, not measured
            idle = canary(url, images, expected, args.canary, timeout_s=10)
            rows = [("idle", 0, idle)]
            for kind in args.kinds.split(","):
                with Trickler(url, kind, args.connections, EVERY_S[kind]) as attack:
                    deadline = time.monotonic() + 30
                    held = 0.0
                    while time.monotonic() < deadline and not args.worker:
                        held = metric(scrape(url), "cnn_http_requests_arriving")
                        if held >= args.connections:
                            break
                        time.sleep(0.2)
                    report = canary(url, images, expected, args.canary, timeout_s=10)
                    rows.append((kind, attack.opened, report))
        finally:
            stop(server)
    print_table(args, rows, idle.percentile(99))
    return 0


def reference(url: str, data: bytes) -> np.ndarray:
    import requests

    response = requests.post(
        f"{url}/predict", data=data, headers={"Content-Type": "image/png"}, timeout=30
    )
    return np.array(response.json()["predictions"][0]["probabilities"])


def print_table(args: argparse.Namespace, rows: list, idle_p99: float) -> None:
    worker = args.worker or "service.frontend.worker.ArrivalWorker"
    print(
        f"\nworker: {worker}; {args.connections} slow connections; {args.canary} canary "
        "requests per phase, one every 100 ms, 10 s timeout\n"
    )
    print(
        "| attack | slow connections opened | canary answered | canary p50 ms "
        "| canary p99 ms | p99 / idle p99 |"
    )
    print("|---|---|---|---|---|---|")
    for kind, opened, report in rows:
        answered = len(report.latencies_s)
        p50 = report.percentile(50) * 1000 if answered else float("nan")
        p99 = report.percentile(99) * 1000 if answered else float("nan")
        ratio = p99 / (idle_p99 * 1000) if answered else float("nan")
        print(
            f"| {kind} | {opened} | {answered}/{args.canary} | {p50:.1f} | {p99:.1f} "
            f"| {ratio:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
