"""The runners' slot table: a few words per runner, in memory that every process of a server maps.

The master creates it (an anonymous memfd: no file in /dev/shm, gone with the last process
holding it, even after a SIGKILL), workers inherit it across the fork, runners get its file
descriptor. Each word has one writer:
- the master: a runner's incarnation (one more at each start) and whether it runs;
- the runner: its catalogue's generation (one more at each change), the images it holds, and
  whether its start loaded the models (the master waits for that before it binds the port).

A worker compares the table with what it saw last at the start of every request: a change
means a runner started, stopped or changed what it serves, and the worker asks again.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

# Where the master tells its workers and runners which table and server are theirs.
SERVER_ENV = "CNN_SERVING_SERVER_ID"
SLOTS_FD_ENV = "CNN_SERVING_SLOTS_FD"
SLOTS_COUNT_ENV = "CNN_SERVING_SLOTS_COUNT"
# And which runner a runner is, and the pipe whose EOF says the master has gone.
RUNNER_INDEX_ENV = "CNN_SERVING_RUNNER_INDEX"
PARENT_FD_ENV = "CNN_SERVING_PARENT_FD"
# Set for a runner's first start, whose verdict decides whether the server starts at all.
FIRST_START_ENV = "CNN_SERVING_FIRST_START"

INCARNATION, RUNNING, GENERATION, HELD, VERDICT = range(5)
_WORDS = 5  # per runner, each a uint64
# A start's verdict: not yet, its models serve, or they could not be loaded.
PENDING, LOADED, FAILED = range(3)


class SlotTable:
    """The slots of `count` runners, mapped from the memfd `fd`."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd = fd
        self.count = count
        self._map = mmap.mmap(fd, count * _WORDS * 8)
        self.words = np.ndarray((count, _WORDS), dtype=np.uint64, buffer=self._map)

    @classmethod
    def create(cls, count: int) -> SlotTable:
        """Make a zeroed table for `count` runners, in a memfd children can inherit."""
        fd = os.memfd_create("cnn-serving-runners", 0)
        os.set_inheritable(fd, True)  # the runners, exec'd, map it too
        os.ftruncate(fd, count * _WORDS * 8)
        return cls(fd, count)

    @classmethod
    def inherited(cls) -> SlotTable:
        """Map the table the master named in this process's environment."""
        return cls(int(os.environ[SLOTS_FD_ENV]), int(os.environ[SLOTS_COUNT_ENV]))

    def environment(self, server_id: str) -> dict[str, str]:
        """Return the variables that name this table and its server to a child process."""
        return {SERVER_ENV: server_id, SLOTS_FD_ENV: str(self.fd), SLOTS_COUNT_ENV: str(self.count)}

    def snapshot(self) -> bytes:
        """Return what tells runners' starts, stops and catalogue changes apart."""
        return self.words[:, :HELD].tobytes()

    def incarnation(self, index: int) -> int:
        """Return how many times runner `index` has been started."""
        return int(self.words[index, INCARNATION])

    def running(self, index: int) -> bool:
        """Tell whether runner `index` runs now."""
        return bool(self.words[index, RUNNING])

    def held(self, index: int) -> int:
        """Return the images runner `index` holds: queued, or in a batch running."""
        return int(self.words[index, HELD])

    def verdict(self, index: int) -> int:
        """Return whether runner `index`'s last start loaded its models: PENDING, LOADED, FAILED."""
        return int(self.words[index, VERDICT])

    def started(self, index: int) -> None:
        """Record (in the master) that runner `index` has been started once more."""
        self.words[index, VERDICT] = PENDING
        self.words[index, INCARNATION] += 1
        self.words[index, RUNNING] = 1

    def judged(self, index: int, loaded: bool) -> None:
        """Record (in runner `index`) whether its start loaded its models."""
        self.words[index, VERDICT] = LOADED if loaded else FAILED

    def stopped(self, index: int) -> None:
        """Record (in the master) that runner `index` has stopped."""
        self.words[index, RUNNING] = 0
        self.words[index, HELD] = 0

    def changed(self, index: int) -> None:
        """Record (in runner `index`) that its catalogue has changed."""
        self.words[index, GENERATION] += 1

    def set_held(self, index: int, images: int) -> None:
        """Record (in runner `index`) how many images it holds."""
        self.words[index, HELD] = images
