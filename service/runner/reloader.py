"""Model versions loaded, swapped and unloaded in a running worker: hot reload, no restart.

One thread per worker scans the models (every MODEL_POLL_S, and at once on SIGHUP) and
brings the registry to what the version policies ask for:
- a new version is loaded and warmed beside the one serving, then published in one step;
  lookups return it from then on, and the version it replaces is retired;
- a retired version answers every request already given to it, then closes and is freed;
- a version that fails to load is refused: FAILED with its error in the status routes, one
  log line, `cnn_model_load_failures_total`; the version before it keeps serving. It is tried
  again only once its files change, so a broken version never loads in a loop;
- a version seen for the first time by a scan waits for the next one, so that a folder still
  being copied is not loaded half-written (start-up and SIGHUP load at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model_folder import repository
from model_folder.errors import ModelFolderError
from model_folder.repository import ModelEntry, VersionFolder
from service import metrics
from service.registry import Models, Phase, State
from service.runner.inference import Classifier, ModelVersion
from service.settings import Settings

log = logging.getLogger(__name__)

# How often the GIL changes hands while a version loads beside the ones serving (5 ms else).
LOAD_SWITCH_INTERVAL_S = 0.0005
# The lock file the workers of one server take turns on to load (set by service.gunicorn_conf).
LOAD_LOCK_ENV = "CNN_SERVING_LOAD_LOCK"
# Load one version: (its folder, model name, version) -> a warm ModelVersion.
Loader = Callable[[Path, str, str], ModelVersion]


@dataclass(frozen=True)
class _Refusal:
    fingerprint: tuple[tuple[str, int, int], ...]
    error: str


class ModelManager:
    """Keeps a worker's registry in step with its model folder or repository."""

    def __init__(
        self,
        settings: Settings,
        models: Models[ModelVersion],
        classifier: Classifier | None = None,
        loader: Loader | None = None,
        runner: str = "0",
    ) -> None:
        """Serve `classifier` alone if given (no folder, no reloads); else load from the folder
        of settings, with `loader` (default: Keras through service.runner.runtime, or the stand-in
        runtime settings.runtime names)."""
        self.settings = settings
        self.models = models
        self.runner = runner
        self.phase = Phase.STARTING
        self.failure = ""
        self._given = classifier
        self._loader = loader or self._load_with_runtime
        self._started = threading.Event()
        self._wake = threading.Event()
        self._force = False
        self._closed = False
        self._sync_lock = threading.Lock()
        self._refused: dict[tuple[str, str], _Refusal] = {}
        self._seen: dict[tuple[str, str], tuple[tuple[str, int, int], ...]] = {}
        self._config_errors: dict[str, str] = {}
        self._scan_error = ""
        self._dir_model_name = ""  # MODEL_DIR's model keeps the name its first scan found

    # --- life cycle ----------------------------------------------------------------------

    def start(self, background: bool) -> None:
        """Load what the policies ask for, then watch for changes (in a thread if `background`)."""
        if background:
            threading.Thread(target=self._run, name="model-reloader", daemon=True).start()
        else:
            self._start()

    def wait_started(self, timeout: float) -> bool:
        """Wait until the first load has ended, ready or failed; tell whether it has."""
        return self._started.wait(timeout)

    def reload(self) -> None:
        """Scan now, loading what is new without waiting for its files to settle (SIGHUP)."""
        self._force = True
        self._wake.set()

    def close(self, timeout: float | None = None) -> None:
        """Stop watching, finish queued work and stop every version's batcher."""
        self._closed = True
        self._wake.set()
        for served in list(self.models.served()):
            served.close(timeout)

    @property
    def ready(self) -> bool:
        """Tell whether new predictions are welcome: started, not draining, a version serves."""
        return self.phase is Phase.READY and any(v.alive for v in self.models.available())

    @property
    def alive(self) -> bool:
        """Tell whether the process is worth keeping: not failed, no dead batcher serving."""
        if self.phase is Phase.FAILED:
            return False
        return all(served.alive for served in self.models.available())

    def wait_inference_died(self) -> None:
        """Return once an available version's inference thread has died (it never recovers)."""
        while not self._closed:
            if self.phase is not Phase.STARTING and not self.alive:
                return
            time.sleep(1.0)

    def _run(self) -> None:
        self._start()
        if self._given is not None or self.phase is Phase.FAILED:
            return
        poll_s = self.settings.model_poll_s or None  # None: only when woken (SIGHUP)
        while True:
            self._wake.wait(poll_s)
            self._wake.clear()
            if self._closed:
                return
            force, self._force = self._force, False
            try:
                self.sync(force=force)
                self._scan_error = ""
            except ModelFolderError as exc:
                if str(exc) != self._scan_error:  # one line per fault, not one per scan
                    self._scan_error = str(exc)
                    log.error("model scan failed; the versions loaded keep serving: %s", exc)
            except Exception:
                log.exception("model scan failed; the versions loaded keep serving")

    def _start(self) -> None:
        started = time.monotonic()
        try:
            if self._given is not None:
                given = ModelVersion(self._given, self.settings, self.models.changed, self.runner)
                self._publish(given, started)
            else:
                if self._loader == self._load_with_runtime and not self.settings.runtime:
                    from service.runner import runtime  # noqa: F401 - TensorFlow and Keras, imported
                _freeze_what_is_loaded()
                self.sync(force=True)
        except ModelFolderError as exc:
            self._fail(str(exc))
        except Exception as exc:
            self._fail(f"model start-up failed: {type(exc).__name__}: {exc}")
        else:
            if unserved := self._unserved():
                self._fail("; ".join(unserved))
            elif self.phase is Phase.STARTING:
                self.phase = Phase.READY
                self.models.set_unready_reason(None)
        finally:
            self._started.set()

    def _unserved(self) -> list[str]:
        """Return why each model with no version to serve has none: at start-up, any such
        model stops the start (later, a reload only reports it)."""
        reasons = list(self._config_errors.values())
        for name in self.models.names():
            statuses = self.models.statuses(name)
            if not any(status.state is State.AVAILABLE for status in statuses):
                errors = [status.error for status in statuses if status.error]
                reasons.append("; ".join(errors) or f"model {name!r} has no version to serve")
        if not reasons and not self.models.available():
            reasons.append(f"{self.settings.model_path}: no model to serve")
        return reasons

    def _fail(self, message: str) -> None:
        self.phase = Phase.FAILED
        self.failure = message
        self.models.set_unready_reason(f"the models failed to load: {message}")
        log.error("model failed to start: %s", message)

    # --- bringing the registry to what is on disk ------------------------------------------

    def sync(self, force: bool = False) -> None:
        """Scan the folder once and load, swap and unload versions to match it."""
        with self._sync_lock:
            entries = self._scan()
            for entry in entries.values():
                self._sync_model(entry, force)
            for name in set(self.models.names()) - set(entries):
                self._sync_model(ModelEntry(name, Path(), {}), force)
                self.models.forget(name)

    def _scan(self) -> dict[str, ModelEntry]:
        path = self.settings.model_path
        if self.settings.model_repository:
            return repository.scan_repository(path)
        entry = repository.scan_model_dir(path, self._dir_model_name or None)
        self._dir_model_name = entry.name
        return {entry.name: entry}

    def _sync_model(self, entry: ModelEntry, force: bool) -> None:
        name = entry.name
        if entry.config_error:
            if self._config_errors.get(name) != entry.config_error:
                self._config_errors[name] = entry.config_error
                log.error(
                    "model config refused; its versions stay as they are: %s",
                    entry.config_error,
                    extra={"model": name},
                )
            return
        self._config_errors.pop(name, None)
        self.models.set_labels(name, dict(entry.config.labels))
        policy = self.settings.version_policy
        loaded = {s.version for s in self.models.statuses(name) if s.state is State.AVAILABLE}
        settled = True
        while True:
            refused = [v for v, f in entry.versions.items() if self._is_refused(name, f)]
            wanted = entry.served_versions(policy, refused)
            missing = [v for v in reversed(wanted) if v not in loaded]
            if not missing:
                break
            folder = entry.versions[missing[0]]  # the newest first
            key = (name, folder.version)
            if not force and self._seen.get(key) != folder.fingerprint:
                self._seen[key] = folder.fingerprint  # new or changed: load it next scan
                settled = False
                break
            if self._load(name, folder):
                loaded.add(folder.version)
        if settled:
            # Only once every wanted version serves: nothing is retired before its successor.
            for version in loaded - set(wanted):
                self._retire(name, version)
        for key in [k for k in self._seen if k[0] == name and k[1] not in entry.versions]:
            self._seen.pop(key)

    def _is_refused(self, name: str, folder: VersionFolder) -> bool:
        refusal = self._refused.get((name, folder.version))
        return refusal is not None and refusal.fingerprint == folder.fingerprint

    def _load(self, name: str, folder: VersionFolder) -> bool:
        if self.phase is Phase.STARTING:
            return self._load_now(name, folder)  # every worker at once: ready sooner
        with _one_worker_at_a_time():
            return self._load_now(name, folder)

    def _load_now(self, name: str, folder: VersionFolder) -> bool:
        version = folder.version
        self.models.set_state(name, version, State.LOADING)
        started = time.monotonic()
        # The load is pure Python for a second or more: hand the GIL back to the request
        # threads ten times as often meanwhile, so they wait 0.5 ms for it, not 5 ms.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(LOAD_SWITCH_INTERVAL_S)
        try:
            served = self._loader(folder.path, name, version)
        except ModelFolderError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"{folder.path}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        else:
            self._refused.pop((name, version), None)
            self._publish(served, started)
            return True
        finally:
            sys.setswitchinterval(switch_interval)
        self._refused[(name, version)] = _Refusal(folder.fingerprint, error)
        self.models.set_state(name, version, State.FAILED, error)
        metrics.MODEL_LOAD_FAILURES.labels(name, version).inc()
        log.error("model version refused: %s", error, extra={"model": name, "version": version})
        return False

    def _publish(self, served: ModelVersion, started: float) -> None:
        info = served.info
        self.models.publish(served)
        load_s = time.monotonic() - started
        metrics.MODEL_LOAD_SECONDS.labels(info.name).observe(load_s)
        metrics.version_serving(info, True)
        metrics.SERVING_VERSION.labels(info.name).set(_newest_number(self.models, info.name))
        log.info(
            "model version ready",
            extra={
                "model": info.name,
                "version": info.version,
                "device": info.device,
                "batch_sizes": getattr(served.classifier, "batch_sizes", None),
                "load_s": round(load_s, 3),
            },
        )

    def _retire(self, name: str, version: str) -> None:
        served = self.models.retire(name, version)
        if served is None:
            return
        metrics.version_serving(served.info, False)
        if self.models.available():
            newest = _newest_number(self.models, name)
            metrics.SERVING_VERSION.labels(name).set(newest)
        log.info("model version retired", extra={"model": name, "version": version})
        thread = threading.Thread(
            target=self._unload, args=(served,), name=f"unload-{name}-{version}", daemon=True
        )
        thread.start()

    def _unload(self, served: ModelVersion) -> None:
        info = served.info
        # A worker may have resolved this version just before its retirement and still be
        # reading the upload: keep it for a request's timeout, then for those it holds.
        kept_until = time.monotonic() + self.settings.request_timeout_s
        while not self._closed and time.monotonic() < kept_until:
            time.sleep(min(0.1, max(0.0, kept_until - time.monotonic())))
        lifetime_s = self.settings.request_lifetime_s
        if not served.wait_idle(lifetime_s + 1.0):
            log.warning(
                "model version still held past a request's lifetime; closing it",
                extra={"model": info.name, "version": info.version},
            )
        served.close(timeout=lifetime_s)
        self.models.end(served)
        del served
        # Its objects were frozen with the rest when it loaded: unfreeze to free them.
        # A model's objects hold each other in cycles (about 6,000 for the reference CNN):
        # freed by a collection, a few ms, since the imports' objects are frozen.
        collecting = time.monotonic()
        gc.collect()
        log.info(
            "model version unloaded",
            extra={
                "model": info.name,
                "version": info.version,
                "gc_s": round(time.monotonic() - collecting, 3),
            },
        )

    def _load_with_runtime(self, folder: Path, name: str, version: str) -> ModelVersion:
        if self.settings.runtime:
            # A stand-in runtime (tests, benchmarks): "module:function" taking the same.
            module, _, function = self.settings.runtime.partition(":")
            load = getattr(importlib.import_module(module), function)
            classifier = load(folder, self.settings, name, version)
        else:
            from service.runner.runtime import load_classifier  # the only path into Keras

            classifier = load_classifier(
                folder,
                self.settings.max_batch_size,
                self.settings.tf_threads,
                name=name,
                version=version,
            )
        return ModelVersion(classifier, self.settings, self.models.changed, self.runner)


@contextlib.contextmanager
def _one_worker_at_a_time() -> Iterator[None]:
    """Hold the workers' load lock: a reload's loads take turns rather than share the cores.

    Loading is a second or more of CPU; all workers loading at once left the requests served
    meanwhile the cores' remainder. In turns, each load has a core to itself, and the versions
    differ across workers for one load time per worker. gunicorn_conf names the lock file;
    without one (no gunicorn) nothing is shared and nothing waits.
    """
    path = os.environ.get(LOAD_LOCK_ENV)
    lock = None
    if path:
        try:
            lock = open(path, "a+b")  # noqa: SIM115 - closed below
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            # No room for the file, or no locks on this file system: load at once.
            if lock is not None:
                lock.close()
            lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.close()  # which releases the lock


def _freeze_what_is_loaded() -> None:
    """Keep the objects of every import out of all later garbage collections.

    TensorFlow and Keras leave about 380,000 long-lived objects; a full collection under load
    scanned them all and stalled every thread ~150 ms. Frozen once, before any model loads,
    they are never scanned again, while each model's own objects (thousands) stay collectable,
    so that a version unloaded is freed.
    """
    gc.collect()
    gc.freeze()


def _newest_number(models: Models[ModelVersion], name: str) -> int:
    numbers = [
        int(s.version)
        for s in models.statuses(name)
        if s.state is State.AVAILABLE and s.version.isdigit()
    ]
    return max(numbers, default=0)
