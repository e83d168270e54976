"""`cnn-serve`: check the model folder, then hand over to gunicorn with the service's config."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model_folder import files as model_files
from model_folder import repository
from model_folder.errors import ModelFolderError
from model_folder.files import ModelFiles
from model_folder.requirements import missing_tensorflow
from service.settings import Settings, SettingsError

GUNICORN_ARGS = ["--config", "python:service.gunicorn_conf", "service.frontend.app:create_app()"]


def skip_plotting_imports() -> None:
    """Keep Keras from importing matplotlib in this process, which never plots.

    Keras imports matplotlib.pyplot at its own import when it is installed (the `train` extra
    brings it): 0.5 s of each Keras import measured on the 2-core development VM, paid by
    every runner before it is ready. Keras treats a missing matplotlib as "no plotting"; only
    the service's own processes call this.
    """
    if "matplotlib" not in sys.modules:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; every flag falls back to its environment variable."""
    parser = argparse.ArgumentParser(
        prog="cnn-serve",
        description="Serve a Keras CNN classifier over HTTP (flags override environment "
        "variables; see docs/configuration.md for the rest, e.g. MAX_BATCH_SIZE).",
    )
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model-dir", help="model folder or folder of versions [MODEL_DIR]")
    models.add_argument(
        "--model-repository", help="folder of models, one sub-folder each [MODEL_REPOSITORY]"
    )
    parser.add_argument("--host", help="address to bind [HOST, default 0.0.0.0]")
    parser.add_argument("--port", type=int, help="port to bind [PORT, default 8080]")
    parser.add_argument(
        "--grpc-port", type=int, help="gRPC port to bind, 0 for none [GRPC_PORT, default 8081]"
    )
    parser.add_argument("--workers", type=int, help="worker processes [WORKERS, default: cores]")
    parser.add_argument("--threads", type=int, help="threads per worker [THREADS, default 16]")
    parser.add_argument(
        "--check", action="store_true", help="only load and check the model folder, then exit"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the settings and exec gunicorn, whose runners load the models before it binds;
    with --check, only load and check the models here, then exit."""
    args = parse_args(argv)
    skip_plotting_imports()
    try:
        settings = Settings.from_env(
            model_dir=args.model_dir,
            model_repository=args.model_repository,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            workers=args.workers,
            threads=args.threads,
        )
        settings.bearer_token  # noqa: B018 - an unreadable token file stops start-up here
    except SettingsError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 2
    os.environ["KERAS_BACKEND"] = settings.keras_backend  # before any import of Keras
    if settings.keras_backend == "tensorflow" and (missing := missing_tensorflow()):
        print(f"cnn-serve: error: {missing}", file=sys.stderr)
        return 1
    if not args.check:
        # exec: gunicorn's master is this process. Its config starts the runners, which load
        # the models before the port is bound; a model that cannot be loaded stops it there.
        environment = {**os.environ, **settings.as_env()}
        argv_gunicorn = [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS]
        os.execve(sys.executable, argv_gunicorn, environment)
    try:
        checked = check_models(settings)
    except ModelFolderError as exc:
        print(f"cnn-serve: error: {exc}", file=sys.stderr)
        return 1
    for files in checked:
        print(f"cnn-serve: {files.name} version {files.version} loads: {len(files.labels)} classes")
    return 0


def check_models(settings: Settings) -> list[ModelFiles]:
    """Vet the versions each model will serve, as a runner will load them, on the serving
    backend; return them.

    A broken version is reported and the one before it served instead, as a reload would; a
    model with no version that loads is an error.
    """
    path = settings.model_path
    if settings.model_repository:
        entries = repository.scan_repository(path)
        if not entries:
            raise ModelFolderError(f"{path}: the model repository holds no model folder")
    else:
        entry = repository.scan_model_dir(path)
        entries = {entry.name: entry}
    checked: list[ModelFiles] = []
    for entry in entries.values():
        if entry.config_error:
            raise ModelFolderError(entry.config_error)
        passed: dict[str, ModelFiles] = {}
        refused: dict[str, str] = {}
        while unchecked := [
            v
            for v in reversed(entry.served_versions(settings.version_policy, refused))
            if v not in passed
        ]:
            folder = entry.versions[unchecked[0]]
            try:
                passed[folder.version] = _check_version(folder.path, entry.name, folder.version)
            except ModelFolderError as exc:
                refused[folder.version] = str(exc)
        if not passed:
            first = next(iter(refused.values()), "")
            raise ModelFolderError(
                first or f"{entry.folder}: no model.json and no numbered version folders"
            )
        for message in refused.values():
            print(f"cnn-serve: warning: version refused: {message}", file=sys.stderr)
        checked.extend(passed[v] for v in sorted(passed, key=repository.version_key))
    return checked


def _check_version(folder: Path, name: str, version: str) -> ModelFiles:
    model_files.read(folder, name, version)  # the common faults, before Keras is imported
    from service.runner import runtime

    return runtime.check_model(folder, name, version)[1]
