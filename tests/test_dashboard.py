"""The Grafana dashboard (k8s/monitoring/dashboard.yaml): a ConfigMap for Grafana's dashboard
sidecar whose JSON has the sections issue 23 asks for, whose every query parses (promtool) and
names only metrics and labels that a live server really exports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import (
    MODEL_LABELS,
    distinct_images,
    free_port,
    require_tool,
    start_server,
)
from tests.load import grpc_pids, post_png, scrape, wait_until_dead
from tests.test_grpc import image_request

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "k8s" / "monitoring" / "dashboard.yaml"

# Each section (a row of the dashboard): words its title must hold, the metrics its panels must
# query (any one of each tuple: a histogram may be read by its buckets or its sum and count),
# and a label some query of it must group by.
SECTIONS = {
    "traffic": (
        ("traffic", "errors", "latency", "protocol"),
        (
            ("cnn_http_request_duration_seconds_count",),
            ("cnn_http_request_duration_seconds_bucket",),
            ("cnn_errors_total",),
        ),
        "protocol",
    ),
    "batching": (
        ("batch", "queue", "runner"),
        (
            ("cnn_batch_size_bucket", "cnn_batch_size_sum"),
            ("cnn_batch_queue_depth",),
            ("cnn_runner_restarts_total",),
        ),
        "runner",
    ),
    "model output": (
        ("class", "confidence", "version"),
        (
            ("cnn_predicted_class_total",),
            ("cnn_top1_probability_bucket",),
            ("cnn_low_confidence_total",),
        ),
        "version",
    ),
}

# What each variable stands for when a query is checked: Grafana's own, and the dashboard's
# ($model as a regex that matches any model).
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
DASHBOARD_VARIABLES = {"model": ".*", "datasource": "prometheus"}

STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
MATCHERS = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"\[[^\[\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
# A name not followed by "(" (a function or an aggregation) nor preceded by a digit or a dot
# (as the "e" of 1e-3); after strings, matchers, ranges and groupings are taken out, each one
# that is not a keyword is a metric.
IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*([a-zA-Z_]\w*)\s*\)$")


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects."""
    text = STRING.sub('""', expr)
    text = MATCHERS.sub(" ", text)
    text = RANGE.sub(" ", text)
    text = GROUPING.sub(" ", text)
    return {name for name in IDENTIFIER.findall(text) if name.lower() not in KEYWORDS}


def label_names(expr: str) -> set[str]:
    """Return the label names a PromQL expression matches on or groups by."""
    text = STRING.sub('""', expr)
    found = set()
    for matchers in MATCHERS.findall(text):
        found.update(MATCHER_LABEL.findall(matchers))
    for grouping in GROUPING.findall(text):
        found.update(word.strip() for word in grouping.split(",") if word.strip())
    return found - {"__name__"}


def substitute(expr: str) -> str:
    """Return `expr` with every Grafana variable replaced by a value that stands for it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        known = {**GRAFANA_VARIABLES, **DASHBOARD_VARIABLES}
        assert name in known, f"unknown variable ${name} in {expr!r}"
        return known[name]

    return VARIABLE.sub(value, expr)


def load_config_map() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def load_dashboard() -> dict[str, Any]:
    (text,) = load_config_map()["data"].values()
    return json.loads(text)


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return each target's (panel title and refId, expr)."""
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]


def sections(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Return the panels under each row, by the row's title."""
    found: dict[str, list[dict[str, Any]]] = {}
    title = None
    for panel in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            title = panel["title"]
            assert not panel.get("collapsed") and not panel.get("panels"), title
            found[title] = []
        else:
            assert title is not None, f"{panel['title']} is above the first row"
            found[title].append(panel)
    return found


def check_rules(expressions: Iterable[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """Run `promtool check rules` on a rule file recording each expression."""
    promtool = require_tool("promtool", "Debian package 'prometheus'")
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(expressions)]
    path = folder / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    command = [promtool, "check", "rules", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def unexported(dashboard: dict[str, Any], exposition: str) -> dict[str, set[str]]:
    """Return, by query, the metric names it selects that the exposition has no sample of,
    and the labels it uses that none of its metrics carries."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    queries = list(exprs(dashboard))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["definition"]))
    missing = {}
    for where, expr in queries:
        if where.startswith("$"):
            selector, label = LABEL_VALUES.fullmatch(expr).groups()
            names, used = metric_names(selector), label_names(selector) | {label}
        else:
            names, used = metric_names(expr), label_names(expr)
        known = set().union(*(labels.get(name, set()) for name in names))
        absent = {name for name in names if name not in labels} | (used - known)
        if absent:
            missing[where] = absent
    return missing


# -- the ConfigMap and the dashboard JSON -----------------------------------------------


def test_the_config_map_is_labelled_for_the_grafana_sidecar() -> None:
    config_map = load_config_map()
    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["name"]
    (key,) = config_map["data"]
    assert key.endswith(".json"), "Grafana loads dashboards from .json files"


def test_the_dashboard_json_has_its_sections_and_every_panel_a_query() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    by_row = sections(dashboard)
    for words, wanted, grouping in SECTIONS.values():
        [title] = [t for t in by_row if all(word in t.lower() for word in words)]
        panels = by_row[title]
        assert panels, f"row {title!r} has no panels"
        names = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
        for choices in wanted:
            assert names & set(choices), f"row {title!r} queries none of {choices}"
        groupings = set().union(*(label_names(t["expr"]) for p in panels for t in p["targets"]))
        assert grouping in groupings, f"row {title!r}: nothing by {grouping}"
    for panel in query_panels(dashboard):
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_the_variables_are_a_data_source_and_the_model() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert set(variables) == set(DASHBOARD_VARIABLES)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
    assert LABEL_VALUES.fullmatch(model["definition"]), model["definition"]
    assert model["query"]["query"] == model["definition"]


def test_yamllint_passes() -> None:
    require_tool("yamllint", "PyPI package yamllint")
    config = ROOT / ".yamllint.yaml"
    command = [sys.executable, "-m", "yamllint", "--strict", "--config-file", str(config)]
    result = subprocess.run(
        [*command, str(MANIFEST)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the queries parse --------------------------------------------------------------------


def test_every_query_parses(tmp_path: Path) -> None:
    queries = [substitute(expr) for _, expr in exprs(load_dashboard())]
    result = check_rules(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout


def test_promtool_refuses_a_query_that_does_not_parse(tmp_path: Path) -> None:
    result = check_rules(["sum(rate(cnn_errors_total[5m])"], tmp_path)
    assert result.returncode != 0 and "parse" in (result.stdout + result.stderr)


def test_metric_and_label_names_are_read_from_a_query() -> None:
    expr = (
        'sum by (version, class) (rate(cnn_a_total{model=~"x(y)", le!="1e-3"}[5m] offset 1h))\n'
        "/ ignoring (class) group_left\nsum by (version) (rate(cnn_b_bucket[$__rate_interval]))"
        " * 1e-3 > bool on() cnn_c or vector(0)"
    )
    assert metric_names(expr) == {"cnn_a_total", "cnn_b_bucket", "cnn_c"}
    assert label_names(expr) == {"version", "class", "model", "le"}


# -- every metric is exported -------------------------------------------------------------


@pytest.fixture(scope="module")
def exposition(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return /metrics of a real server after traffic over both protocols, errors included,
    and a restart of its gRPC front end, so that every labelled series exists."""
    port = free_port()
    folder = tmp_path_factory.mktemp("dashboard-server")
    # Every answer under LOW_CONFIDENCE: the low-confidence counter is above zero.
    server = start_server(model_dir, folder, GRPC_PORT=str(port), LOW_CONFIDENCE="1")
    try:
        for data in distinct_images(3):
            assert post_png(server.url, data).status_code == 200
        assert post_png(server.url, b"junk").status_code == 400
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            answer = infer(image_request(distinct_images(1)), timeout=30)
            assert list(answer.outputs[0].shape) == [1, 3]
            with pytest.raises(grpc.RpcError):
                infer(image_request(distinct_images(1), model="absent"), timeout=30)
        [pid] = grpc_pids(server.process.pid)
        os.kill(pid, signal.SIGKILL)
        wait_until_dead(pid, within_s=30)
        deadline = time.monotonic() + 60
        while "cnn_runner_restarts_total{" not in (text := scrape(server.url)):
            assert time.monotonic() < deadline, "the gRPC front end was not restarted"
            time.sleep(0.1)
        yield text
    finally:
        server.stop()


@pytest.mark.slow
def test_every_metric_and_label_queried_is_exported(exposition: str) -> None:
    assert f'model="{MODEL_LABELS["model"]}"' in exposition
    assert unexported(load_dashboard(), exposition) == {}


@pytest.mark.slow
def test_a_metric_the_service_does_not_export_is_found(exposition: str) -> None:
    dashboard = load_dashboard()
    panel = query_panels(dashboard)[0]
    target = panel["targets"][0]
    assert "cnn_http_request_duration_seconds_count" in target["expr"]
    target["expr"] = target["expr"].replace("_count", "_total")
    where = f"{panel['title']} {target['refId']}"
    [(flagged, absent)] = unexported(dashboard, exposition).items()
    assert flagged == where and "cnn_http_request_duration_seconds_total" in absent
    target["expr"] = 'sum by (protocl) (rate(cnn_errors_total{code="x"}[5m]))'
    assert unexported(dashboard, exposition) == {where: {"protocl"}}
