"""Gunicorn settings for cnn-serve; each setting says why it has its value.

Loaded by gunicorn in the master process, which must never import TensorFlow: the model is
loaded by each worker after the fork (TensorFlow is not fork-safe), so no `preload_app`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path

from service.cli import skip_plotting_imports, wait_for_model_check
from service.settings import Settings

_settings = Settings.from_env()
# In the master, so every worker forked from it inherits it.
skip_plotting_imports()
if _settings.keras_backend == "jax":
    # Keras and JAX imported once, here, while the launcher's model check runs beside: every
    # worker forked from this process has them. JAX starts its threads when its backend is
    # first used, in each worker after the fork; TensorFlow's import is not fork-safe, so on
    # it each worker imports its own.
    from service import runtime  # noqa: F401
# Before any gunicorn line, and before the port is bound: a bad model stops start-up here.
wait_for_model_check()

# IPv6 literals need brackets in a bind address.
bind = (
    f"[{_settings.host}]:{_settings.port}"
    if ":" in _settings.host
    else (f"{_settings.host}:{_settings.port}")
)
# One process per core (or per GPU): each holds one model and one batcher, and has its own
# GIL, so parsing, decoding and the batcher's Python work spread over the cores.
workers = _settings.worker_count
# gthread, whose event loop reads each request whole before a request thread gets it, so
# slow clients cannot hold the threads (service/worker.py). The threads decode uploads in
# parallel while the batcher's thread runs the model; Pillow and TensorFlow release the GIL.
worker_class = "service.worker.ArrivalWorker"
threads = _settings.threads
# Load the app (and TensorFlow) in each worker after the fork, never in the master.
preload_app = False
# The worker's main loop heartbeats every second even while its threads wait on the model,
# so a worker silent for this long is stuck and is replaced.
timeout = 30
# After SIGTERM a worker drains for DRAIN_S, then finishes requests already accepted. Their
# own deadline, plus the grace for a batch already running, bounds that; so the master waits
# for the drain, that lifetime and a margin for exiting before it sends SIGKILL.
graceful_timeout = _settings.graceful_timeout_s
# Short keep-alive: clients behind a load balancer reuse connections; idle ones free quickly.
keepalive = 5
# gunicorn's limits on the request line and headers; the worker buffers no more than these.
limit_request_line = 8190
# The control socket (gunicorn >= 25) is for interactive admin; in a container with a
# read-only root filesystem and in parallel test runs it only gets in the way.
control_socket_disable = True
# No access line per request: latency and status per endpoint are in /metrics, errors in the
# JSON log. (Any logconfig would turn gunicorn's access formatting back on for every request.)
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()
# gunicorn's own lines as JSON too, so a log shipper parses one format.
logger_class = "service.logs.GunicornLogger"

# prometheus_client's multiprocess mode needs a folder shared by all workers, set before any
# worker imports prometheus_client.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cnn-serving-metrics-")


# The file the workers take turns on to load a new version (service/reloader.py).
os.environ.setdefault(
    "CNN_SERVING_LOAD_LOCK", os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "load.lock")
)


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Wipe metric files a previous run left, before any worker writes new ones; make SIGHUP
    a model rescan in every worker rather than gunicorn's restart of them all."""

    def rescan_models() -> None:
        server.log.info("SIGHUP: every worker rescans its models now")
        for pid in list(server.WORKERS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    server.handle_hup = rescan_models
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    # Only the metric files (and any a killed worker left half-made): the folder may be a
    # mount point, or shared.
    for stale in [*folder.glob("*.db"), *folder.glob("*.db.part")]:
        stale.unlink(missing_ok=True)


def when_ready(server) -> None:  # type: ignore[no-untyped-def]
    """Turn Nagle's algorithm off on the listeners; start the separate /metrics port if set.

    gunicorn sends a response's headers and body in two writes; with Nagle on, the body
    waits for the client's delayed ACK of the headers. Accepted sockets inherit the option.
    """
    for listener in server.LISTENERS:
        if listener.sock.family in (socket.AF_INET, socket.AF_INET6):
            listener.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _settings.metrics_port:
        # The master merges the workers' metric files; it never imports TensorFlow.
        from service import metrics

        metrics.serve_separately(_settings.host, _settings.metrics_port)


def post_fork(server: object, worker: object) -> None:
    """Have gunicorn write the errors it answers itself in the service's JSON shape."""
    from gunicorn import util

    from service.app import write_server_error

    util.write_error = write_server_error


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    """Accept connections only once the models are warm; on SIGTERM, drain, then stop; on
    SIGHUP, rescan the models.

    Gating the accept loop on the models means the kernel hands connections only to warm
    workers: a worker that is starting, or replaces one that died, never answers 503 to a
    request a sibling could serve. Heartbeats go on meanwhile, or the master kills it.
    """
    manager = worker.wsgi.extensions["model_manager"]
    signal.signal(signal.SIGHUP, lambda signum, frame: manager.reload())
    while not manager.wait_started(timeout=1.0):
        worker.notify()

    def drain_then_exit(signum: int, frame: object) -> None:
        if not manager.drain():
            return  # a repeated SIGTERM changes nothing
        timer = threading.Timer(_settings.drain_s, stop_accepting, (signum, frame))
        timer.daemon = True
        timer.start()

    def stop_accepting(signum: int, frame: object) -> None:
        worker.log.info("drain over: accepting no more connections, finishing accepted ones")
        worker.handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)

    def replace_worker_if_inference_dies() -> None:
        # A dead inference thread never recovers: drain and exit, and the master starts a
        # fresh worker (with fresh models) in this one's place.
        manager.wait_inference_died()
        if not manager.alive:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=replace_worker_if_inference_dies, daemon=True).start()


def worker_exit(server: object, worker) -> None:  # type: ignore[no-untyped-def]
    """Stop the batcher before the worker process ends.

    Every accepted request has been answered by now (gthread waits for them), so nothing
    waits on a batch still running: give it a moment, not a request's lifetime, which the
    master's graceful timeout has no room for.
    """
    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        wsgi.extensions["model_manager"].close(timeout=1.0)


def child_exit(server: object, worker) -> None:  # type: ignore[no-untyped-def]
    """Drop a dead worker's live gauges from the shared metric files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
