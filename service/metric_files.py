"""Metric files whose space is reserved, so a full metrics folder costs metrics, not workers.

prometheus_client's multiprocess values live in per-process files (counter_<pid>.db, ...)
that it creates and grows with truncate, leaving them sparse: a value written through the
mmap then needs a page the folder may no longer have, and on a full tmpfs the worker dies of
SIGBUS. The value class here reserves every byte with posix_fallocate before mapping it, so
a full folder is an OSError when a file is created or grown, never a fault later. A value
that finds no room is kept in memory, counted once and logged once per process; the files
are retried on later writes, and every kept value reaches its file once there is room.

The files keep prometheus_client's layout and names, so its MultiProcessCollector and
mark_process_dead read and remove them unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO, ClassVar

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from service import logs

log = logging.getLogger(__name__)

# Files start at one page and double: our files hold a few hundred bytes to ~100 KB.
INITIAL_SIZE = mmap.PAGESIZE
# After a failed allocation, no new file or growth is tried for this long: writes meanwhile
# cost no system call, and a kept value waits at most this long once room returns.
RETRY_S = 1.0
# prometheus_client's layout: the bytes used (int32, then 4 of padding), then entries of a
# key length (int32), the UTF-8 key padded to 8 bytes, and a value and timestamp (doubles).
_HEADER = 8
_USED = struct.Struct("i")
_VALUE = struct.Struct("dd")


class MetricFile:
    """One process's file of samples in prometheus_client's layout, every byte reserved."""

    def __init__(self, path: str) -> None:
        """Open the file, or make it whole under another name first; raise OSError."""
        self.path = path
        try:
            file: BinaryIO = open(path, "r+b")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            file = _create(path)
        # The map keeps a descriptor of its own: no file object stays open to be leaked.
        with file:
            self._map = mmap.mmap(file.fileno(), os.fstat(file.fileno()).st_size)
        self._capacity = len(self._map)
        self._used = _USED.unpack_from(self._map, 0)[0]
        # A process that had this pid before may have left the file: its keys stay theirs.
        self._positions = {
            key: position for key, _, _, position in MmapedDict.read_all_values_from_file(path)
        }

    def has_room(self, key: str) -> bool:
        """Say whether slot(key) can answer without growing the file."""
        return key in self._positions or self._used + len(_entry(key)) <= self._capacity

    def slot(self, key: str) -> int:
        """Return where key's value is, adding the key (and growing the file) if new."""
        position = self._positions.get(key)
        if position is None:
            entry = _entry(key)
            end = self._used + len(entry)
            if end > self._capacity:
                self._grow(end)
            self._map[self._used : end] = entry
            self._used = end
            # Only now may a reader, which trusts this count, see the entry.
            self._map[0:4] = _USED.pack(end)
            position = self._positions[key] = end - _VALUE.size
        return position

    def read(self, position: int) -> tuple[float, float]:
        """Return the value and timestamp at a slot."""
        value, timestamp = _VALUE.unpack_from(self._map, position)
        return value, timestamp

    def write(self, position: int, value: float, timestamp: float) -> None:
        """Write a value and timestamp at a slot (its pages are reserved: this cannot fail)."""
        # One slice assignment, as prometheus_client does: a reader never sees a half write.
        self._map[position : position + _VALUE.size] = _VALUE.pack(value, timestamp)

    def close(self) -> None:
        """Unmap the file."""
        self._map.close()

    def _grow(self, needed: int) -> None:
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        # On ENOSPC the file keeps its size and the old map stays in use.
        with open(self.path, "r+b") as file:
            os.posix_fallocate(file.fileno(), self._capacity, capacity - self._capacity)
            bigger = mmap.mmap(file.fileno(), capacity)
        self._map.close()
        self._map, self._capacity = bigger, capacity


def _create(path: str) -> BinaryIO:
    """Create a reserved, initialised file at path and return it, open.

    It is made under another name and renamed when whole, so a scrape never globs an empty
    or half-made file (which would break MultiProcessCollector's merge); on failure the
    other name is removed.
    """
    part = path + ".part"
    file = open(part, "w+b")  # noqa: SIM115 - returned open
    try:
        os.posix_fallocate(file.fileno(), 0, INITIAL_SIZE)
        os.pwrite(file.fileno(), _USED.pack(_HEADER), 0)
        os.rename(part, path)
    except OSError:
        file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    return file


def _entry(key: str) -> bytes:
    encoded = key.encode()
    # Always some padding, to the next multiple of 8 after the length: prometheus_client's rule.
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return struct.pack(f"i{len(padded)}sdd", len(encoded), padded, 0.0, 0.0)


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
        self.lock = threading.Lock()
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
        with self.lock:
            self._follow_fork()
            self._values.append(value)
            if value.name == self.failure_counter:
                self._failures = value
                value.value, self._uncounted = self._uncounted, 0
            self._start(value)

    def write(self, value: MetricValue, amount: float, timestamp: float, increment: bool) -> None:
        """Add amount to a value, or set it; write it to its slot if it has one."""
        with self.lock:
            self._follow_fork()
            value.value = value.value + amount if increment else amount
            value.timestamp = timestamp
            self._store(value)
            if self._waiting and time.monotonic() >= self._retry_at:
                self._retry()

    def read(self, value: MetricValue) -> float:
        """Return a value."""
        with self.lock:
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
