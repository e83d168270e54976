"""Gunicorn settings for cnn-serve; each setting says why it has its value.

Loaded by gunicorn in the master process, which never imports a model runtime: the models
live in the runners (service.runner), which the master starts and restarts
(service.supervisor); the workers it forks read and decode requests and send the tensors
to the runners over the channel (service.channel).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from service import logs
from service.settings import GRACEFUL_MARGIN_S, Settings
from service.supervisor import Supervisor

_settings = Settings.from_env()
logs.configure(_settings.log_level)

# prometheus_client's multiprocess mode needs a folder shared by all workers and runners, set
# before any of them imports prometheus_client.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cnn-serving-metrics-")
_metrics_folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
_metrics_folder.mkdir(parents=True, exist_ok=True)
# Only the metric files a previous run left (and any a killed process left half-made): the
# folder may be a mount point, or shared.
for _stale in [*_metrics_folder.glob("*.db"), *_metrics_folder.glob("*.db.part")]:
    _stale.unlink(missing_ok=True)
# The file the runners take turns on to load a new version (service/runner/reloader.py).
os.environ.setdefault("CNN_SERVING_LOAD_LOCK", str(_metrics_folder / "load.lock"))

# Before any gunicorn line, and before the port is bound: the runners load the models, and
# one that cannot stops start-up here, having said why in one line.
_runners = Supervisor(_settings)
if not _runners.start_and_wait():
    sys.exit(1)

# IPv6 literals need brackets in a bind address.
bind = (
    f"[{_settings.host}]:{_settings.port}"
    if ":" in _settings.host
    else (f"{_settings.host}:{_settings.port}")
)
# One process per usable core: each has its own GIL, so parsing and decoding spread over the
# cores, and every one of them feeds the same runners, whose batches see all the traffic.
workers = _settings.worker_count
# gthread, whose event loop reads each request whole before a request thread gets it, so
# slow clients cannot hold the threads (service/frontend/worker.py). The threads decode uploads in
# parallel and wait on the runners; Pillow and ZeroMQ release the GIL.
worker_class = "service.frontend.worker.ArrivalWorker"
threads = _settings.threads
# The app is built in each worker after the fork: its ZeroMQ sockets are not fork-safe.
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


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Tell the workers to come where the runners are; make SIGHUP a model rescan in every
    runner rather than gunicorn's restart of the workers; on SIGTERM, have the gRPC front end
    drain beside the workers."""

    def rescan_models() -> None:
        server.log.info("SIGHUP: every runner rescans its models now")
        _runners.signal_runners(signal.SIGHUP)

    stop_gracefully = server.handle_term

    def drain_everywhere() -> None:
        _runners.drain_frontends()
        stop_gracefully()

    server.handle_hup = rescan_models
    server.handle_term = drain_everywhere
    # Every worker forked from here on finds the runners through these.
    os.environ.update(_runners.environment())


def on_exit(server: object) -> None:
    """Once the workers and the gRPC front end have stopped (each drained, then answered
    everything it accepted, through the runners), stop the runners."""
    _runners.stop_frontends(timeout=_settings.graceful_timeout_s)
    _runners.stop(timeout=GRACEFUL_MARGIN_S)


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

    from service.frontend.raw_errors import write_server_error

    util.write_error = write_server_error


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    """Accept connections only once the runners serve; on SIGTERM, drain, then stop.

    Gating the accept loop on the runners means the kernel hands connections only to workers
    that know what is served: a worker that is starting never answers 503 to a request a
    sibling could serve. Heartbeats go on meanwhile, or the master kills it.
    """
    catalogue = worker.wsgi.extensions["catalogue"]
    while not catalogue.wait_started(timeout=1.0):
        worker.notify()

    def drain_then_exit(signum: int, frame: object) -> None:
        if not catalogue.drain():
            return  # a repeated SIGTERM changes nothing
        timer = threading.Timer(_settings.drain_s, stop_accepting, (signum, frame))
        timer.daemon = True
        timer.start()

    def stop_accepting(signum: int, frame: object) -> None:
        worker.log.info("drain over: accepting no more connections, finishing accepted ones")
        worker.handle_exit(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)


def worker_exit(server: object, worker) -> None:  # type: ignore[no-untyped-def]
    """Stop following the runners: every accepted request has been answered by now."""
    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        wsgi.extensions["catalogue"].close()


def child_exit(server: object, worker) -> None:  # type: ignore[no-untyped-def]
    """Drop a dead worker's live gauges from the shared metric files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
