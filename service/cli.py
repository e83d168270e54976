"""`cnn-serve`: check the model folder, then hand over to gunicorn with the service's config."""

from __future__ import annotations

import argparse
import os
import sys

from service import model_dir
from service.errors import ModelLoadError
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
    except SettingsError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        model_dir.read(settings.model_dir)  # the common faults, found without TensorFlow
        from service.runtime import load_classifier

        classifier = load_classifier(settings.model_dir, settings.max_batch_size)
    except ModelLoadError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        info = classifier.info
        print(f"cnn-serve: {info.name} version {info.version} loads: {len(info.labels)} classes")
        return 0
    environment = {**os.environ, **settings.as_env()}
    argv_gunicorn = [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS]
    # exec: the checked model and TensorFlow go away; workers load their own after the fork.
    os.execve(sys.executable, argv_gunicorn, environment)
    return 0  # not reached
