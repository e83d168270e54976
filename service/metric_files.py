"""A metric file in prometheus_client's layout whose every byte is reserved.

prometheus_client creates and grows its per-process files (counter_<pid>.db, ...) with
truncate, leaving them sparse: a value written through the mmap then needs a page the folder
may no longer have, and on a full tmpfs the process dies of SIGBUS. A MetricFile reserves
its bytes with posix_fallocate before it maps them, so a full folder is an OSError when a
file is made or grown, never a fault later. The layout and names are prometheus_client's:
its MultiProcessCollector and mark_process_dead read and remove these files unchanged.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from typing import BinaryIO

from prometheus_client.mmap_dict import MmapedDict

# Files start at one page and double: ours hold a few hundred bytes to ~100 KB.
INITIAL_SIZE = mmap.PAGESIZE
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
