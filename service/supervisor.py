"""The runners, started, watched and restarted by gunicorn's master.

Each runner is a fresh interpreter (`python -m service.runner`), so the master never imports
a model runtime and nothing forked carries one. The master binds the port only once every
runner's first start has loaded its models; a model that cannot be loaded stops the server
there, with one line from the runner. A runner that ends later is restarted after a wait
that doubles with each start that failed (0.5 s up to 30 s), its workers' requests in flight
having already been answered 503; a start that lasted a minute resets the wait. The runners
read EOF on a pipe once the master is gone, however it went, and exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid

from service.channel.slots import (
    FIRST_START_ENV,
    LOADED,
    PARENT_FD_ENV,
    PENDING,
    RUNNER_INDEX_ENV,
    SlotTable,
)
from service.settings import Settings, visible_gpus

log = logging.getLogger(__name__)

FIRST_WAIT_S = 0.5
LONGEST_WAIT_S = 30.0
# A runner that ran this long before it ended was started well: its restart waits the least.
STEADY_S = 60.0


class Supervisor:
    """Starts `settings.runner_count` runners and keeps them running until `stop`."""

    def __init__(self, settings: Settings) -> None:
        """Make the slot table the workers and runners will share; start nothing yet."""
        self.settings = settings
        self.count = settings.runner_count
        self.slots = SlotTable.create(self.count)
        self.server_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._pids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchers: list[threading.Thread] = []
        self._parent_read, self._parent_write = os.pipe()
        os.set_inheritable(self._parent_read, True)
        self._gpus = visible_gpus()

    def environment(self) -> dict[str, str]:
        """Return what a worker needs in its environment to reach the runners."""
        return self.slots.environment(self.server_id)

    def start_and_wait(self) -> bool:
        """Start every runner and wait until each has loaded its models; False if one could
        not (it has said why in one line), and then none is left running."""
        self.start()
        while True:
            verdicts = [self.slots.verdict(i) for i in range(self.count)]
            if all(verdict == LOADED for verdict in verdicts):
                return True
            ended = any(not watcher.is_alive() for watcher in self._watchers)
            if ended or any(v not in (PENDING, LOADED) for v in verdicts):
                self.stop(timeout=LONGEST_WAIT_S)
                return False
            time.sleep(0.02)

    def start(self) -> None:
        """Start every runner, each watched by a thread that restarts it."""
        for index in range(self.count):
            watcher = threading.Thread(
                target=self._keep_running, args=(index,), name=f"runner-{index}", daemon=True
            )
            watcher.start()
            self._watchers.append(watcher)

    def signal_all(self, signum: int) -> None:
        """Send `signum` to every runner (SIGHUP: rescan the models)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self, timeout: float) -> None:
        """SIGTERM every runner, which answers what it holds, and wait for them to end."""
        self._stopping.set()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))
        self.signal_all(signal.SIGKILL)

    def pids(self) -> list[int]:
        """Return the process ids of the runners running now."""
        with self._lock:
            return list(self._pids.values())

    def _keep_running(self, index: int) -> None:
        wait_s = FIRST_WAIT_S
        first = True
        while not self._stopping.is_set():
            started = time.monotonic()
            pid = self._spawn(index, first)
            code = _wait(pid)
            with self._lock:
                self._pids.pop(index, None)
            verdict = self.slots.verdict(index)
            self.slots.stopped(index)
            _forget_metrics(pid)
            if self._stopping.is_set():
                return
            if first and verdict != LOADED:
                if verdict == PENDING:  # it ended before it could say why
                    line = f"cnn-serve: error: runner {index} {_ended(code)} while loading"
                    print(line, file=sys.stderr)
                return  # the server does not start
            first = False
            if time.monotonic() - started >= STEADY_S:
                wait_s = FIRST_WAIT_S
            log.error(
                "runner %d (pid %d) %s; restarting it in %.1f s",
                index,
                pid,
                _ended(code),
                wait_s,
                extra={"runner": index},
            )
            if self._stopping.wait(wait_s):
                return
            wait_s = min(wait_s * 2, LONGEST_WAIT_S)
            _count_restart(index)

    def _spawn(self, index: int, first: bool) -> int:
        environment = {
            **os.environ,
            **self.environment(),
            RUNNER_INDEX_ENV: str(index),
            PARENT_FD_ENV: str(self._parent_read),
        }
        if first:
            environment[FIRST_START_ENV] = "1"
        if self._gpus and not self.settings.runners:
            # One runner per GPU, each seeing its own card alone.
            environment["CUDA_VISIBLE_DEVICES"] = self._gpus[index]
        # posix_spawn, not subprocess: its exec-error pipe, inherited by a worker gunicorn
        # forks meanwhile, would block this thread for as long as that worker lives.
        command = [sys.executable, "-m", "service.runner"]
        with self._lock:
            pid = os.posix_spawn(sys.executable, command, environment)
            self.slots.started(index)
            self._pids[index] = pid
        return pid


def _wait(pid: int) -> int | None:
    """Wait for child `pid` to end; return its exit code (minus the signal that killed it),
    or None if gunicorn's master, which reaps every child, reaped it first."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def _ended(code: int | None) -> str:
    if code is None:
        return "ended"
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def _forget_metrics(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _count_restart(index: int) -> None:
    from service import metrics

    metrics.RUNNER_RESTARTS.labels(str(index)).inc()
