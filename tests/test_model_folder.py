"""The model folder contract (model_folder/): version discovery, vetting, labels, metadata.

Each refusal test takes the real `to_json()` of the reference CNN and changes it in exactly one
way, so it fails only if that one check is missing. `read()` checks the weights file exists but
never opens it, so these folders hold an empty placeholder and no Keras is needed to read them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from model_folder import files as model_dir
from model_folder import repository
from model_folder.errors import ModelFolderError
from model_folder.repository import VersionPolicy
from tests.conftest import LABELS, make_cnn


@pytest.fixture(scope="module")
def architecture() -> dict:
    """Return the reference CNN's model.json, parsed."""
    return json.loads(make_cnn().to_json())


def write_folder(
    folder: Path,
    architecture: dict | str,
    labels: object = LABELS,
    metadata: object = None,
) -> Path:
    """Write a model folder as training does; the weights are a placeholder file."""
    folder.mkdir(parents=True, exist_ok=True)
    text = architecture if isinstance(architecture, str) else json.dumps(architecture)
    (folder / model_dir.MODEL_JSON).write_text(text)
    (folder / model_dir.WEIGHTS).write_bytes(b"")
    (folder / model_dir.LABELS).write_text(json.dumps(labels))
    if metadata is not None:
        (folder / model_dir.METADATA).write_text(json.dumps(metadata))
    return folder


def layer(config: dict, class_name: str) -> dict:
    """Return the first layer of the Sequential config with this class name."""
    return next(item for item in config["config"]["layers"] if item["class_name"] == class_name)


def read_error(folder: Path) -> str:
    with pytest.raises(ModelFolderError) as caught:
        model_dir.read(folder)
    return str(caught.value)


# Version discovery


def test_only_numbered_folders_are_versions_ordered_by_number(tmp_path, architecture):
    for name in ("1", "2", "9", "10", "latest", ".staging-x"):
        write_folder(tmp_path / name, architecture)
    (tmp_path / "11").write_text("a file, not a version folder")
    entry = repository.scan_model(tmp_path)
    assert sorted(entry.versions, key=int) == ["1", "2", "9", "10"]
    assert entry.served_versions(VersionPolicy()) == ["10"]
    assert entry.versions["10"].path == tmp_path / "10"


def test_a_folder_holding_model_json_is_one_version_itself(tmp_path, architecture):
    write_folder(tmp_path, architecture, metadata={"version": "4"})
    write_folder(tmp_path / "3", architecture)
    entry = repository.scan_model(tmp_path)
    assert list(entry.versions) == ["4"]
    assert entry.versions["4"].path == tmp_path


def test_a_folder_without_model_json_or_versions_has_no_version(tmp_path):
    (tmp_path / "latest").mkdir()
    assert repository.scan_model(tmp_path).versions == {}


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        repository.scan_model_dir(tmp_path / "absent")
    with pytest.raises(ModelFolderError, match="does not exist"):
        model_dir.read(tmp_path / "absent")


def test_a_fingerprint_changes_when_a_file_of_the_version_does(tmp_path, architecture):
    folder = write_folder(tmp_path / "1", architecture)
    before = repository.scan_model(tmp_path).versions["1"].fingerprint
    assert repository.scan_model(tmp_path).versions["1"].fingerprint == before
    (folder / model_dir.WEIGHTS).write_bytes(b"more bytes than before")
    assert repository.scan_model(tmp_path).versions["1"].fingerprint != before


# Name and version


def test_name_and_version_default_to_the_folders(tmp_path, architecture):
    write_folder(tmp_path / "shapes" / "7", architecture)
    files = model_dir.read(tmp_path / "shapes" / "7")
    assert (files.name, files.version) == ("shapes", "7")
    assert repository.scan_model_dir(tmp_path / "shapes").name == "shapes"


def test_an_unversioned_folder_is_version_one_named_after_itself(tmp_path, architecture):
    files = model_dir.read(write_folder(tmp_path / "digits", architecture))
    assert (files.name, files.version) == ("digits", "1")


def test_metadata_name_and_version_override_the_folders(tmp_path, architecture):
    write_folder(tmp_path / "shapes" / "7", architecture, metadata={"name": "s", "version": 3})
    files = model_dir.read(tmp_path / "shapes" / "7")
    assert (files.name, files.version) == ("s", "3")
    assert repository.scan_model_dir(tmp_path / "shapes").name == "s"


def test_a_repository_names_each_model_by_its_folder(tmp_path, architecture):
    write_folder(tmp_path / "shapes" / "1", architecture, metadata={"name": "other"})
    write_folder(tmp_path / "digits", architecture)
    (tmp_path / ".trash").mkdir()
    models = repository.scan_repository(tmp_path)
    assert sorted(models) == ["digits", "shapes"]
    files = model_dir.read(models["shapes"].versions["1"].path, "shapes", "1")
    assert files.name == "shapes", "the folder names the model, not its metadata"


# Safety checks: each a single change to a real model.json


def test_the_unchanged_reference_model_json_is_accepted(tmp_path, architecture):
    files = model_dir.read(write_folder(tmp_path, architecture))
    unread = {key: value for key, value in architecture.items() if key != "compile_config"}
    assert json.loads(files.architecture) == unread
    assert files.labels == tuple(LABELS)
    assert files.weights == tmp_path / model_dir.WEIGHTS


@pytest.mark.parametrize("refused", ["Lambda", "TFSMLayer"])
def test_refused_builtin_layers(tmp_path, architecture, refused):
    config = copy.deepcopy(architecture)
    target = layer(config, "Activation")
    assert target["module"] == "keras.layers" and target["registered_name"] is None
    target["class_name"] = refused
    assert f"refused layer {refused!r}" in read_error(write_folder(tmp_path, config))


def test_a_lambda_function_is_refused_even_under_a_keras_module(tmp_path, architecture):
    config = copy.deepcopy(architecture)
    layer(config, "Activation")["config"]["activation"] = {
        "module": "keras.activations",
        "class_name": "__lambda__",
        "config": {"code": "print", "defaults": None, "closure": None},
        "registered_name": None,
    }
    assert "refused layer '__lambda__'" in read_error(write_folder(tmp_path, config))


def test_a_python_function_as_keras_writes_it_is_refused(tmp_path, architecture):
    config = copy.deepcopy(architecture)
    # What keras.saving.serialize_keras_object writes for a plain Python function.
    layer(config, "Activation")["config"]["activation"] = {
        "module": "builtins",
        "class_name": "function",
        "config": "my_activation",
        "registered_name": "function",
    }
    assert "refused custom object 'function'" in read_error(write_folder(tmp_path, config))


@pytest.mark.parametrize("module", ["os", "builtins", "my_package.layers", "keras.src.layers"])
def test_a_layer_from_any_other_module_is_refused(tmp_path, architecture, module):
    config = copy.deepcopy(architecture)
    layer(config, "Conv2D")["module"] = module
    message = read_error(write_folder(tmp_path, config))
    assert f"refused custom object '{module}.Conv2D'" in message


def test_a_layer_without_a_module_is_refused(tmp_path, architecture):
    config = copy.deepcopy(architecture)
    del layer(config, "Conv2D")["module"]
    assert "refused custom object 'None.Conv2D'" in read_error(write_folder(tmp_path, config))


def test_a_nested_object_from_another_module_is_refused(tmp_path, architecture):
    config = copy.deepcopy(architecture)
    initializer = layer(config, "Conv2D")["config"]["kernel_initializer"]
    assert initializer["module"] == "keras.initializers"
    initializer["module"] = "my_package.initializers"
    message = read_error(write_folder(tmp_path, config))
    assert "'my_package.initializers.GlorotUniform'" in message


def test_a_registered_name_is_refused_even_under_keras_layers(tmp_path, architecture):
    config = copy.deepcopy(architecture)
    target = layer(config, "Dense")
    assert target["module"] == "keras.layers"
    target["registered_name"] = "MyPackage>Dense"
    assert "refused custom object 'MyPackage>Dense'" in read_error(write_folder(tmp_path, config))


def test_compile_config_is_dropped_unread(tmp_path, architecture):
    model = make_cnn()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    compiled = json.loads(model.to_json())
    assert "compile_config" in compiled
    # A custom loss there would be refused if it were vetted; it is dropped before, unread.
    compiled["compile_config"]["loss"] = {
        "module": "my_package.losses",
        "class_name": "MyLoss",
        "config": {},
        "registered_name": "MyPackage>MyLoss",
    }
    files = model_dir.read(write_folder(tmp_path, compiled))
    served = json.loads(files.architecture)
    assert "compile_config" not in served
    del compiled["compile_config"]
    assert served == compiled


def test_model_json_that_is_not_json_is_refused(tmp_path):
    assert "not valid JSON" in read_error(write_folder(tmp_path, "{not json"))


def test_missing_weights_are_refused(tmp_path, architecture):
    (write_folder(tmp_path, architecture) / model_dir.WEIGHTS).unlink()
    assert "weights file is missing" in read_error(tmp_path)


def test_missing_labels_are_refused(tmp_path, architecture):
    (write_folder(tmp_path, architecture) / model_dir.LABELS).unlink()
    assert "labels.json: file is missing" in read_error(tmp_path)


# Labels


def test_duplicate_labels_are_refused(tmp_path, architecture):
    folder = write_folder(tmp_path, architecture, labels=["circle", "square", "circle"])
    assert "class names must be unique" in read_error(folder)


@pytest.mark.parametrize(
    "labels",
    [[], ["circle", 2, "triangle"], ["circle", None], [["circle"]], {"0": "circle"}, "circle"],
    ids=["empty", "a-number", "a-null", "a-list", "an-object", "a-string"],
)
def test_labels_must_be_a_non_empty_list_of_strings(tmp_path, architecture, labels):
    folder = write_folder(tmp_path, architecture, labels=labels)
    assert "must be a non-empty JSON array of strings" in read_error(folder)


def test_labels_keep_their_order(tmp_path, architecture):
    folder = write_folder(tmp_path, architecture, labels=["zebra", "apple", "mango"])
    assert model_dir.read(folder).labels == ("zebra", "apple", "mango")


# Metadata and the input scaling


def test_default_scaling_is_one_over_255_with_no_offset(tmp_path, architecture):
    spec = model_dir.read(write_folder(tmp_path, architecture)).input_spec(32, 32, 3)
    assert spec.rescale == 1 / 255
    assert spec.offset == 0.0
    assert spec.shape == (32, 32, 3)


def test_metadata_sets_the_scaling(tmp_path, architecture):
    metadata = {"input": {"rescale": 0.5, "offset": -1, "color_mode": "rgb"}}
    files = model_dir.read(write_folder(tmp_path, architecture, metadata=metadata))
    spec = files.input_spec(32, 32, 3)
    assert (spec.rescale, spec.offset) == (0.5, -1.0)


@pytest.mark.parametrize(("channels", "mode"), [(1, "grayscale"), (3, "rgb")])
@pytest.mark.parametrize("metadata", [None, {"input": {"rescale": 0.5}}], ids=["none", "no-mode"])
def test_color_mode_defaults_to_the_channels(tmp_path, architecture, metadata, channels, mode):
    files = model_dir.read(write_folder(tmp_path, architecture, metadata=metadata))
    assert files.input_spec(28, 28, channels).color_mode == mode


@pytest.mark.parametrize(("color_mode", "channels"), [("grayscale", 3), ("rgb", 1)])
def test_a_color_mode_that_does_not_fit_the_channels_is_refused(
    tmp_path, architecture, color_mode, channels
):
    metadata = {"input": {"color_mode": color_mode}}
    files = model_dir.read(write_folder(tmp_path, architecture, metadata=metadata))
    with pytest.raises(ModelFolderError, match=f"color_mode {color_mode!r} does not fit"):
        files.input_spec(32, 32, channels)


@pytest.mark.parametrize("color_mode", ["bgr", "RGB"])
def test_an_unknown_color_mode_is_refused_when_read(tmp_path, architecture, color_mode):
    folder = write_folder(tmp_path, architecture, metadata={"input": {"color_mode": color_mode}})
    assert "input color_mode must be one of" in read_error(folder)


def test_an_input_size_other_than_the_models_is_refused(tmp_path, architecture):
    metadata = {"input": {"height": 32, "width": 28, "channels": 3}}
    files = model_dir.read(write_folder(tmp_path, architecture, metadata=metadata))
    assert files.input_spec(32, 28, 3).shape == (32, 28, 3)
    with pytest.raises(ModelFolderError, match=r"input \[32, 28, 3\] does not match"):
        files.input_spec(32, 32, 3)


@pytest.mark.parametrize(("color_mode", "channels"), [("grayscale", 1), ("rgb", 3)])
def test_a_color_mode_that_fits_the_channels_is_accepted(
    tmp_path, architecture, color_mode, channels
):
    metadata = {"input": {"color_mode": color_mode}}
    files = model_dir.read(write_folder(tmp_path, architecture, metadata=metadata))
    assert files.input_spec(28, 28, channels).color_mode == color_mode


@pytest.mark.parametrize(
    ("input_meta", "message"),
    [
        ([1, 2], "'input' must be an object"),
        ({"rescale": "a lot"}, "input 'rescale' must be a finite number"),
        ({"offset": None}, "input 'offset' must be a finite number"),
        ({"height": 0}, "input 'height' must be a positive integer"),
    ],
)
def test_bad_input_metadata_is_refused(tmp_path, architecture, input_meta, message):
    folder = write_folder(tmp_path, architecture, metadata={"input": input_meta})
    assert message in read_error(folder)


@pytest.mark.parametrize("metadata", [["name", "x"], "x", 3])
def test_metadata_that_is_not_an_object_is_refused(tmp_path, architecture, metadata):
    folder = write_folder(tmp_path, architecture, metadata=metadata)
    assert "metadata.json: must be a JSON object" in read_error(folder)
