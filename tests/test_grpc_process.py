"""The gRPC front end as a process: it binds or stops start-up, maps no model runtime, is
restarted when killed, drains on SIGTERM, and takes the client's deadline, capped."""

from __future__ import annotations

import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import distinct_images, free_port, run_python
from tests.load import grpc_pids, metric, post_png, scrape, wait_for_metric, wait_until_dead
from tests.test_faults import GREY
from tests.test_grpc import image_request
from tests.test_runners import RUNTIME_LIBRARIES

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def stub_of(port: int) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def health_of(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def eventually(predicate, within_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_a_grpc_port_in_use_stops_start_up_with_one_line(tmp_path, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        http_port = free_port()
        result = run_python(
            ["-m", "service"],
            timeout_s=120,
            HOST="127.0.0.1",
            PORT=str(http_port),
            GRPC_PORT=str(grpc_port),
            MODEL_DIR=str(model_dir),
            WORKERS="1",
            LOG_LEVEL="WARNING",
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert (
        line
        == f"cnn-serve: error: GRPC_PORT: 127.0.0.1:{grpc_port} cannot be bound (is it in use?)"
    )


def test_the_grpc_front_end_maps_no_model_runtime(server_factory, model_dir):
    port = free_port()
    server = server_factory(model_dir, GRPC_PORT=str(port))
    [pid] = grpc_pids(server.process.pid)
    mapped = Path(f"/proc/{pid}/maps").read_text()
    for library in RUNTIME_LIBRARIES:
        assert library not in mapped
    assert health_of(port) == SERVING


def test_a_killed_grpc_front_end_is_restarted_and_serves_again(server_factory, model_dir):
    port = free_port()
    server = server_factory(model_dir, GRPC_PORT=str(port))
    [pid] = grpc_pids(server.process.pid)
    signal_sent = time.monotonic()
    import os

    os.kill(pid, signal.SIGKILL)
    wait_until_dead(pid, within_s=30)
    # HTTP goes on meanwhile.
    assert post_png(server.url, distinct_images(1)[0]).status_code == 200
    eventually(lambda: grpc_pids(server.process.pid) not in ([], [pid]), what="a new front end")
    eventually(lambda: _serving(port), what="the new front end serving")
    channel, stub = stub_of(port)
    with channel:
        answer = stub.ModelInfer(image_request(distinct_images(1)), timeout=30)
    assert list(answer.outputs[0].shape) == [1, 3]
    restarts = metric(scrape(server.url), "cnn_runner_restarts_total", runner="grpc")
    assert restarts == 1
    assert time.monotonic() - signal_sent < 60


def _serving(port: int) -> bool:
    try:
        return health_of(port) == SERVING
    except grpc.RpcError:
        return False


def test_sigterm_drains_grpc_and_answers_the_call_it_holds(fault_server):
    port = free_port()
    server, control = fault_server(GRPC_PORT=str(port), DRAIN_S="2", REQUEST_TIMEOUT_S="30")
    channel, stub = stub_of(port)
    with channel:
        held = stub.ModelInfer.future(image_request([GREY]), timeout=60)
        control.wait_held(1)
        server.process.send_signal(signal.SIGTERM)
        # Health says NOT_SERVING while the drain lasts; calls are still answered.
        eventually(lambda: health_of(port) == NOT_SERVING, within_s=10, what="NOT_SERVING")
        assert not held.done()
        control.release(1)
        answer = held.result(60)
        assert list(answer.outputs[0].shape) == [1, 3]
    assert server.process.wait(60) == 0
    assert "restarting it" not in server.log()


def test_the_clients_deadline_is_the_requests_capped_by_request_timeout(fault_server):
    port = free_port()
    server, control = fault_server(GRPC_PORT=str(port), REQUEST_TIMEOUT_S="1")
    channel, stub = stub_of(port)
    with channel, ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_png, server.url, GREY)
        control.wait_held(1)
        queued = image_request(distinct_images(1))
        # No deadline from the client: the server's REQUEST_TIMEOUT_S ends it.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as capped:
            stub.ModelInfer(queued)
        assert capped.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in capped.value.details() or "timed out" in capped.value.details()
        assert time.monotonic() - started < 30
        # A client's shorter deadline is the request's: the server gives up on it too.
        with pytest.raises(grpc.RpcError) as short:
            stub.ModelInfer(queued, timeout=0.3)
        assert short.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_metric(server.url, "cnn_errors_total", 2, code="timeout", protocol="grpc")
        control.release(1)
        assert held.result(60).status_code in (200, 504)
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
