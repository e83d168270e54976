"""The runners and the gRPC front end, started, watched and restarted by gunicorn's master.

Each is a fresh interpreter (`python -m service.runner`, `python -m service.frontend.grpc`),
so the master never imports a model runtime or gRPC, and nothing forked carries one. The
master binds the HTTP port only once every runner's first start has loaded its models and
the gRPC front end has bound its port; a model that cannot be loaded, or a gRPC port that
cannot be bound, stops the server there, with one line from the child. A child that ends
later is restarted after a wait that doubles with each start that failed (0.5 s up to 30 s),
a runner's requests in flight having already been answered 503; a start that lasted a
minute resets the wait. The children read EOF on a pipe once the master is gone, however it
went, and exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass

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
# A child that ran this long before it ended was started well: its restart waits the least.
STEADY_S = 60.0
# Where a front end finds the pipe on which it says that its port is bound.
BOUND_FD_ENV = "CNN_SERVING_BOUND_FD"
# The `runner` label of the gRPC front end in the restart counter and its log lines.
GRPC = "grpc"


@dataclass
class Child:
    """One supervised process: a runner (its slot `index`) or the gRPC front end."""

    name: str
    module: str
    index: int | None = None
    pid: int = 0
    # A front end's pipe, and what it said on it: b"1" bound, b"0" not (b"": nothing yet).
    bound_fd: int = -1
    said: bytes = b""
    # Told to stop for good: its end is not a failure to restart.
    stopping: bool = False

    def hear(self, timeout: float) -> bytes:
        """Return what the front end has said of its port, waiting up to `timeout`."""
        waiting = not self.said and self.bound_fd >= 0
        if waiting and select.select([self.bound_fd], [], [], timeout)[0]:
            self.said = os.read(self.bound_fd, 1) or b"0"
        return self.said


class Supervisor:
    """Starts `settings.runner_count` runners (and, with GRPC_PORT, the gRPC front end) and
    keeps them running until `stop`."""

    def __init__(self, settings: Settings) -> None:
        """Make the slot table the workers and runners will share; start nothing yet."""
        self.settings = settings
        self.count = settings.runner_count
        self.slots = SlotTable.create(self.count)
        self.server_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.runners = [Child(f"runner {i}", "service.runner", i) for i in range(self.count)]
        self.frontends = []
        if settings.grpc_port:
            self.frontends.append(Child("the gRPC front end", "service.frontend.grpc"))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchers: dict[str, threading.Thread] = {}
        self._parent_read, self._parent_write = os.pipe()
        os.set_inheritable(self._parent_read, True)
        self._gpus = visible_gpus()

    def environment(self) -> dict[str, str]:
        """Return what a worker needs in its environment to reach the runners."""
        return self.slots.environment(self.server_id)

    def start_and_wait(self) -> bool:
        """Start every runner and wait until each has loaded its models, then the front ends
        until each has bound its port; False if one could not (it has said why in one
        line), and then none is left running."""
        self._start(self.runners)
        while True:
            verdicts = [self.slots.verdict(i) for i in range(self.count)]
            if all(verdict == LOADED for verdict in verdicts):
                break
            if self._ended(self.runners) or any(v not in (PENDING, LOADED) for v in verdicts):
                self.stop(timeout=LONGEST_WAIT_S)
                return False
            time.sleep(0.02)
        self._start(self.frontends)
        for child in self.frontends:
            while child.hear(0.02) != b"1":
                if child.said or self._ended([child]):
                    self.stop(timeout=LONGEST_WAIT_S)
                    return False
        return True

    def signal_runners(self, signum: int) -> None:
        """Send `signum` to every runner (SIGHUP: rescan the models)."""
        _signal(self.pids(self.runners), signum)

    def drain_frontends(self) -> None:
        """SIGTERM the front ends, which drain and answer what they accepted, then end."""
        for child in self.frontends:
            child.stopping = True
        _signal(self.pids(self.frontends), signal.SIGTERM)

    def stop_frontends(self, timeout: float) -> None:
        """Drain the front ends (if not yet told to) and wait for them to end."""
        self._stop(self.frontends, timeout)

    def stop(self, timeout: float) -> None:
        """SIGTERM every child, which answers what it holds, and wait for them to end."""
        self._stop(self.frontends, timeout)
        self._stop(self.runners, timeout)

    def pids(self, children: list[Child] | None = None) -> list[int]:
        """Return the process ids of the children (all, or those given) running now."""
        with self._lock:
            every = self.runners + self.frontends if children is None else children
            return [child.pid for child in every if child.pid]

    def _start(self, children: list[Child]) -> None:
        for child in children:
            watcher = threading.Thread(
                target=self._keep_running, args=(child,), name=child.name, daemon=True
            )
            watcher.start()
            self._watchers[child.name] = watcher

    def _ended(self, children: list[Child]) -> bool:
        return any(not self._watchers[child.name].is_alive() for child in children)

    def _stop(self, children: list[Child], timeout: float) -> None:
        self._stopping.set()
        for child in children:
            child.stopping = True
        _signal(self.pids(children), signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.name in self._watchers:
                self._watchers[child.name].join(max(0.0, deadline - time.monotonic()))
        _signal(self.pids(children), signal.SIGKILL)

    def _keep_running(self, child: Child) -> None:
        wait_s = FIRST_WAIT_S
        first = True
        while not self._stopping.is_set():
            started = time.monotonic()
            pid = self._spawn(child, first)
            code = _wait(pid)
            with self._lock:
                child.pid = 0
            loaded = self._ended_start(child)
            _forget_metrics(pid)
            if self._stopping.is_set() or child.stopping:
                return
            if first and not loaded:
                if loaded is None:  # it ended before it could say why
                    line = f"cnn-serve: error: {child.name} {_ended(code)} while starting"
                    print(line, file=sys.stderr)
                return  # the server does not start
            first = False
            if time.monotonic() - started >= STEADY_S:
                wait_s = FIRST_WAIT_S
            log.error(
                "%s (pid %d) %s; restarting it in %.1f s",
                child.name,
                pid,
                _ended(code),
                wait_s,
                extra={"runner": child.index if child.index is not None else GRPC},
            )
            if self._stopping.wait(wait_s):
                return
            wait_s = min(wait_s * 2, LONGEST_WAIT_S)
            _count_restart(child)

    def _ended_start(self, child: Child) -> bool | None:
        """Record that `child` ended; return whether its start had succeeded (None: it never
        said either way)."""
        if child.index is None:
            said = child.hear(0)
            os.close(child.bound_fd)
            child.bound_fd, child.said = -1, b""
            return {b"1": True, b"0": False}.get(said)
        verdict = self.slots.verdict(child.index)
        self.slots.stopped(child.index)
        return {LOADED: True, PENDING: None}.get(verdict, False)

    def _spawn(self, child: Child, first: bool) -> int:
        environment = {
            **os.environ,
            **self.environment(),
            PARENT_FD_ENV: str(self._parent_read),
        }
        if first:
            environment[FIRST_START_ENV] = "1"
        bound_write = -1
        if child.index is None:
            child.bound_fd, bound_write = os.pipe()
            os.set_inheritable(bound_write, True)
            environment[BOUND_FD_ENV] = str(bound_write)
        else:
            environment[RUNNER_INDEX_ENV] = str(child.index)
            if self._gpus and not self.settings.runners:
                # One runner per GPU, each seeing its own card alone.
                environment["CUDA_VISIBLE_DEVICES"] = self._gpus[child.index]
        # posix_spawn, not subprocess: its exec-error pipe, inherited by a worker gunicorn
        # forks meanwhile, would block this thread for as long as that worker lives.
        command = [sys.executable, "-m", child.module]
        with self._lock:
            pid = os.posix_spawn(sys.executable, command, environment)
            if child.index is not None:
                self.slots.started(child.index)
            child.pid = pid
        if bound_write >= 0:
            os.close(bound_write)
        return pid


def exit_with_parent() -> None:
    """End this child when the master ends, even by SIGKILL: its pipe reads EOF then."""
    fd = int(os.environ[PARENT_FD_ENV])

    def watch() -> None:
        while os.read(fd, 1):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def say_bound(bound: bool) -> None:
    """Tell the master (from a front end) whether its port is bound: if not, the front end
    has said why in one line."""
    fd = int(os.environ.pop(BOUND_FD_ENV))
    os.write(fd, b"1" if bound else b"0")
    os.close(fd)


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


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _count_restart(child: Child) -> None:
    from service import metrics

    runner = str(child.index) if child.index is not None else GRPC
    metrics.RUNNER_RESTARTS.labels(runner).inc()
