"""`cnn-serve`: check the model folder, then hand over to gunicorn with the service's config."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from service import model_dir
from service.errors import ModelLoadError
from service.model_dir import ModelFiles
from service.settings import Settings, SettingsError

GUNICORN_ARGS = ["--config", "python:service.gunicorn_conf", "service.app:create_app()"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; every flag falls back to its environment variable."""
    parser = argparse.ArgumentParser(
        prog="cnn-serve",
        description="Serve a Keras CNN classifier over HTTP (flags override environment "
        "variables; see the README for the rest, e.g. MAX_BATCH_SIZE).",
    )
    parser.add_argument("--model-dir", help="model folder or folder of versions [MODEL_DIR]")
    parser.add_argument("--host", help="address to bind [HOST, default 0.0.0.0]")
    parser.add_argument("--port", type=int, help="port to bind [PORT, default 8080]")
    parser.add_argument("--workers", type=int, help="worker processes [WORKERS, default: cores]")
    parser.add_argument("--threads", type=int, help="threads per worker [THREADS, default 16]")
    parser.add_argument(
        "--check", action="store_true", help="only load and check the model folder, then exit"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the settings and the model, then exec gunicorn (the port is bound only then)."""
    args = parse_args(argv)
    try:
        settings = Settings.from_env(
            model_dir=args.model_dir,
            host=args.host,
            port=args.port,
            workers=args.workers,
            threads=args.threads,
        )
        settings.bearer_token  # noqa: B018 - an unreadable token file stops start-up here
    except SettingsError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 2
    if missing := missing_tensorflow():
        print(f"cnn-serve: error: {missing}", file=sys.stderr)
        return 1
    # The workers' environment, taken before the check below switches Keras's backend.
    environment = {**os.environ, **settings.as_env()}
    try:
        files = check_model(settings.model_dir)
    except ModelLoadError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        print(f"cnn-serve: {files.name} version {files.version} loads: {len(files.labels)} classes")
        return 0
    argv_gunicorn = [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS]
    # exec: the checked model goes away; workers load their own after the fork.
    os.execve(sys.executable, argv_gunicorn, environment)
    return 0  # not reached


def missing_tensorflow() -> str:
    """Return why TensorFlow cannot be imported and which extra brings it, or "" if it can."""
    if importlib.util.find_spec("tensorflow") is not None:
        return ""
    return (
        "TensorFlow is not installed; install the package with one of its builds: "
        "pip install 'cnn-serving[cpu]' (or 'cnn-serving[gpu]' on a CUDA machine)"
    )


def check_model(path: Path) -> ModelFiles:
    """Vet the model folder as the workers will load it, on Keras's numpy backend.

    Building the model and loading its weights there finds every fault a worker would
    (architecture, shapes, labels, weights) in about 2 s, without importing TensorFlow
    or tracing graphs; each worker then does the one TensorFlow import and load it needs.
    """
    model_dir.read(path)  # the common faults, found before Keras is imported at all
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "numpy"
    from service import runtime

    return runtime.check_model(path)[1]
