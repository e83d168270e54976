"""The two Keras runtimes: TensorFlow and JAX load the same model folder and answer alike.

KERAS_BACKEND is fixed per process, so the JAX side runs in a subprocess (and in a real
server); the TensorFlow side runs here. Both sides get the same inputs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import (
    LABELS,
    distinct_images,
    expected_probabilities,
    run_python,
    write_model,
)
from tests.load import runner_pids

pytestmark = pytest.mark.slow

JAX_SCRIPT = """
import json, sys
import numpy as np
from service.runner.runtime import BACKEND, load_classifier
folder, inputs, outputs = sys.argv[1:4]
classifier = load_classifier(folder, max_batch_size=8)
batch = np.load(inputs)
answers = {str(n): classifier.predict_batch(batch[:n]).tolist() for n in (1, 3, 8)}
np.save(outputs, np.array(answers["8"]))
# Which compiled programs hand work to YNNPACK (see runtime.CPU_COMPILER_OPTIONS).
ynn = [s for s, f in classifier._forwards.items() if "__ynn_fusion" in f.program.as_text()]
print(json.dumps({"backend": BACKEND, "device": classifier.info.device, "ynn": ynn,
                  "sizes": list(classifier.batch_sizes), "answers": answers}))
"""


def run_on_jax(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_python(["-c", script, *args], KERAS_BACKEND="jax")


def jax_answers_tensorflow_checked(tmp_path: Path, folder: Path, prelude: str = "") -> dict:
    """Run JAX_SCRIPT after `prelude`; check its answers against TensorFlow's within 1e-5;
    return its report, with its stderr."""
    from service.runner.runtime import BACKEND, load_classifier

    assert BACKEND == "tensorflow"
    batch = np.random.default_rng(5).random((8, 32, 32, 3), dtype=np.float32)
    np.save(tmp_path / "inputs.npy", batch)
    result = run_on_jax(
        prelude + JAX_SCRIPT, str(folder), str(tmp_path / "inputs.npy"), str(tmp_path / "o")
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax" and report["device"] == "CPU:0"
    tensorflow = load_classifier(folder, max_batch_size=8)
    assert report["sizes"] == list(tensorflow.batch_sizes) == [1, 2, 4, 8]
    for count, answer in report["answers"].items():
        # 1 and 8 run at their own size, 3 padded to 4: every row must still be its own.
        want = tensorflow.predict_batch(batch[: int(count)])
        np.testing.assert_allclose(np.array(answer), want, atol=1e-5)
        np.testing.assert_allclose(np.array(answer).sum(axis=1), 1.0, atol=1e-5)
    return {**report, "stderr": result.stderr}


def test_jax_and_tensorflow_give_the_same_probabilities_within_1e_5(tmp_path, model_dir):
    report = jax_answers_tensorflow_checked(tmp_path, model_dir / "2")
    # On a CPU every size is compiled with the service's XLA options: no YNNPACK fusion.
    assert report["ynn"] == []


def test_a_jaxlib_without_the_services_xla_options_compiles_with_its_defaults(tmp_path, model_dir):
    unknown = (
        "from service.runner import runtime\n"
        "runtime.CPU_COMPILER_OPTIONS['xla_cpu_no_such_option'] = '1'\n"
        "import logging; logging.basicConfig(level=logging.INFO)\n"
    )
    report = jax_answers_tensorflow_checked(tmp_path, model_dir / "2", unknown)
    assert report["stderr"].count("compiling with its defaults") == 1
    # XLA's defaults hand this CNN to YNNPACK at every size: the options above did apply.
    assert report["ynn"] == report["sizes"]


def test_the_model_folder_safety_rules_hold_on_jax(tmp_path, cnn):
    folder = write_model(tmp_path / "m", cnn, LABELS)
    config = json.loads((folder / "model.json").read_text())
    config["config"]["layers"][1]["class_name"] = "Lambda"
    (folder / "model.json").write_text(json.dumps(config))
    script = (
        "import sys\n"
        "from model_folder.errors import ModelFolderError\n"
        "from service.runner.runtime import load_classifier\n"
        "try:\n"
        "    load_classifier(sys.argv[1])\n"
        "except ModelFolderError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = run_on_jax(script, str(folder))
    assert result.returncode == 0, result.stderr
    assert "refused: " in result.stdout and "refused layer 'Lambda'" in result.stdout


def test_a_server_on_jax_answers_what_the_model_computes_without_tensorflow(
    server_factory, model_dir, cnn, classifier
):
    server = server_factory(model_dir, KERAS_BACKEND="jax")
    [model] = requests.get(server.url + "/readyz", timeout=10).json()["models"]
    assert model["device"] == "CPU:0"
    for data in distinct_images(3):
        response = requests.post(
            server.url + "/predict", data=data, headers={"Content-Type": "image/png"}, timeout=30
        )
        assert response.status_code == 200, response.text
        got = response.json()["predictions"][0]["probabilities"]
        want = expected_probabilities(cnn, data, classifier.info.spec)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # One runtime in the runner: the JAX one, with no TensorFlow library mapped.
    [runner] = runner_pids(server.process.pid)
    maps = Path(f"/proc/{runner}/maps").read_text()
    assert "xla_extension" in maps or "jaxlib" in maps
    assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps
