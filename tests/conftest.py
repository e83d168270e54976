"""Fixtures: a real small Keras model on disk, real images, the app, and a real gunicorn."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import requests
from PIL import Image

LABELS = ["circle", "square", "triangle"]


def make_cnn(input_shape=(32, 32, 3), classes=3, softmax=True, seed=0):
    """Build the design's CNN, small: Conv-ReLU-Pool-Dropout twice, Flatten, Dense-softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input(input_shape),
        keras.layers.Conv2D(8, (3, 3)),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Dropout(0.25),
        keras.layers.Conv2D(16, (3, 3)),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Dropout(0.25),
        keras.layers.Flatten(),
        keras.layers.Dense(classes),
    ]
    if softmax:
        layers.append(keras.layers.Activation("softmax"))
    return keras.Sequential(layers)


def write_model(folder: Path, model, labels, metadata: dict | None = None) -> Path:
    """Write a model folder as training does: JSON, weights, labels, optional metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(model.to_json())
    model.save_weights(folder / "model.weights.h5")
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture(scope="session")
def cnn():
    """Return the small reference CNN (random weights, 3 classes, 32x32x3)."""
    return make_cnn()


# The per-model metric labels of the model model_dir serves (its version 2, named "shapes").
MODEL_LABELS = {"model": "shapes", "version": "2"}
# And of the batch, queue and forward-pass metrics, which come from runner 0.
RUNNER_LABELS = {**MODEL_LABELS, "runner": "0"}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, cnn) -> Path:
    """Return a folder of versions holding the reference CNN as version 2."""
    root = tmp_path_factory.mktemp("models") / "shapes"
    write_model(root / "1", make_cnn(seed=1), LABELS)
    write_model(root / "2", cnn, LABELS, {"name": "shapes", "version": "2"})
    return root


@pytest.fixture(scope="session")
def classifier(model_dir):
    """Return the reference CNN loaded through the service runtime."""
    from service.runner.runtime import load_classifier

    return load_classifier(model_dir / "2", max_batch_size=16)


@pytest.fixture
def settings(model_dir):
    """Return service settings for tests: small queue and batches."""
    from service.settings import Settings

    return Settings(model_dir=model_dir, max_batch_size=16, max_queue=64, request_timeout_s=10)


@pytest.fixture
def app(settings, classifier):
    """Return the Flask app built around the loaded reference CNN."""
    from service.frontend.app import create_app

    application = create_app(settings, classifier)
    yield application
    application.extensions["runner"].close(timeout=5)


@pytest.fixture
def client(app):
    """Return a Flask test client."""
    return app.test_client()


def image_bytes(size=(40, 30), mode="RGB", fmt="PNG", color=None, seed=0, **save_args) -> bytes:
    """Return a real encoded image: random pixels, or one colour."""
    rng = np.random.default_rng(seed)
    if color is not None:
        image = Image.new(mode, size, color)
    else:
        channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
        if image.mode != mode:
            image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def distinct_images(count: int, size=(32, 32)) -> list[bytes]:
    """Return `count` different random PNG images."""
    return [image_bytes(size=size, seed=1000 + i) for i in range(count)]


def expected_probabilities(model, data: bytes, spec) -> np.ndarray:
    """Return the Keras model's own output on the service's preprocessing of `data`."""
    from model_folder.preprocessing import preprocess

    return np.asarray(model(preprocess(data, spec)[None], training=False))[0]


def expected_device() -> str:
    """Return the device the service should pick, asked of TensorFlow directly."""
    import tensorflow as tf

    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running cnn-serve process on loopback."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """Return what the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """Send SIGTERM and return the exit status (SIGKILL after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


ROOT = Path(__file__).resolve().parent.parent


def start_server(model: Path, log_dir: Path, ready_timeout: float = 90, **env: str) -> Server:
    """Start `python -m service` on a free loopback port and wait until /readyz says 200."""
    port = free_port()
    environment = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        # No gRPC front end unless a test asks for one (on a port of its own).
        "GRPC_PORT": "0",
        "MODEL_DIR": str(model),
        "WORKERS": "1",
        "THREADS": "16",
        "PROMETHEUS_MULTIPROC_DIR": str(log_dir / f"metrics-{port}"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    command = [sys.executable, "-m", "service"]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, env=environment, stdout=log_file, stderr=log_file, cwd=ROOT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}:\n{server.log()}")
        try:
            # Workers accept only once warm: until then a connection waits in the backlog.
            if requests.get(server.url + "/readyz", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"server not ready in {ready_timeout}s:\n{server.log()}")


@pytest.fixture
def server_factory(tmp_path) -> Iterator[Callable[..., Server]]:
    """Start real servers on demand; stop every one of them (by PID) afterwards."""
    started: list[Server] = []

    def start(model: Path, **env: str) -> Server:
        server = start_server(model, tmp_path, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fault_server(server_factory, model_dir, tmp_path):
    """Start the service around tests/fault_app.py's misbehaving model; return it and its
    FaultControl (held batches are all released at the end, so no worker hangs)."""
    from tests.fault_app import FaultControl

    control = FaultControl(tmp_path / "faults")
    control.fault_dir.mkdir()

    def start(**env: str) -> tuple[Server, FaultControl]:
        env = {"FAULT_DIR": str(control.fault_dir), **env}
        env = {"RUNTIME": "tests.fault_app:load", **env}
        return server_factory(model_dir, **env), control

    yield start
    control.release_all()


def require_tool(name: str, package: str) -> str:
    """Return the path of a program the test drives; skip without it, but fail in CI."""
    folders = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    path = shutil.which(name, path=os.pathsep.join(folders))
    if path is None:
        unavailable(f"{name} is not installed ({package}; .ci/run installs it)")
    return path


def unavailable(message: str) -> NoReturn:
    """Skip a test that lacks what it drives, but fail it in CI, which must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run every test")
    pytest.skip(message)


def png_bomb(width: int, height: int) -> bytes:
    """Return a valid few-KB grayscale PNG header+data claiming width x height pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 16, 9)  # first rows only; the rest is absent
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def run_python(
    args: list[str],
    tmp_path: Path | None = None,
    hide_tensorflow: bool = False,
    timeout_s: float = 300,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run this interpreter on `args` from the repository root, with KERAS_BACKEND unset
    unless `env` sets it; return the finished process."""
    path = [str(ROOT)]
    if hide_tensorflow:
        assert tmp_path is not None
        # As if TensorFlow were not installed: an import of it fails, find_spec finds nothing.
        site = tmp_path / "no-tensorflow"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text('import sys\nsys.modules["tensorflow"] = None\n')
        path.insert(0, str(site))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    environment.pop("KERAS_BACKEND", None)
    return subprocess.run(
        [sys.executable, *args],
        env={**environment, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
