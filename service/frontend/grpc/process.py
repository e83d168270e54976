"""The gRPC front end's process: its server, its limits, its start and its drain.

Started by gunicorn's master (service/supervisor.py) once the runners serve, it binds
GRPC_PORT and says so, or says in one line why not and stops the server's start-up. On
SIGTERM it drains as an HTTP worker does: health says NOT_SERVING for DRAIN_S while calls
are still answered, then it takes no new call and answers those it holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_reflection.v1alpha import reflection

from service import logs
from service.channel.client import RunnerClient
from service.channel.slots import FIRST_START_ENV, SERVER_ENV, SlotTable
from service.frontend.catalogue import Catalogue
from service.frontend.grpc.health import SERVICE as HEALTH
from service.frontend.grpc.health import HealthService
from service.frontend.grpc.inference import SERVICE as INFERENCE
from service.frontend.grpc.inference import InferenceService
from service.frontend.versions import RemoteVersion
from service.registry import Models
from service.settings import Settings
from service.supervisor import exit_with_parent, say_bound

log = logging.getLogger(__name__)

# Why each limit has its value. A message over MAX_BODY_BYTES is refused by grpcio itself
# (RESOURCE_EXHAUSTED), before a thread or the runner sees it; an answer is small.
# Calls in the server at once, over all connections: four times MAX_QUEUE (2,048 by
# default) may wait for a request thread; past that, grpcio refuses a call at once with
# RESOURCE_EXHAUSTED. No cap per connection: grpcio's server answers streams over such a cap
# with RST_STREAM (REFUSED_STREAM), which its own client then fails as UNAVAILABLE.
CALLS_PER_QUEUED_IMAGE = 4
# Idle and slow clients cost a socket and a little memory, never a thread: a call takes a
# request thread only once its whole message has arrived. Dead peers are found by
# pings every 60 s (20 s to answer); a connection idle 5 minutes is closed with GOAWAY; a
# client may ping no more often than every 10 s, nor without calls (as grpc-go's defaults).
OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # One server per port: a second one binding it must fail, not share the traffic.
    ("grpc.so_reuseport", 0),
]


def build(settings: Settings, catalogue: Catalogue, models: Models[RemoteVersion]):
    """Return the gRPC server (not yet bound) and its health service."""
    # The calls' work runs on THREADS request threads, as an HTTP worker's does; each call
    # waits for its whole message in the event loop first, holding none of them.
    threads = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="grpc")
    server = grpc.aio.server(
        options=[
            *OPTIONS,
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", settings.max_body_bytes),
        ],
        maximum_concurrent_rpcs=settings.max_queue * CALLS_PER_QUEUED_IMAGE,
    )
    health = HealthService(catalogue, models)
    inference = InferenceService(settings, catalogue, models)
    for methods in (inference.methods(threads), health.methods(threads)):
        server.add_generic_rpc_handlers((methods.generic_handler(),))
    # grpcurl and Postman list and call the services from the server itself.
    reflection.enable_server_reflection((INFERENCE, HEALTH, reflection.SERVICE_NAME), server)
    return server, health


def main() -> int:
    """Serve gRPC on GRPC_PORT until SIGTERM, then drain and stop."""
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    exit_with_parent()
    client = RunnerClient(os.environ[SERVER_ENV], SlotTable.inherited())
    models: Models[RemoteVersion] = Models(settings.threads)
    catalogue = Catalogue(settings, client, models)
    catalogue.refresh(retry=True)
    catalogue.start()
    try:
        return asyncio.run(_serve(settings, catalogue, models))
    finally:
        catalogue.close()


async def _serve(settings: Settings, catalogue: Catalogue, models: Models[RemoteVersion]) -> int:
    # On the server's first start, nothing but one line reaches stderr if the port cannot
    # be bound (grpcio's core logs its own lines of it).
    quiet = logs.QuietStart() if os.environ.get(FIRST_START_ENV) else None
    server, health = build(settings, catalogue, models)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        line = f"cnn-serve: error: GRPC_PORT: {address} cannot be bound (is it in use?)"
        if quiet is not None:
            quiet.failed(line)
        else:
            log.error(line)
        say_bound(False)
        return 1
    await server.start()
    say_bound(True)
    if quiet is not None:
        quiet.succeeded()
    log.info("gRPC front end listening on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master's SIGHUP is for runners
    await stop.wait()
    catalogue.drain()
    await asyncio.sleep(settings.drain_s)
    health.close()
    log.info("gRPC drain over: taking no more calls, answering those accepted")
    await server.stop(grace=settings.request_lifetime_s)
    return 0
