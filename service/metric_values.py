"""A prometheus_client value class for which a full metrics folder costs metrics, not workers.

Each process keeps its values in reserved MetricFiles, one per metric type, in
PROMETHEUS_MULTIPROC_DIR. A value that finds no room there is kept in memory, counted once
in a failure counter and logged once per process; the files are retried on later writes,
and every kept value reaches its file once there is room.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from prometheus_client import values
from prometheus_client.mmap_dict import mmap_key

from service import logs
from service.metric_files import MetricFile

log = logging.getLogger(__name__)

# After a failed allocation, no new file or growth is tried for this long: writes meanwhile
# cost no system call, and a kept value waits at most this long once room returns.
RETRY_S = 1.0


class MetricValue:
    """A sample's value, in prometheus_client's value-class protocol: always in memory, and
    in this process's file for its type once that file has room for it."""

    files: ClassVar[ProcessFiles]

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Sequence[str],
        labelvalues: Sequence[str],
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: object,
    ) -> None:
        self.name = name
        self.file_name = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self.key = mmap_key(metric_name, name, list(labelnames), list(labelvalues), help_text)
        self.value = 0.0
        self.timestamp = 0.0
        self.slot: tuple[MetricFile, int] | None = None
        self.files.add(self)

    def inc(self, amount: float) -> None:
        self.files.write(self, amount, 0.0, increment=True)

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.files.write(self, value, timestamp or 0.0, increment=False)

    def get(self) -> float:
        return self.files.read(self)

    def set_exemplar(self, exemplar: object) -> None:
        return  # prometheus_client has no exemplars in multiprocess mode either

    def get_exemplar(self) -> None:
        return None


class ProcessFiles:
    """This process's metric files in one folder: the values in them, and those waiting for
    room. One lock serialises all of it, as in prometheus_client."""

    def __init__(self, folder: str, failure_counter: str) -> None:
        self.folder = folder
        # The sample counting values that found no room (the counter's name, with _total).
        self.failure_counter = failure_counter
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._files: dict[str, MetricFile] = {}
        self._values: list[MetricValue] = []
        self._waiting: list[MetricValue] = []
        self._failures: MetricValue | None = None
        self._uncounted = 0
        self._retry_at = 0.0
        self._logged = False

    def add(self, value: MetricValue) -> None:
        """Take a new value: give it its slot and read its value there, or keep it waiting."""
        with self._lock:
            self._follow_fork()
            self._values.append(value)
            if value.name == self.failure_counter:
                self._failures = value
                value.value, self._uncounted = self._uncounted, 0
            self._start(value)

    def write(self, value: MetricValue, amount: float, timestamp: float, increment: bool) -> None:
        """Add amount to a value, or set it; write it to its slot if it has one."""
        with self._lock:
            self._follow_fork()
            value.value = value.value + amount if increment else amount
            value.timestamp = timestamp
            self._store(value)
            if self._waiting and time.monotonic() >= self._retry_at:
                self._retry()

    def read(self, value: MetricValue) -> float:
        """Return a value."""
        with self._lock:
            self._follow_fork()
            return value.value

    def _start(self, value: MetricValue) -> None:
        if self._place(value):
            assert value.slot is not None
            file, position = value.slot
            # What the file holds (a previous process's, with this pid), plus any failures
            # the failure counter has counted already.
            stored, value.timestamp = file.read(position)
            value.value += stored
            self._store(value)
        else:
            self._waiting.append(value)
            self._count_failure()

    def _place(self, value: MetricValue) -> bool:
        """Give a value its slot; return False where its file has no room for it."""
        file = self._files.get(value.file_name)
        if time.monotonic() < self._retry_at and (file is None or not file.has_room(value.key)):
            return False
        try:
            if file is None:
                path = os.path.join(self.folder, f"{value.file_name}_{self._pid}.db")
                file = self._files[value.file_name] = MetricFile(path)
            value.slot = file, file.slot(value.key)
        except OSError as error:
            self._retry_at = time.monotonic() + RETRY_S
            if not self._logged:
                self._logged = True
                log.error(
                    "the metrics folder has no room for this worker's metric files: their "
                    "values are kept in memory, and /metrics misses them until it has room; "
                    "requests are not affected",
                    extra={"folder": self.folder, "error": str(error), "pid": self._pid},
                )
            return False
        return True

    def _retry(self) -> None:
        waited = len(self._waiting)
        still_waiting = []
        for value in self._waiting:
            if self._place(value):
                self._store(value)  # the value kept in memory goes to the new slot
            else:
                still_waiting.append(value)
        self._waiting = still_waiting
        if not still_waiting:
            log.info(
                "the metrics folder has room again: the values kept in memory are written",
                extra={"folder": self.folder, "kept_values": waited, "pid": self._pid},
            )

    def _store(self, value: MetricValue) -> None:
        if value.slot is not None:
            file, position = value.slot
            file.write(position, value.value, value.timestamp)

    def _count_failure(self) -> None:
        if self._failures is None:
            self._uncounted += 1
            return
        self._failures.value += 1
        self._store(self._failures)

    def _follow_fork(self) -> None:
        """In a forked child, start over in files of its own pid, as prometheus_client does."""
        if os.getpid() == self._pid:
            return
        self._pid = os.getpid()
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._waiting.clear()
        self._uncounted, self._retry_at, self._logged = 0, 0.0, False
        for value in self._values:
            value.slot, value.value, value.timestamp = None, 0.0, 0.0
        for value in self._values:
            self._start(value)


def value_class(folder: str, failure_counter: str) -> type[MetricValue]:
    """Return a value class keeping this process's values in reserved files in folder."""

    class FolderValue(MetricValue):
        files = ProcessFiles(folder, failure_counter)

    return FolderValue


def install(failure_counter: str) -> None:
    """Make prometheus_client's metrics use reserved files; call before any metric exists.

    failure_counter is the name of a Counter (with _total) counting the values that found no
    room; defined first, its own slot exists from start-up.
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # Without the folder, one process keeps its values in memory; without posix_fallocate
    # (macOS), prometheus_client's own files are the best there is.
    if not folder or not hasattr(os, "posix_fallocate"):
        return
    # A full folder may be found while the metrics are defined, before create_app
    # configures logging: its one line must be JSON all the same.
    logs.configure()
    values.ValueClass = value_class(folder, failure_counter)
