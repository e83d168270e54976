"""The models and versions a worker serves, their states, and the one lookup every protocol uses.

service.runner.reloader changes what is here (load, publish, retire); the HTTP layer only asks.
A lookup leases the version it returns: the request holds it until it is answered, so a
version retired meanwhile still finishes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from model_folder.files import ModelInfo
from model_folder.repository import version_key
from service.errors import ModelNotFound, ModelNotReady, Overloaded


class Served(Protocol):
    """A version that serves: in a runner, its batcher (service.runner.inference.ModelVersion);
    in a worker, the runners that hold it (service.frontend.versions.RemoteVersion)."""

    info: ModelInfo

    @property
    def alive(self) -> bool: ...

    def hold(self) -> None: ...

    def release(self) -> None: ...


# What a registry holds: a runner's V, or a worker's RemoteVersion.
V = TypeVar("V", bound=Served)


class Phase(StrEnum):
    """Where a runner, or a worker's view of its runners, is in its life."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class State(StrEnum):
    """A version's state, named as TF Serving names them (FAILED: refused at load)."""

    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"
    FAILED = "FAILED"


@dataclass(frozen=True)
class VersionStatus(Generic[V]):
    """One version of one model as this worker sees it."""

    model: str
    version: str
    state: State
    error: str = ""
    served: V | None = None


class Models(Generic[V]):
    """Every model this worker knows, by name, each with its versions and version labels."""

    def __init__(self, threads: int, on_change: Callable[[], None] | None = None) -> None:
        """Share `threads` request threads out so that one busy model cannot hold them all;
        call `on_change` after each change of what is served (a runner tells its workers)."""
        self.threads = threads
        self._on_change = on_change or (lambda: None)
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, VersionStatus[V]]] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._holding: dict[str, int] = {}
        # Why nothing may be found yet (loading, or start-up failed): a lookup that finds
        # nothing then says 503 with this, rather than 404.
        self.unready_reason: str | None = "the models are still loading"

    # --- the lookup ---------------------------------------------------------------------

    def acquire(
        self, name: str | None = None, version: str | None = None, label: str | None = None
    ) -> V:
        """Lease the version asked for; `release` it once the request is answered.

        No name: the only model (an error if there are several). No version and no label:
        the newest available version. Raise ModelNotFound for what is not served, and
        Overloaded when the model already holds its share of the request threads.
        """
        with self._lock:
            served = self._find_locked(name, version, label)
            model = served.info.name
            holding = self._holding.get(model, 0)
            share = self._share_locked()
            if holding >= share:
                raise Overloaded(
                    f"model {model!r} already holds its share of request threads "
                    f"({share} of {self.threads})"
                )
            self._holding[model] = holding + 1
            served.hold()
        return served

    def release(self, served: V) -> None:
        """End the lease of a request on `served`."""
        with self._lock:
            self._holding[served.info.name] -= 1
        served.release()

    def serving(self, name: str, version: str) -> V:
        """Return the version that serves as `name` `version`, retired or not (a request that
        resolved it before its retirement is still answered by it)."""
        with self._lock:
            status = self._versions.get(name, {}).get(version)
            if status is None or status.served is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r} serving")
            return status.served

    def find(
        self, name: str | None = None, version: str | None = None, label: str | None = None
    ) -> V:
        """Return the version `acquire` would lease, without leasing it."""
        with self._lock:
            return self._find_locked(name, version, label)

    def _find_locked(self, name: str | None, version: str | None, label: str | None) -> V:
        try:
            return self._lookup_locked(name, version, label)
        except ModelNotFound:
            if self.unready_reason is not None:
                raise ModelNotReady(self.unready_reason) from None
            raise

    def _lookup_locked(self, name: str | None, version: str | None, label: str | None) -> V:
        if name is None:
            names = [n for n, versions in self._versions.items() if _available(versions)]
            if len(names) != 1:
                if not names:
                    raise ModelNotFound("no model is served")
                raise ModelNotFound(f"several models are served; name one of {sorted(names)}")
            name = names[0]
        versions = self._versions.get(name)
        if versions is None:
            served = sorted(n for n, v in self._versions.items() if _available(v))
            raise ModelNotFound(f"no model named {name!r} is served; served: {served}")
        if label is not None:
            version = self._labels.get(name, {}).get(label)
            if version is None:
                known = sorted(self._labels.get(name, {}))
                raise ModelNotFound(
                    f"model {name!r} has no version label {label!r}; labels: {known}"
                )
        available = _available(versions)
        if version is None:
            if not available:
                raise ModelNotFound(f"model {name!r} has no version available now")
            return versions[available[-1]].served  # type: ignore[return-value]
        status = versions.get(version)
        if status is None or status.state is not State.AVAILABLE:
            state = f" (it is {status.state})" if status is not None else ""
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} available{state}; "
                f"available: {available}"
            )
        return status.served  # type: ignore[return-value]

    def _share_locked(self) -> int:
        # Each other model keeps a reserve of threads that this one cannot take.
        models = sum(1 for versions in self._versions.values() if _available(versions))
        if models <= 1:
            return self.threads
        reserve = max(1, self.threads // (2 * models))
        return max(1, self.threads - reserve * (models - 1))

    # --- what the reloader changes ------------------------------------------------------

    def set_state(self, model: str, version: str, state: State, error: str = "") -> None:
        """Record a version that serves nothing now: LOADING, FAILED or END."""
        with self._lock:
            self._versions.setdefault(model, {})[version] = VersionStatus(
                model, version, state, error
            )
        self._on_change()

    def publish(self, served: V) -> None:
        """Make a loaded, warm version AVAILABLE: from now on lookups can return it."""
        info = served.info
        with self._lock:
            self._versions.setdefault(info.name, {})[info.version] = VersionStatus(
                info.name, info.version, State.AVAILABLE, served=served
            )
        self._on_change()

    def retire(self, model: str, version: str) -> V | None:
        """Mark a version UNLOADING: no new lookup returns it. Return it, or None if not served."""
        with self._lock:
            status = self._versions.get(model, {}).get(version)
            if status is None or status.served is None:
                return None
            self._versions[model][version] = VersionStatus(
                model, version, State.UNLOADING, served=status.served
            )
        self._on_change()
        return status.served

    def end(self, served: V) -> None:
        """Mark a retired version END, unless its number has been published again since."""
        info = served.info
        with self._lock:
            status = self._versions.get(info.name, {}).get(info.version)
            if status is not None and status.served is served:
                self._versions[info.name][info.version] = VersionStatus(
                    info.name, info.version, State.END
                )
        self._on_change()

    def set_labels(self, model: str, labels: dict[str, str]) -> None:
        """Set a model's version labels (`stable` -> "2")."""
        with self._lock:
            changed = self._labels.get(model) != labels
            self._labels[model] = dict(labels)
        if changed:
            self._on_change()

    def forget(self, model: str) -> None:
        """Drop a model whose folder is gone and whose versions have all ended."""
        with self._lock:
            versions = self._versions.get(model, {})
            if all(status.served is None for status in versions.values()):
                self._versions.pop(model, None)
                self._labels.pop(model, None)
        self._on_change()

    def changed(self) -> None:
        """Say that what is served has changed in a way no call here shows (a batcher died)."""
        self._on_change()

    def set_unready_reason(self, reason: str | None) -> None:
        """Say why nothing may be found yet (None: the models have started)."""
        self.unready_reason = reason
        self._on_change()

    def replace(
        self,
        statuses: list[VersionStatus[V]],
        labels: dict[str, dict[str, str]],
        unready_reason: str | None,
    ) -> None:
        """Serve exactly `statuses` and `labels` from now on, in one step (a worker's view of
        its runners); the leases held go on."""
        versions: dict[str, dict[str, VersionStatus[V]]] = {}
        for status in statuses:
            versions.setdefault(status.model, {})[status.version] = status
        with self._lock:
            self._versions = versions
            self._labels = {name: dict(pairs) for name, pairs in labels.items()}
            self.unready_reason = unready_reason

    # --- what status routes read ---------------------------------------------------------

    def names(self) -> list[str]:
        """Return the names of every model known, sorted."""
        with self._lock:
            return sorted(self._versions)

    def statuses(self, model: str | None = None) -> list[VersionStatus[V]]:
        """Return every version of `model` (of all models if None), by name and version."""
        with self._lock:
            names = [model] if model is not None else sorted(self._versions)
            return [
                status
                for name in names
                for _, status in sorted(
                    self._versions.get(name, {}).items(), key=lambda item: version_key(item[0])
                )
            ]

    def labels(self, model: str) -> dict[str, str]:
        """Return a model's version labels."""
        with self._lock:
            return dict(self._labels.get(model, {}))

    def served(self) -> Iterator[V]:
        """Yield every version that serves now (AVAILABLE or UNLOADING), by name and version."""
        for status in self.statuses():
            if status.served is not None:
                yield status.served

    def available(self) -> list[V]:
        """Return every AVAILABLE version, by name and version."""
        return [
            status.served
            for status in self.statuses()
            if status.state is State.AVAILABLE and status.served is not None
        ]


def _available(versions: dict[str, VersionStatus]) -> list[str]:
    """Return the AVAILABLE versions of one model, oldest first."""
    return sorted(
        (v for v, status in versions.items() if status.state is State.AVAILABLE),
        key=version_key,
    )
