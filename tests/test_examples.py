"""Examples that run: every shell and Python block of the README and the docs runs against a
real server, or says why it cannot run here; so no example can go stale unnoticed.

The blocks are read by tests/doc_examples.py (what a page's annotations mean is written
there). One server serves them all, as `make run` serves the demo: `cnn-serve` on a model
folder named `shapes` holding version 1 of a 4-class CNN (circle, square, triangle, cross),
with `MODEL_DIR=models/shapes`, HTTP and gRPC on free loopback ports, and `MODEL_POLL_S=1`
so that the roll-out example's new version is picked up in a second or two, not ten.

Each example runs in a copy of the repository's root: a folder of links to every top-level
entry of the repository (so `examples/circle.png` and the rest are where the docs say) but
with a `models/` of its own holding that model, so that a roll-out or roll-back example
changes the test's models and never the checkout's. The one rewrite is the port:
`localhost:8080` and `127.0.0.1:8080` (and `:8081`, gRPC) become the server's ports; any other
mention of 8080 or 8081 in an example fails the test, as an example that would reach
whatever listens there. Shell blocks run with `bash -euo pipefail`, the venv's bin first on
PATH; Python blocks with this interpreter, the venv's.

An example passes if it exits 0, and for an example that calls curl, only if every HTTP
answer was 2xx: curl is wrapped in a shell function that adds `--fail-with-body` (curl exits
22 on a 4xx or 5xx, after writing the error's body, which the failure shows), unless the
example passes `-f` itself. The Python examples fail on an error by themselves (tritonclient
raises, and `requests(...).json()["predictions"]` has no such key in an error's body). After
each example the model folder must be as it was: one that rolls out a version must roll it
back.

Blocks that are not examples are checked for what they can be: every `json` block parses,
and one marked as the output of a command has the form of that command's real answer (the
same keys, list lengths and strings; numbers, and which class is on top, may differ: the
tests' model is untrained); every `promql` block's queries parse with promtool and select
only metrics and labels the server exports; `text` blocks (a diagram, a folder layout, an
error message) are read by people only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Server, free_port, make_cnn, start_server, write_model
from tests.doc_examples import (
    CURL_FAILS_ON_ERROR,
    NOT_RUN,
    PYTHON,
    RUNNABLE,
    Block,
    all_blocks,
    blocks,
    local_ports,
    shell_script,
    structure_differences,
)
from tests.test_dashboard import check_rules, label_names, metric_names

DEMO_LABELS = ["circle", "square", "triangle", "cross"]
BLOCKS = all_blocks()
EXAMPLES = [block for block in BLOCKS if block.runnable]
EXAMPLE_TIMEOUT_S = 180  # the roll-out example trains a (small) model
DOCUMENTED_PORT = re.compile(r"(?<![\w.])808[01](?!\d)")


# -- the blocks themselves ------------------------------------------------------------------


def test_every_block_names_a_language_this_test_knows() -> None:
    unknown = [
        f"{b.where} {b.language or '(none)'}"
        for b in BLOCKS
        if b.language not in RUNNABLE | NOT_RUN
    ]
    assert not unknown, f"name the block's language ({sorted(RUNNABLE | NOT_RUN)}): {unknown}"


def test_every_example_not_run_says_why() -> None:
    not_run = [block for block in BLOCKS if block.not_run is not None]
    print(f"\n{len(EXAMPLES)} examples run; {len(not_run)} not run here:")
    for block in not_run:
        print(f"  {block.where}: {block.not_run}")
    assert all(block.not_run for block in not_run), "a not-run mark without its reason"
    misplaced = [b.where for b in not_run if b.language not in RUNNABLE]
    assert not misplaced, f"not-run marks a block that is no example: {misplaced}"
    outputs = [b.where for b in BLOCKS if b.output_of is not None and b.language != "json"]
    assert not outputs, f"output-of marks a block that is not json: {outputs}"


def test_the_roll_out_and_roll_back_examples_run() -> None:
    rolls = [b for b in EXAMPLES if "rm -r models/shapes/" in b.code and "cnn-train" in b.code]
    assert [b.where.split(":")[0] for b in rolls] == ["docs/models.md"]


def test_json_and_yaml_blocks_parse() -> None:
    for block in BLOCKS:
        if block.language == "json":
            json.loads(block.code)
        elif block.language == "yaml":
            yaml.safe_load(block.code)


# -- the server the examples call ----------------------------------------------------------


@dataclass
class Served:
    """The examples' server, and the folder they run in."""

    server: Server
    http_port: int
    grpc_port: int
    workdir: Path

    @property
    def model(self) -> Path:
        return self.workdir / "models" / "shapes"

    def listing(self) -> list[str]:
        """Return the model folder's files, relative to it."""
        return sorted(str(path.relative_to(self.model)) for path in self.model.rglob("*"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Start the demo's server on a copy of the repository root with a model of its own."""
    workdir = tmp_path_factory.mktemp("repository")
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name != "models":
            (workdir / entry.name).symlink_to(entry)
    write_model(workdir / "models" / "shapes" / "1", make_cnn(classes=4), DEMO_LABELS)
    grpc_port = free_port()
    server = start_server(
        workdir / "models" / "shapes",
        tmp_path_factory.mktemp("logs"),
        GRPC_PORT=str(grpc_port),
        MODEL_POLL_S="1",
    )
    try:
        http_port = int(server.url.rsplit(":", 1)[1])
        yield Served(server, http_port, grpc_port, workdir)
    finally:
        server.stop()


def run_block(served: Served, block: Block, code: str | None = None) -> subprocess.CompletedProcess:
    """Run a block (or a command standing in for one) as tests/test_examples.py says."""
    code = local_ports(code or shell_script(block), served.http_port, served.grpc_port)
    leftover = DOCUMENTED_PORT.search(code)
    assert leftover is None, f"{block.where}: port {leftover[0]} other than in localhost:PORT"
    bin_folder = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_folder, os.environ.get("PATH", "")])}
    if block.language in PYTHON:
        script = served.workdir.parent / f"example-{block.page.stem}-{block.line}.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", CURL_FAILS_ON_ERROR + code]
    return subprocess.run(
        command,
        cwd=served.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )


def restore(served: Served, before: list[str]) -> None:
    """Put the model folder back as it was, and wait until version 1 alone serves."""
    for path in sorted(served.model.iterdir(), reverse=True):
        if path.name not in {p.split("/")[0] for p in before}:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = requests.get(f"{served.server.url}/v2/models/shapes", timeout=5)
        if answer.status_code == 200 and answer.json()["versions"] == ["1"]:
            return
        time.sleep(0.5)


# -- the examples ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("block", EXAMPLES, ids=[block.where for block in EXAMPLES])
def test_example_runs(served: Served, block: Block) -> None:
    before = served.listing()
    result = run_block(served, block)
    after = served.listing()
    if after != before:
        restore(served, before)
    assert result.returncode == 0, (
        f"{block.where} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
        f"\n--- stderr\n{result.stderr[-4000:]}\n--- server log\n{served.server.log()[-3000:]}"
    )
    assert after == before, f"{block.where} left the model folder changed: {before} -> {after}"


@pytest.mark.slow
def test_output_examples_have_the_form_of_the_real_answer(served: Served) -> None:
    outputs = [block for block in BLOCKS if block.output_of is not None]
    assert outputs, "no output example to compare"
    for block in outputs:
        result = run_block(served, block, block.output_of)
        assert result.returncode == 0, f"{block.where}: {block.output_of}\n{result.stderr}"
        differences = structure_differences(
            json.loads(block.code), json.loads(result.stdout), set(DEMO_LABELS)
        )
        assert not differences, f"{block.where} shows another answer: {differences}"


@pytest.mark.slow
def test_promql_queries_parse_and_select_what_the_server_exports(
    served: Served, tmp_path: Path
) -> None:
    queries = [
        (block.where, query.strip())
        for block in BLOCKS
        if block.language == "promql"
        for query in re.split(r"\n\s*\n", block.code)
        if query.strip()
    ]
    assert queries, "no promql block"
    result = check_rules([query for _, query in queries], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Traffic first, so that every labelled series exists: an answer of the untrained model
    # is also a low-confidence one.
    with open(ROOT / "examples" / "circle.png", "rb") as image:
        predicted = requests.post(f"{served.server.url}/predict", files={"image": image})
    assert predicted.status_code == 200, predicted.text
    exposition = requests.get(f"{served.server.url}/metrics", timeout=10).text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    missing = {}
    for where, query in queries:
        names = metric_names(query)
        known = set().union(*(labels.get(name, set()) for name in names))
        absent = {name for name in names if name not in labels} | (label_names(query) - known)
        if absent:
            missing[f"{where} {query[:60]}"] = absent
    assert not missing, f"queries that select what the server does not export: {missing}"


# -- what the checks catch -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("curl -s -F image=@examples/circle.png 'localhost:8080/predict?topk=2'", 22),
        ("curl -s -F image=@examples/circle.png 'localhost:8080/predict?topk=2' | cat", 22),
        ("curl -fsS -o /dev/null localhost:8080/v2/models/shapes/versions/9/ready", 22),
        ("curl -s localhost:8080/v2/health/ready && curl -sf localhost:8080/absent", 22),
    ],
    ids=["error-status", "pipeline", "own-fail", "second-call"],
)
def test_a_failing_example_fails(served: Served, code: str, status: int) -> None:
    block = Block(ROOT / "README.md", 1, "sh", code + "\n")
    assert run_block(served, block).returncode == status


@pytest.mark.slow
def test_a_failing_python_example_fails(served: Served) -> None:
    code = (
        "import tritonclient.http as httpclient\n"
        'httpclient.InferenceServerClient("localhost:8080").get_model_metadata("absent")\n'
    )
    result = run_block(served, Block(ROOT / "README.md", 1, "python", code))
    assert result.returncode == 1 and "absent" in result.stderr


def test_an_example_on_another_port_is_refused() -> None:
    with pytest.raises(ValueError, match="localhost:9090"):
        local_ports("curl localhost:9090/metrics", 1, 2)
    assert local_ports("curl http://127.0.0.1:8080/ localhost:8081", 5, 6) == (
        "curl http://127.0.0.1:5/ localhost:6"
    )


def test_an_annotation_must_stand_right_before_its_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- not-run: a cluster -->\n\n```sh\nkubectl get pods\n```\n")
    [block] = blocks(page)
    assert block.not_run == "a cluster" and not block.runnable
    page.write_text("<!-- not-run: a cluster -->\n\ntext\n\n```sh\nkubectl get pods\n```\n")
    with pytest.raises(ValueError, match="not directly before a block"):
        blocks(page)
    page.write_text("```sh\ncurl localhost:8080/\n")
    with pytest.raises(ValueError, match="never closed"):
        blocks(page)


def test_an_output_example_of_another_form_is_found() -> None:
    shown = {"classes": ["circle", "square", "triangle"], "predictions": [{"probability": 0.9}]}
    real = {"classes": DEMO_LABELS, "predictions": [{"probability": 0.3, "top": []}]}
    assert structure_differences(shown, real, set(DEMO_LABELS)) == [
        ".classes: 3 items shown, 4 answered",
        ".predictions[0]: keys ['probability'] shown, ['probability', 'top'] answered",
    ]
    assert structure_differences({"label": "circle"}, {"label": "cross"}, set(DEMO_LABELS)) == []
    assert structure_differences({"v": "1"}, {"v": 1}, set()) == [".v: '1' shown, 1 answered"]
