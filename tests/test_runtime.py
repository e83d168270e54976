"""Loading a model folder: the contract, every kind of fault, and the forward pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from model_folder.errors import ModelFolderError
from service.runner.runtime import load_classifier, padded_batch_sizes
from tests.conftest import LABELS, make_cnn, write_model


@pytest.fixture
def good(tmp_path, cnn):
    return write_model(tmp_path / "good", cnn, LABELS)


def test_highest_numbered_version_is_served(model_dir):
    info = load_classifier(model_dir / "2").info
    assert (info.name, info.version) == ("shapes", "2")


def test_defaults_without_metadata(good):
    info = load_classifier(good).info
    assert (info.name, info.version) == ("good", "1")
    assert info.spec.rescale == pytest.approx(1 / 255)
    assert info.spec.offset == 0.0
    assert info.input_shape == (32, 32, 3)


def test_metadata_sets_name_version_and_scaling(tmp_path, cnn):
    meta = {"name": "n", "version": "7", "input": {"rescale": 2.0, "offset": -1.0}}
    info = load_classifier(write_model(tmp_path / "m", cnn, LABELS, meta)).info
    assert (info.name, info.version, info.spec.rescale, info.spec.offset) == ("n", "7", 2.0, -1.0)


def test_predictions_equal_the_keras_model_at_every_batch_size(good, cnn):
    classifier = load_classifier(good, max_batch_size=8)
    assert classifier.batch_sizes == (1, 2, 4, 8)
    inputs = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    expected = np.asarray(cnn(inputs, training=False))
    for count in (1, 3, 5, 8):
        np.testing.assert_allclose(
            classifier.predict_batch(inputs[:count]), expected[:count], atol=1e-5
        )


def test_compiled_models_json_loads_without_its_training_settings(tmp_path):
    model = make_cnn()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    assert "compile_config" in model.to_json()
    classifier = load_classifier(write_model(tmp_path / "m", model, LABELS))
    assert classifier.info.labels == tuple(LABELS)


def test_softmax_is_applied_when_the_model_lacks_one(tmp_path):
    logits_model = make_cnn(softmax=False)
    classifier = load_classifier(write_model(tmp_path / "m", logits_model, LABELS))
    inputs = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    outputs = classifier.predict_batch(inputs)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
    expected = np.asarray(logits_model(inputs, training=False))
    expected = np.exp(expected) / np.exp(expected).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_grayscale_model_loads(tmp_path):
    model = make_cnn(input_shape=(28, 28, 1))
    info = load_classifier(write_model(tmp_path / "g", model, LABELS)).info
    assert info.spec.color_mode == "grayscale"


def test_padded_batch_sizes_are_powers_of_two_then_the_max():
    assert padded_batch_sizes(1) == (1,)
    assert padded_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert padded_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)


FAULTS = {
    "missing model.json": (lambda d: (d / "model.json").unlink(), "model.json: file is missing"),
    "missing weights": (lambda d: (d / "model.weights.h5").unlink(), "weights file is missing"),
    "missing labels": (lambda d: (d / "labels.json").unlink(), "labels.json: file is missing"),
    "bad json": (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
    "json not a model": (
        lambda d: (d / "model.json").write_text(
            '{"class_name": "Dense", "module": "keras.layers"}'
        ),
        "not a Keras model",
    ),
    "truncated weights": (
        lambda d: (d / "model.weights.h5").write_bytes((d / "model.weights.h5").read_bytes()[:500]),
        "weights do not load",
    ),
    "labels not a list": (lambda d: (d / "labels.json").write_text('{"a": 1}'), "JSON array"),
    "label count": (
        lambda d: (d / "labels.json").write_text(json.dumps(LABELS[:2])),
        "2 labels but the model outputs 3 classes",
    ),
    "bad metadata": (lambda d: (d / "metadata.json").write_text("[]"), "must be a JSON object"),
    "colour mode": (
        lambda d: (d / "metadata.json").write_text('{"input": {"color_mode": "grayscale"}}'),
        "does not fit",
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_is_one_clear_line_naming_the_file(good, name):
    breaker, expected = FAULTS[name]
    breaker(good)
    with pytest.raises(ModelFolderError) as error:
        load_classifier(good)
    message = str(error.value)
    assert expected in message
    assert str(good) in message
    assert "\n" not in message


def test_weights_of_another_architecture_are_refused(tmp_path, cnn):
    folder = write_model(tmp_path / "m", cnn, LABELS)
    other = write_model(tmp_path / "other", make_cnn(input_shape=(28, 28, 3)), LABELS)
    shutil.copy(other / "model.weights.h5", folder / "model.weights.h5")
    with pytest.raises(ModelFolderError, match="weights do not load"):
        load_classifier(folder)


def test_empty_versions_folder_is_refused(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelFolderError, match=r"model\.json: file is missing"):
        load_classifier(tmp_path / "models")


def test_lambda_layer_is_refused_without_running_it(tmp_path, good):
    import keras

    marker = tmp_path / "ran"
    touch_marker = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(touch_marker)])
    (good / "model.json").write_text(model.to_json())
    marker.unlink(missing_ok=True)  # building the model here ran it once
    with pytest.raises(ModelFolderError, match="refused layer 'Lambda'"):
        load_classifier(good)
    assert not marker.exists()


def test_custom_object_is_refused(good):
    config = json.loads((good / "model.json").read_text())
    config["config"]["layers"][1]["module"] = "my_evil_package"
    config["config"]["layers"][1]["registered_name"] = "Custom>Evil"
    (good / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="refused custom object 'Custom>Evil'"):
        load_classifier(good)


def test_max_batch_size_zero_is_the_devices_default_and_any_other_is_kept(good):
    from service.runner.runtime import DEFAULT_MAX_BATCH_SIZE

    automatic = load_classifier(good, max_batch_size=0)
    kind = automatic.info.device.split(":")[0]
    assert automatic.max_batch_size == DEFAULT_MAX_BATCH_SIZE[kind]
    # An explicit value is never raised or lowered, on a CPU or a GPU alike.
    for explicit in (8, 48):
        assert load_classifier(good, max_batch_size=explicit).max_batch_size == explicit


def test_every_value_comes_from_the_weights_file_not_an_initializer(tmp_path):
    # BatchNormalization's moving statistics start as zeros and ones; set to other values,
    # they show whether the served model reads them all from the file.
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(4, (3, 3)),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(3)
    model.set_weights([rng.uniform(0.5, 2.0, w.shape).astype(w.dtype) for w in model.get_weights()])
    classifier = load_classifier(write_model(tmp_path / "bn", model, LABELS), max_batch_size=2)
    inputs = rng.random((2, 32, 32, 3), dtype=np.float32)
    expected = np.asarray(model(inputs, training=False))
    np.testing.assert_allclose(classifier.predict_batch(inputs), expected, atol=1e-5)


def test_a_batch_is_padded_past_a_compiled_size_that_is_slower_than_the_next(good, cnn):
    import time

    classifier = load_classifier(good, max_batch_size=8)
    assert classifier.padded_size(3) == 4  # before warm-up: the smallest size that holds it
    fast = classifier._forwards[4]

    def slow(inputs):
        time.sleep(0.3)  # far above what a forward pass of 8 takes, on any machine
        return fast(inputs)

    classifier._forwards[4] = slow
    classifier.warm_up()
    assert classifier.padded_size(3) == classifier.padded_size(4) == 8
    assert all(classifier.padded_size(n) != 4 for n in range(1, 9))
    inputs = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    expected = np.asarray(cnn(inputs, training=False))
    np.testing.assert_allclose(classifier.predict_batch(inputs), expected, atol=1e-5)
