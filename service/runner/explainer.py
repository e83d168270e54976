"""Explanations' own lane in a runner: a few threads and a short queue of their own.

A Grad-CAM costs several forward passes' worth of work, with gradients, so explanations
never join the batchers' queues: plain predictions are never queued behind one. At most
EXPLAIN_CONCURRENCY explanations run at once and as many again wait; past that, a request
for one is refused at once (503 with Retry-After), not queued without bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from service.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


class Explainer:
    """Runs explanations on `concurrency` threads, with as many waiting at most."""

    def __init__(self, concurrency: int) -> None:
        """Start no thread yet; allow `concurrency` running and as many waiting."""
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="explain")
        self._slots = threading.BoundedSemaphore(concurrency * 2)

    def submit(self, work: Callable[[], T], deadline: float) -> Future:
        """Run `work` when a thread is free, unless `deadline` has passed by then; raise
        Overloaded at once if too many explanations are running and waiting."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded("too many explanations at once; ask again shortly")

        def run() -> T:
            try:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("the explanation waited past the request's deadline")
                return work()
            finally:
                self._slots.release()

        return self._pool.submit(run)

    def close(self) -> None:
        """Finish what is running and waiting; take no more."""
        self._pool.shutdown(wait=True)
