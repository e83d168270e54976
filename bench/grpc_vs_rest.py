"""gRPC against REST on one server: the same images, the same concurrency, ratios in one run.

The server (WORKERS and THREADS at their defaults, the reference CNN) serves both. REST is
wrk posting to /predict: one raw 32x32 PNG, or 16 of them in one multipart form. gRPC is
h2load (nghttp2-client) posting the ModelInfer message tritonclient would send for the same
images (BYTES in raw_input_contents) to inference.GRPCInferenceService/ModelInfer, over 32
connections of one stream each (as wrk's), and over one connection of 32 streams (as one
gRPC channel multiplexes them). h2load counts HTTP/2 answers; a gRPC error is also an HTTP
200, so each pass checks the server's own count of OK calls against it. Each figure is the
better of two passes, alternating.

Run: python bench/grpc_vs_rest.py [--duration S]. Needs wrk and h2load (apt-get install wrk
nghttp2-client). Loopback only; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import run, split  # noqa: E402 - after the path above

INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_message(model: str, images: list[bytes]) -> bytes:
    """Return a gRPC-framed ModelInferRequest of `images`, as tritonclient sends them."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    request = grpcclient.service_pb2.ModelInferRequest(model_name=model)
    request.inputs.append(tensor._get_tensor())
    request.raw_input_contents.append(tensor._get_content())
    message = request.SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def pngs_of(payload: run.Payload) -> list[bytes]:
    """Return the PNG files inside a payload body (one raw, or the parts of a form)."""
    body = payload.path.read_bytes()
    if payload.images == 1:
        return [body]
    return [b"\x89PNG" + part.split(b"\r\n--")[0] for part in body.split(b"\x89PNG")[1:]]


def grpc_ok(url: str) -> float:
    """Return the server's count of ModelInfer calls answered OK."""
    text = subprocess.run(
        ["curl", "-fsS", url + "/metrics"], capture_output=True, text=True, check=True
    ).stdout
    pattern = r"^cnn_http_request_duration_seconds_count\{([^}]*)\} (\S+)$"
    return sum(
        float(value)
        for labels, value in re.findall(pattern, text, re.MULTILINE)
        if f'endpoint="{INFER}"' in labels and 'status="OK"' in labels
    )


def run_h2load(
    url: str, grpc_port: int, body: Path, connections: int, streams: int, seconds: int
) -> float:
    """Return the calls per second h2load saw answered OK (checked against the server)."""
    before = grpc_ok(url)
    output = subprocess.run(
        [
            "h2load", f"-c{connections}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1",
            "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://127.0.0.1:{grpc_port}{INFER}",
        ],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", output).group(1))
    succeeded = int(re.search(r"(\d+) succeeded", output).group(1))
    answered_ok = grpc_ok(url) - before
    if answered_ok < succeeded:
        raise SystemExit(f"h2load saw {succeeded} answers, the server {answered_ok:.0f} OK")
    return rate


def one_pass(model_dir: Path, folder: Path, payloads: dict, seconds: int) -> dict[str, float]:
    grpc_port = run.free_port()
    process, url = split.start(split.ROOT, model_dir, folder, {"GRPC_PORT": str(grpc_port)})
    figures = {}
    try:
        run.wait_ready(url + "/readyz", process)
        for name in ("png32", "16xpng32"):
            payload = payloads[name]
            body = folder / f"{name}.grpc"
            body.write_bytes(infer_message(model_dir.name, pngs_of(payload)))
            figures[f"REST {name} c=32"] = run.run_wrk(
                url, payload, 32, seconds, "rest", False
            ).requests_per_s
            figures[f"gRPC {name} 32 connections"] = run_h2load(
                url, grpc_port, body, 32, 1, seconds
            )
            figures[f"gRPC {name} 1 connection x 32 streams"] = run_h2load(
                url, grpc_port, body, 1, 32, seconds
            )
    finally:
        run.stop(process)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per load run")
    args = parser.parse_args(argv)
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {package}")
    with tempfile.TemporaryDirectory(prefix="cnn-grpc-") as tmp:
        folder = Path(tmp)
        model_dir = run.write_reference_model(folder / "model")
        payloads = {p.name: p for p in run.build_payloads(folder)}
        passes = [one_pass(model_dir, folder, payloads, args.duration) for _ in range(2)]
    best = {key: max(p[key] for p in passes) for key in passes[0]}
    print("| figure | pass 1 req/s | pass 2 req/s | best |")
    print("|---|---:|---:|---:|")
    for key, value in best.items():
        print(f"| {key} | {passes[0][key]:.0f} | {passes[1][key]:.0f} | {value:.0f} |")
    print("\n| payload | gRPC / REST, 32 connections | gRPC / REST, 1 connection x 32 streams |")
    print("|---|---:|---:|")
    for name in ("png32", "16xpng32"):
        rest = best[f"REST {name} c=32"]
        many = best[f"gRPC {name} 32 connections"] / rest
        one = best[f"gRPC {name} 1 connection x 32 streams"] / rest
        print(f"| {name} | {many:.2f} | {one:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
