"""Where a worker's time goes under load: py-spy samples of the thread holding the GIL.

Run: python bench/profile.py [--backend jax] [--payload png32] [--concurrency 32]. It serves
the reference model of bench/run.py, loads it with wrk, records one worker with py-spy
(`--gil`: only the thread holding the GIL, which is what bounds a worker's requests/s), and
prints the share of those samples in each part of the request path. py-spy comes with the
dev extra; it needs ptrace, which root has.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run

# The part of the request path a sample belongs to: the first of these its stack meets,
# from the innermost frame out.
PARTS = [
    ("decoding and resizing (Pillow)", ("model_folder/preprocessing.py", "PIL/")),
    ("metrics", ("service/metric_values.py", "prometheus_client/", "service/metrics.py")),
    (
        "forward pass (Keras runtime)",
        ("service/runner/runtime.py", "jax/", "jaxlib/", "tensorflow/"),
    ),
    ("batcher and hand-offs", ("service/runner/batching.py", "concurrent/futures/_base.py")),
    ("answer (JSON)", ("prediction_body", "json_response", "orjson")),
    ("model lookup and lease", ("service/registry.py", "service/runner/inference.py")),
    ("body deadline", ("service/frontend/body_deadline.py",)),
    ("app hooks (ids, deadline, request metrics)", ("service/frontend/app.py",)),
    ("Flask and werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn parsing and writing", ("gunicorn/http/", "gunicorn/util.py")),
    (
        "event loop (worker.py, gthread)",
        ("service/frontend/worker.py", "gunicorn/workers/", "selectors"),
    ),
    ("numpy", ("numpy/",)),
]


def part_of(stack: list[str]) -> str:
    """Return the part of the request path the innermost frame of `stack` belongs to."""
    for frame in reversed(stack):
        for name, markers in PARTS:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def breakdown(raw: str) -> tuple[dict[str, int], int]:
    """Count py-spy's raw (collapsed) samples by part; return the counts and their total."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[part_of(stack.split(";"))] += int(count)
    return dict(counts.most_common()), sum(counts.values())


def leaf_workers(pid: int) -> list[int]:
    """Return the processes under `pid` that have no children: gunicorn's workers."""
    tree = run.process_tree(pid)
    children = {p: Path(f"/proc/{p}/task/{p}/children").read_text().split() for p in tree}
    return [p for p in tree if p != pid and not children[p]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="jax", help="KERAS_BACKEND of the service")
    parser.add_argument("--payload", default="png32", help="png32, jpeg640x480 or 16xpng32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15, help="seconds recorded")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnn-profile-") as tmp:
        folder = Path(tmp)
        model_dir = run.write_reference_model(folder / "model" / "1").parent
        payload = next(p for p in run.build_payloads(folder) if p.name == args.payload)
        port = run.free_port()
        url = f"http://127.0.0.1:{port}"
        service = run.start_service(model_dir, port, folder, {"KERAS_BACKEND": args.backend})
        try:
            run.wait_ready(url + "/readyz", service)
            worker = leaf_workers(service.pid)[0]
            load = subprocess.Popen(
                run.wrk_command(url, payload, args.concurrency, args.seconds + 6),
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(3)  # past the first batches
            samples = folder / "samples.txt"
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(worker),
                    "--duration", str(args.seconds), "--rate", "250", "--gil", "--nonblocking",
                    "--format", "raw", "--output", str(samples),
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
            load.communicate(timeout=60)
        finally:
            run.stop(service)
        counts, total = breakdown(samples.read_text())
    if not total:
        raise SystemExit("py-spy recorded no samples of the worker; try a longer --seconds")
    held = total / (args.seconds * 250)
    print(
        f"{args.backend}, {args.payload}, concurrency {args.concurrency}: {total} samples, the "
        f"GIL held in {held:.0%} of them"
    )
    print("| part of the request path | share of the GIL-holding samples |")
    print("|---|---:|")
    for name, count in counts.items():
        print(f"| {name} | {count / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
