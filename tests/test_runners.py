"""The runners: one process per device holds the models and batches for every worker.

Real servers on loopback: the workers map no model runtime, runners are killed and fail,
two runners share the work, a version swap is seen by every request at once, and nothing
the server made outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from model_folder.preprocessing import InputSpec
from service.frontend.versions import Upload
from service.settings import Settings
from tests.conftest import (
    LABELS,
    expected_probabilities,
    image_bytes,
    make_cnn,
    run_python,
    write_model,
)
from tests.load import children, post_png, runner_pids, samples, scrape, worker_pids
from tests.test_faults import GREY, in_background, result_of
from tests.test_reload import predict, publish, repository_server, wait_until

pytestmark = pytest.mark.slow

SPEC = InputSpec(32, 32, 3)
# What a process maps once TensorFlow's or JAX's native code is loaded.
RUNTIME_LIBRARIES = ("site-packages/tensorflow/", "site-packages/jaxlib/")


def running(pid: int) -> bool:
    """Tell whether process `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def post_quietly(url: str, data: bytes) -> requests.Response | str:
    """POST an image; return the response, or what went wrong on the connection."""
    try:
        return predict(url, data)
    except requests.RequestException as exc:
        return repr(exc)


def test_importing_the_front_end_leaves_every_model_runtime_out():
    modules = (
        "service.frontend.app",
        "service.frontend.worker",
        "service.frontend.catalogue",
        "service.channel.client",
        "service.supervisor",
        "service.frontend.http.v2",
        "service.frontend.http.tfserving",
    )
    script = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted(m for m in ('tensorflow', 'jax', 'keras') if m in sys.modules))"
    )
    result = run_python(["-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_workers_and_master_map_no_runtime_library_and_the_runner_does(
    server_factory, model_dir, backend
):
    server = server_factory(model_dir, WORKERS="2", KERAS_BACKEND=backend)
    assert post_png(server.url, image_bytes()).status_code == 200
    master = server.process.pid
    workers, runners = worker_pids(master), runner_pids(master)
    assert len(workers) == 2 and len(runners) == 1
    for pid in [master, *workers]:
        mapped = maps(pid)
        assert not [lib for lib in RUNTIME_LIBRARIES if lib in mapped], pid
    library = "site-packages/jaxlib/" if backend == "jax" else "site-packages/tensorflow/"
    assert library in maps(runners[0])


def test_a_runner_killed_under_load_fails_its_requests_at_once_and_is_restarted(fault_server):
    server, control = fault_server(WORKERS="2", REQUEST_TIMEOUT_S="60")
    master = server.process.pid
    workers = worker_pids(master)
    [runner] = runner_pids(master)
    held = in_background(post_quietly, server.url, GREY)
    control.wait_held(1)
    answers: list[requests.Response | str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answers.append(post_quietly(server.url, image_bytes(seed=len(answers))))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # The load waits in the runner's queue behind the held batch: in flight, all of it.
        wait_until(
            lambda: sum(samples(scrape(server.url), "cnn_batch_queue_depth")) >= 4,
            60,
            "the load is queued in the runner",
        )
        killed_at = time.monotonic()
        os.kill(runner, signal.SIGKILL)
        failed = result_of(held, within_s=60)
        # Its deadline was a minute away: it was answered because its runner died.
        assert time.monotonic() - killed_at < 10
        wait_until(lambda: len(answers) >= 4, 10, "the queued load is answered")
        wait_until(lambda: ready(server.url), 120, "a new runner serves")
        restarted = len(answers)
        wait_until(lambda: len(answers) >= restarted + 20, 60, "the load is answered again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
    assert not isinstance(failed, str), failed
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "not_ready"
    assert failed.headers["Retry-After"] == "1"
    for answer in answers:
        assert not isinstance(answer, str), answer
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "not_ready"
    assert [a.status_code for a in answers[:4]] == [503] * 4, "the queued load was failed"
    assert answers[-1].status_code == 200
    assert worker_pids(master) == workers, "the workers were kept"
    assert runner not in runner_pids(master) and len(runner_pids(master)) == 1
    assert samples(scrape(server.url), "cnn_runner_restarts_total", runner="0") == [1.0]


def test_a_runner_that_fails_at_every_start_says_why_and_waits_longer(fault_server):
    server, control = fault_server()
    [runner] = runner_pids(server.process.pid)
    (control.fault_dir / "fail-load").touch()
    os.kill(runner, signal.SIGKILL)
    waits = re.compile(r"runner 0 \(pid \d+\) [^;]*; restarting it in ([\d.]+) s")
    wait_until(lambda: len(waits.findall(server.log())) >= 3, 120, "three failed starts")
    assert [float(w) for w in waits.findall(server.log())][:3] == [0.5, 1.0, 2.0]
    assert server.log().count("injected load failure") >= 2
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    readiness = requests.get(server.url + "/readyz", timeout=5)
    assert readiness.status_code == 503
    refused = post_png(server.url, image_bytes())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    (control.fault_dir / "fail-load").unlink()
    wait_until(lambda: ready(server.url), 120, "the runner starts once its model loads")
    assert post_png(server.url, image_bytes()).status_code == 200


def test_two_runners_share_the_work_and_losing_one_keeps_the_pod_ready(server_factory, model_dir):
    server = server_factory(model_dir, WORKERS="2", RUNNERS="2")
    [row] = requests.get(server.url + "/readyz", timeout=5).json()["models"]
    assert row["runners"] == [0, 1]
    with_runners = [0, 1]
    bursts = [in_background(post_quietly, server.url, image_bytes(seed=i)) for i in range(32)]
    assert all(result_of(box).status_code == 200 for box in bursts)
    text = scrape(server.url)
    for index in with_runners:
        assert sum(samples(text, "cnn_images_predicted_total", runner=str(index))) > 0, index

    readiness: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            readiness.append(requests.get(server.url + "/readyz", timeout=5).status_code)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        os.kill(runner_pids(server.process.pid)[1], signal.SIGKILL)
        wait_until(
            lambda: (
                requests.get(server.url + "/readyz", timeout=5).json()["models"][0]["runners"]
                == [0]
            ),
            30,
            "the workers see one runner",
        )
        for i in range(20):
            answer = post_png(server.url, image_bytes(seed=100 + i))
            assert answer.status_code == 200, answer.text
        wait_until(
            lambda: (
                requests.get(server.url + "/readyz", timeout=5).json()["models"][0]["runners"]
                == [0, 1]
            ),
            120,
            "the second runner is back",
        )
    finally:
        stop.set()
        prober.join(30)
    assert readiness and set(readiness) == {200}


def test_no_request_that_begins_after_the_new_versions_first_answer_gets_the_old_one(
    server_factory, tmp_path
):
    repository = tmp_path / "repo"
    old, new = make_cnn(seed=1), make_cnn(seed=2)
    publish(repository / "shapes", 1, old)
    server = repository_server(server_factory, repository, WORKERS="2", MODEL_POLL_S="0")
    answers: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                began = time.monotonic()
                response = session.post(
                    server.url + "/predict",
                    data=image_bytes(seed=seed),
                    headers={"Content-Type": "image/png"},
                    timeout=30,
                )
                assert response.status_code == 200, response.text
                answers.append((began, time.monotonic(), response.json()["model"]["version"]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answers) >= 50, 60, "the clients are answered")
        publish(repository / "shapes", 2, new)
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: any(a[2] == "2" for a in answers), 120, "version 2 answers")
        count = len(answers)
        wait_until(lambda: len(answers) >= count + 100, 60, "more answers after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    first_new = min(ended for _, ended, version in answers if version == "2")
    late = [a for a in answers if a[2] == "1" and a[0] > first_new]
    assert not late, f"{len(late)} requests began after v2's first answer and got v1"


def test_a_request_that_resolved_a_version_is_answered_by_it_after_its_retirement(tmp_path):
    from service.frontend.app import create_app

    repository = tmp_path / "repo"
    old, new = make_cnn(seed=1), make_cnn(seed=2)
    write_model(repository / "shapes" / "1", old, LABELS)
    settings = Settings(model_repository=str(repository), model_poll_s=0, request_timeout_s=5)
    app = create_app(settings)
    client = app.test_client()
    try:
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "version 1 serves")
        models, catalogue = app.extensions["models"], app.extensions["catalogue"]
        # What a request does before it reads and decodes its upload: it resolves a version.
        resolved = models.acquire("shapes")
        assert resolved.info.version == "1"
        write_model(repository / "shapes" / "2", new, LABELS)
        app.extensions["runner"].manager.sync(force=True)
        catalogue.refresh()
        assert models.find("shapes").info.version == "2"
        states = {s.version: s.state.value for s in models.statuses("shapes")}
        assert states == {"1": "UNLOADING", "2": "AVAILABLE"}
        data = image_bytes()
        [answer] = resolved.predict([Upload("image", data)], time.monotonic() + 5)
        models.release(resolved)
        np.testing.assert_allclose(answer, expected_probabilities(old, data, SPEC), atol=1e-5)
        # Kept for a request's timeout, no longer.
        wait_until(
            lambda: (catalogue.refresh(), models.statuses("shapes")[0].state.value)[1] == "END",
            30,
            "version 1 is unloaded",
        )
    finally:
        app.extensions["runner"].close(timeout=5)


def test_a_worker_killed_mid_request_leaves_the_runner_serving(fault_server):
    server, control = fault_server(WORKERS="1")
    master = server.process.pid
    [worker], [runner] = worker_pids(master), runner_pids(master)
    held = in_background(post_quietly, server.url, GREY)
    control.wait_held(1)
    queued = in_background(post_quietly, server.url, image_bytes())
    time.sleep(0.2)  # it is read and sent to the runner, behind the held batch
    os.kill(worker, signal.SIGKILL)
    control.release(1)  # the runner answers a worker that is gone
    assert isinstance(result_of(held), str) and isinstance(result_of(queued), str)
    wait_until(lambda: ready(server.url), 120, "a new worker serves")
    for i in range(5):
        assert post_png(server.url, image_bytes(seed=i)).status_code == 200
    assert runner_pids(master) == [runner], "the runner went on"


def abstract_sockets(server_id_part: str) -> list[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()
    return [line for line in lines if f"@cnn-serving-{server_id_part}" in line]


def test_nothing_the_server_made_outlives_a_sigkill_of_all_its_processes(server_factory, model_dir):
    shm_before = set(os.listdir("/dev/shm"))
    server = server_factory(model_dir, WORKERS="2")
    assert post_png(server.url, image_bytes()).status_code == 200
    master = server.process.pid
    assert abstract_sockets(f"{master}-"), "the runner's socket is where this test looks"
    tree = [master, *children(master)]
    assert len(tree) == 4
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    server.process.wait(30)
    wait_until(lambda: not any(running(pid) for pid in tree), 30, "all gone")
    assert set(os.listdir("/dev/shm")) - shm_before == set()
    wait_until(lambda: not abstract_sockets(f"{master}-"), 10, "no socket left")


def test_the_runners_and_workers_end_when_the_master_is_killed(server_factory, model_dir):
    server = server_factory(model_dir, WORKERS="2")
    master = server.process.pid
    others = children(master)
    assert len(others) == 3
    os.kill(master, signal.SIGKILL)
    server.process.wait(30)
    wait_until(
        lambda: not any(running(pid) for pid in others),
        60,
        "the workers and the runner ended with their master",
    )
    wait_until(lambda: not abstract_sockets(f"{master}-"), 10, "no socket left")


@pytest.fixture
def waiting_app(model_dir, classifier):
    """Return an app whose batches wait up to 30 s for requests announced on their way."""
    from service.frontend.app import create_app

    settings = Settings(model_dir=str(model_dir), max_batch_delay_ms=30_000, max_batch_size=16)
    app = create_app(settings, classifier)
    yield app
    app.extensions["runner"].close(timeout=5)


def batches(text_labels: dict[str, str]) -> tuple[float, float]:
    from prometheus_client import REGISTRY

    get = REGISTRY.get_sample_value
    return (
        get("cnn_batch_size_sum", text_labels) or 0.0,
        get("cnn_batch_size_count", text_labels) or 0.0,
    )


def test_a_batch_waits_for_a_request_announced_on_its_way_and_runs_with_it(waiting_app):
    served = waiting_app.extensions["models"].find()
    labels = {"model": served.info.name, "version": served.info.version, "runner": "0"}
    pixels = np.zeros((1, *served.info.input_shape), dtype=np.uint8)
    deadline = time.monotonic() + 20
    before = batches(labels)
    # A worker thread decoding an upload has told the runner; its pixels come later.
    announced = served.client.announce(
        0, model=served.info.name, version=served.info.version, deadline=deadline
    )
    assert announced
    other = in_background(served.predict_tensor, pixels, deadline)
    time.sleep(0.5)
    assert "result" not in other, "the batch ran without the announced request"
    [late] = served.client.predict(
        0,
        pixels,
        model=served.info.name,
        version=served.info.version,
        deadline=deadline,
        wait_until=deadline,
        announced=announced,
    )
    [first] = result_of(other)
    np.testing.assert_allclose(first, late)
    after = batches(labels)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1), "one batch of both"


@pytest.mark.parametrize("how", ["withdrawn", "expired"])
def test_an_announced_request_that_never_comes_is_waited_for_no_longer(waiting_app, how):
    served = waiting_app.extensions["models"].find()
    pixels = np.zeros((1, *served.info.input_shape), dtype=np.uint8)
    # Expired: a worker killed while it decoded; its announcement ends at its deadline.
    announced_deadline = time.monotonic() + (0.5 if how == "expired" else 20)
    announced = served.client.announce(
        0, model=served.info.name, version=served.info.version, deadline=announced_deadline
    )
    assert announced
    other = in_background(served.predict_tensor, pixels, time.monotonic() + 10)
    if how == "withdrawn":
        time.sleep(0.2)
        served.client.withdraw(0, announced)  # its upload was not an image
    # Waiting out the 30 s delay would pass the request's 10 s deadline: a 504.
    [answer] = result_of(other, within_s=60)
    assert answer.shape == (len(served.info.labels),)
