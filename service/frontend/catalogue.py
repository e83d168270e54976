"""A worker's view of what its runners serve: models, versions, states, inputs, labels.

The view is fetched from the runners over the channel whenever the slot table shows a change:
a runner started or stopped, or published, retired or refused a version. Every request looks
at the table first, so no request that begins after a new version's first answer can resolve
the old one; a thread also follows the table, so /readyz and the metrics keep up when no
request comes. The registry it fills (service.registry.Models) is what every protocol asks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from model_folder.files import ModelInfo
from model_folder.preprocessing import InputSpec
from service import metrics
from service.channel.client import RunnerClient
from service.errors import ServiceError
from service.frontend.versions import RemoteVersion
from service.registry import Models, Phase, State, VersionStatus
from service.settings import Settings

log = logging.getLogger(__name__)

# How often the follower thread looks at the slot table.
FOLLOW_S = 0.1
# The longest a worker waits for a runner's catalogue.
CATALOGUE_TIMEOUT_S = 2.0
# Of one version's states across runners, the one a worker reports.
_PRECEDENCE = [State.AVAILABLE, State.LOADING, State.UNLOADING, State.FAILED, State.END]


class Catalogue:
    """The runners' catalogue, kept in a worker's registry."""

    def __init__(
        self, settings: Settings, client: RunnerClient, models: Models[RemoteVersion]
    ) -> None:
        """Fill `models` with what the runners behind `client` serve."""
        self.settings = settings
        self.client = client
        self.models = models
        self.phase = Phase.STARTING
        self.failure = ""
        self._seen: bytes | None = None
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._closed = threading.Event()
        self._versions: dict[tuple[str, str], RemoteVersion] = {}
        self._in_view: set[tuple[str, str]] = set()
        self._retry_at = 0.0
        self._stopped_batching = False

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Follow the runners from a thread; `wait_started` says when they have answered."""
        threading.Thread(target=self._follow, name="catalogue", daemon=True).start()

    def wait_started(self, timeout: float) -> bool:
        """Wait until a version serves or the runners have failed; tell whether so."""
        return self._started.wait(timeout)

    def drain(self) -> bool:
        """Report not-ready from now on, still answering what arrives; False if already so."""
        if self.phase is Phase.DRAINING:
            return False
        self.phase = Phase.DRAINING
        metrics.READY.set(0)
        log.info("draining: readiness now reports 503")
        return True

    def close(self) -> None:
        """Stop following the runners."""
        self._closed.set()

    @property
    def ready(self) -> bool:
        """Tell whether new predictions are welcome: not draining, and each model that has an
        available version has one on a runner that runs (a model being removed, with its
        versions all retired, does not count)."""
        if self.phase is not Phase.READY:
            return False
        available = [self._available(name) for name in self.models.names()]
        served = [versions for versions in available if versions]
        return bool(served) and all(
            any(status.served is not None and status.served.alive for status in versions)
            for versions in served
        )

    @property
    def alive(self) -> bool:
        """Tell whether this worker is worth keeping: it is, while it answers (a runner that
        fails is restarted by the master, not by restarting the pod)."""
        return True

    def readiness(self) -> dict[str, object]:
        """Describe the service for /readyz: the phase, and every model version's state."""
        status = self.phase.value
        if self.phase is Phase.READY and not self.ready:
            status = "no_model"
            if self._stopped_batching:
                status = "batcher_stopped"
            elif self.models.names():
                status = "no_runner"
        rows = []
        for version in self.models.statuses():
            row: dict[str, object] = {
                "name": version.model,
                "version": version.version,
                "state": version.state.value,
            }
            if version.served is not None:
                info = version.served.info
                row |= {
                    "input_shape": list(info.input_shape),
                    "classes": len(info.labels),
                    "device": info.device,
                    "runners": list(version.served.runners),
                }
            if version.error:
                row["error"] = version.error
            rows.append(row)
        body: dict[str, object] = {"status": status, "models": rows}
        if self.failure:
            body["error"] = self.failure
        return body

    # --- keeping up with the runners --------------------------------------------------------

    def refresh(self, retry: bool = False) -> None:
        """Fetch the runners' catalogues if the slot table has changed since the last fetch.

        A runner that did not answer (it is starting) is asked again by the follower thread,
        or with `retry`; requests meanwhile go on with what the others said.
        """
        if self.client.slots.snapshot() == self._seen:
            return
        if self._seen is None and not retry and time.monotonic() < self._retry_at:
            return
        with self._lock:
            snapshot = self.client.slots.snapshot()
            if snapshot == self._seen:
                return
            views, complete = self._fetch()
            self._seen = snapshot if complete else None
            self._retry_at = time.monotonic() + FOLLOW_S
            self._apply(views)

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                self.refresh(retry=True)
            except Exception:
                log.exception("the runners' catalogue could not be read")
            self._closed.wait(FOLLOW_S)

    def _fetch(self) -> tuple[dict[int, dict[str, Any]], bool]:
        """Return the catalogue of each running runner that answered, and whether all did."""
        views = {}
        complete = True
        for index in range(self.client.slots.count):
            if not self.client.slots.running(index):
                continue
            try:
                views[index] = self.client.catalogue(index, CATALOGUE_TIMEOUT_S)
            except ServiceError:
                complete = False  # starting or stopping: asked again soon
        return views, complete

    def _apply(self, views: dict[int, dict[str, Any]]) -> None:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        holders: dict[tuple[str, str], list[int]] = {}
        labels: dict[str, dict[str, str]] = {}
        for index, view in sorted(views.items()):
            labels.update(view["labels"])
            for row in view["versions"]:
                key = (row["model"], row["version"])
                state = State(row["state"])
                if "info" in row and row.get("alive", True):
                    holders.setdefault(key, []).append(index)
                known = merged.get(key)
                if known is None or _PRECEDENCE.index(state) < _PRECEDENCE.index(
                    State(known["state"])
                ):
                    merged[key] = row
        statuses = []
        for key, row in merged.items():
            served = None
            if "info" in row:
                served = self._remote(key, row["info"], tuple(holders.get(key, ())))
            statuses.append(
                VersionStatus(key[0], key[1], State(row["state"]), row["error"], served)
            )
        phases = [Phase(view["phase"]) for view in views.values()]
        failures = [view["failure"] for view in views.values() if view["failure"]]
        reasons = [view["unready_reason"] for view in views.values()]
        if Phase.READY in phases:
            phase, reason = Phase.READY, None
        elif phases and all(p is Phase.FAILED for p in phases):
            phase, reason = Phase.FAILED, next(r for r in reasons if r)
        else:
            phase, reason = Phase.STARTING, "the models are still loading"
        self._stopped_batching = any(
            row.get("alive") is False for view in views.values() for row in view["versions"]
        )
        self.models.replace(statuses, labels, reason)
        # Versions no runner knows any more are dropped here too (leases keep their own).
        self._versions = {key: v for key, v in self._versions.items() if key in merged}
        self.failure = failures[0] if failures else ""
        if self.phase is not Phase.DRAINING:  # draining lasts until the worker exits
            self.phase = phase
            metrics.READY.set(1 if self.ready else 0)
        self._count_versions(statuses)
        slots = self.client.slots
        restarted = any(slots.incarnation(i) > 1 for i in range(slots.count))
        if phase is not Phase.STARTING or restarted:
            self._started.set()

    def _remote(
        self, key: tuple[str, str], info: dict[str, Any], runners: tuple[int, ...]
    ) -> RemoteVersion:
        height, width, channels = info["shape"]
        spec = InputSpec(height, width, channels, info["rescale"], info["offset"])
        model_info = ModelInfo(key[0], key[1], tuple(info["labels"]), spec, info["device"])
        known = self._versions.get(key)
        if known is not None and known.info == model_info:
            known.runners = runners
            return known
        remote = RemoteVersion(model_info, runners, self.client, self.settings)
        self._versions[key] = remote
        return remote

    def _count_versions(self, statuses: list[VersionStatus]) -> None:
        in_view = {(s.model, s.version) for s in statuses if s.state is State.AVAILABLE}
        for model, version in in_view - self._in_view:
            metrics.version_in_worker(model, version, True)
        for model, version in self._in_view - in_view:
            metrics.version_in_worker(model, version, False)
        self._in_view = in_view

    def _available(self, name: str) -> list[VersionStatus]:
        return [s for s in self.models.statuses(name) if s.state is State.AVAILABLE]
