"""Training: data, splits and streaming; the model; the report; the export; serving parity."""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from model_folder import files as model_dir
from model_folder.metadata import Metadata
from model_folder.preprocessing import InputSpec, preprocess
from service.runner.runtime import load_classifier
from training import data, export, report, shapes
from training.model import make_model, smallest_input_side
from training.pipeline import TrainingOptions, load_dataset, train

SPEC = InputSpec(32, 32, 3, rescale=1 / 127.5, offset=-1.0)
# Mixed sizes, modes and formats: (suffix, Pillow mode, (width, height)).
VARIANTS = [
    (".png", "RGB", (40, 30)),
    (".jpg", "RGB", (64, 64)),
    (".png", "RGBA", (20, 50)),
    (".gif", "P", (33, 33)),
    (".bmp", "RGB", (48, 24)),
    (".png", "L", (32, 32)),
    (".webp", "RGB", (50, 40)),
    (".tiff", "RGB", (36, 28)),
]


def tiny_options(out: Path, **overrides) -> TrainingOptions:
    """Return options for a seconds-long run: a few images, one small block, one epoch."""
    settings = {
        "synthetic": "shapes",
        "samples_per_class": 8,
        "out": out,
        "epochs": 1,
        "batch_size": 8,
        "filters": (4,),
        "convs_per_block": 1,
        "dense_units": 8,
        "verbose": 0,
        **overrides,
    }
    return TrainingOptions(**settings)


def write_image(path: Path, shape: str, seed: int, mode: str, size: tuple[int, int]) -> Path:
    """Draw `shape` and save it at `path` in the given mode and size (format by suffix)."""
    image = shapes.draw_shape(shape, np.random.default_rng(seed)).resize(size)
    if mode == "RGBA":
        image.putalpha(Image.new("L", size, 200))
    image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_folder(root: Path, classes=("circle", "square", "triangle"), per_class=8) -> Path:
    """Write root/<class>/* images of one shape per class, cycling through VARIANTS."""
    for label, name in enumerate(classes):
        shape = shapes.SHAPES[label % len(shapes.SHAPES)]
        for i in range(per_class):
            suffix, mode, size = VARIANTS[i % len(VARIANTS)]
            write_image(root / name / f"{i}{suffix}", shape, label * 100 + i, mode, size)
    return root


def model_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Return a tiny image folder: 3 classes x 8 images of mixed sizes, modes and formats."""
    return write_folder(tmp_path_factory.mktemp("images") / "pictures")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, image_folder):
    """Return a tiny training run on the image folder."""
    return train(tiny_options(tmp_path_factory.mktemp("out"), synthetic=None, data=image_folder))


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """Return a tiny grayscale training run on the synthetic shapes."""
    out = tmp_path_factory.mktemp("out")
    return train(tiny_options(out, grayscale=True, img_size=(24, 20), epochs=2))


# Data.


def test_shapes_are_deterministic_by_seed_and_balanced():
    first, again, other = (shapes.make_images(3, seed) for seed in (7, 7, 8))
    assert first == again
    assert first != other
    assert sorted(label for _, label in first) == sorted(list(range(len(shapes.SHAPES))) * 3)
    assert Image.open(io.BytesIO(first[0][0])).size == (64, 64)


def test_split_is_stratified_and_the_same_for_the_same_seed():
    samples = [data.Sample(b"%d" % i, i % 2) for i in range(40)]
    split = data.stratified_split(samples, ["a", "b"], 0.2, 0.1, seed=3)
    assert split == data.stratified_split(samples, ["a", "b"], 0.2, 0.1, seed=3)
    assert split != data.stratified_split(samples, ["a", "b"], 0.2, 0.1, seed=4)
    counts = {name: np.bincount([s.label for s in part]).tolist() for name, part in split.items()}
    assert counts == {"train": [14, 14], "val": [4, 4], "test": [2, 2]}
    assert sorted(split["train"] + split["val"] + split["test"], key=lambda s: s.source) == sorted(
        samples, key=lambda s: s.source
    )


def test_every_split_gets_an_image_of_every_class():
    assert data.split_sizes(3, 0.15, 0.15) == (1, 1, 1)
    assert data.split_sizes(100, 0.15, 0.15) == (70, 15, 15)
    assert data.split_sizes(22, 0.1, 0.3) == (13, 2, 7)  # 2.2 and 6.6 round to the nearest
    assert data.split_sizes(10, 0.26, 0.34) == (4, 3, 3)
    with pytest.raises(data.DatasetError, match="class 'b' has 2 usable image"):
        data.stratified_split(
            [data.Sample(b"", i // 3) for i in range(5)], ("a", "b"), 0.15, 0.15, 0
        )


def test_folder_of_mixed_images_loads_every_image(image_folder):
    dataset = data.load_folder(image_folder, SPEC, 0.15, 0.15, seed=1)
    assert dataset.classes == ("circle", "square", "triangle")
    assert dataset.counts() == {
        "train": dict.fromkeys(dataset.classes, 6),
        "val": dict.fromkeys(dataset.classes, 1),
        "test": dict.fromkeys(dataset.classes, 1),
    }
    assert dataset.skipped == ()
    again = data.load_folder(image_folder, SPEC, 0.15, 0.15, seed=1)
    assert again.splits == dataset.splits


def test_seed_option_picks_the_split_and_the_synthetic_images(image_folder, tmp_path):
    def splits(**options):
        return load_dataset(tiny_options(tmp_path, **options), SPEC).splits

    folder = {"synthetic": None, "data": image_folder}
    assert splits(**folder, seed=3) == splits(**folder, seed=3)
    assert splits(**folder, seed=3) != splits(**folder, seed=4)
    assert splits(seed=3) == splits(seed=3)
    assert splits(seed=3) != splits(seed=4)


def test_pre_split_folder_is_used_as_split_and_missing_val_is_carved_from_train(tmp_path):
    write_folder(tmp_path / "train", ("cat", "dog"), per_class=8)
    write_folder(tmp_path / "test", ("cat", "dog"), per_class=2)
    dataset = data.load_folder(tmp_path, SPEC, 0.25, 0.15, seed=1)
    assert dataset.counts() == {
        "train": {"cat": 6, "dog": 6},
        "val": {"cat": 2, "dog": 2},
        "test": {"cat": 2, "dog": 2},
    }
    assert all("test" in str(s.source) for s in dataset.splits["test"])


def test_batches_stream_preprocessed_images_and_reshuffle_each_epoch(image_folder):
    samples = data.load_folder(image_folder, SPEC, 0.15, 0.15, seed=1).splits["train"]
    batches = data.ImageBatches(samples, 3, SPEC, batch_size=5, shuffle_seed=2)
    assert len(batches) == 4  # 18 images: 5 + 5 + 5 + 3
    images, labels = batches[3]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (3, 3) and (labels.sum(axis=1) == 1).all()
    first_epoch = [batches[i][1].argmax(axis=1).tolist() for i in range(len(batches))]
    batches.on_epoch_end()
    assert [batches[i][1].argmax(axis=1).tolist() for i in range(len(batches))] != first_epoch
    in_order = data.ImageBatches(samples, 3, SPEC, batch_size=4)
    expected = np.stack([preprocess(s.read(), SPEC) for s in samples[:4]])
    np.testing.assert_array_equal(in_order[0][0], expected)
    assert in_order.labels.tolist() == [s.label for s in samples]


# Model.


def test_model_is_the_classic_sequential_cnn():
    model = make_model((32, 32, 3), 5, filters=(8, 16), convs_per_block=2, dense_units=12)
    kinds = [type(layer).__name__ for layer in model.layers]
    block = ["Conv2D", "Activation"] * 2 + ["MaxPooling2D", "Dropout"]
    head = ["Flatten", "Dense", "Activation", "Dropout", "Dense", "Activation"]
    assert kinds == block * 2 + head
    assert model.output_shape == (None, 5)
    assert model.layers[-1].activation.__name__ == "softmax"


def test_model_layers_take_the_requested_filters_units_and_rates():
    model = make_model((32, 32, 3), 5, (8, 16), convs_per_block=2, dense_units=12, dropout=0.3)

    def layers(kind):
        return [layer for layer in model.layers if isinstance(layer, kind)]

    convs = [(conv.filters, conv.kernel_size) for conv in layers(keras.layers.Conv2D)]
    assert convs == [(8, (3, 3))] * 2 + [(16, (3, 3))] * 2
    assert [dense.units for dense in layers(keras.layers.Dense)] == [12, 5]
    assert [dropout.rate for dropout in layers(keras.layers.Dropout)] == [0.3, 0.3, 0.5]
    activations = [layer.activation.__name__ for layer in layers(keras.layers.Activation)]
    assert activations == ["relu"] * 5 + ["softmax"]


def test_model_refuses_an_input_too_small_for_its_blocks():
    assert smallest_input_side(2, 2) == 16
    make_model((16, 16, 1), 2, filters=(2, 2), convs_per_block=2, dense_units=2)
    with pytest.raises(ValueError, match="needs at least 16x16"):
        make_model((15, 32, 1), 2, filters=(2, 2), convs_per_block=2)


# Report.


def test_per_class_precision_and_recall_come_from_the_confusion_matrix():
    confusion = report.confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    evaluation = report.Evaluation(("a", "b", "c"), 0.5, 0.6, confusion)
    assert evaluation.per_class() == {
        "a": {"precision": 1.0, "recall": 0.5, "support": 2},
        "b": {"precision": 0.5, "recall": 1.0, "support": 2},
        "c": {"precision": 0.0, "recall": 0.0, "support": 1},
    }


# Export.


@pytest.fixture
def small_model():
    """Return an untrained model and the arguments export.save_version needs with it."""
    model = make_model((16, 16, 3), 2, filters=(2,), convs_per_block=1, dense_units=2)
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}
    history["val_accuracy"] = [0.4, 0.7]
    evaluation = report.Evaluation(("a", "b"), 0.7, 0.5, np.array([[1, 1], [0, 2]]))
    return model, history, evaluation


def test_versions_increment_and_never_overwrite(tmp_path, small_model):
    model, history, evaluation = small_model
    parent = tmp_path / "demo"
    (parent / "1").mkdir(parents=True)
    (parent / "1" / "keep.txt").write_text("older model")
    first = export.save_version(model, parent, "ab", Metadata(name="demo"), history, evaluation)
    second = export.save_version(model, parent, "ab", Metadata(name="demo"), history, evaluation)
    assert (first.name, second.name) == ("2", "3")
    assert (parent / "1" / "keep.txt").read_text() == "older model"
    assert json.loads((second / model_dir.METADATA).read_text())["version"] == "3"
    assert sorted(p.name for p in parent.iterdir()) == ["1", "2", "3"]


def test_a_version_taken_meanwhile_is_skipped(tmp_path, small_model, monkeypatch):
    model, history, evaluation = small_model
    parent = tmp_path / "demo"
    (parent / "4").mkdir(parents=True)
    (parent / "4" / "model.json").write_text("{}")
    answers = iter([4, 5])  # the scan saw 3 versions; another run then wrote version 4
    monkeypatch.setattr(export, "next_version", lambda _: next(answers))
    folder = export.save_version(model, parent, "ab", Metadata(), history, evaluation)
    assert folder.name == "5"
    assert (parent / "4" / "model.json").read_text() == "{}"


def test_failed_export_leaves_no_folder_behind(tmp_path, small_model, monkeypatch):
    model, history, evaluation = small_model

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(report, "plot_confusion_matrix", broken)
    with pytest.raises(OSError, match="disk full"):
        export.save_version(model, tmp_path / "demo", "ab", Metadata(), history, evaluation)
    assert list((tmp_path / "demo").iterdir()) == []


# Training end to end, and serving parity.


def test_folder_run_writes_every_artifact(folder_run):
    assert folder_run.folder.name == "1"
    assert folder_run.folder.parent.name == "pictures"
    assert model_files(folder_run.folder) == {
        model_dir.MODEL_JSON,
        model_dir.WEIGHTS,
        model_dir.LABELS,
        model_dir.METADATA,
        export.CURVES,
        export.CONFUSION,
    }
    for plot in (export.CURVES, export.CONFUSION):
        with Image.open(folder_run.folder / plot) as image:
            assert image.format == "PNG"
    labels = json.loads((folder_run.folder / model_dir.LABELS).read_text())
    assert labels == ["circle", "square", "triangle"]


def test_metadata_describes_input_data_training_and_evaluation(folder_run):
    metadata = json.loads((folder_run.folder / model_dir.METADATA).read_text())
    assert metadata["name"] == "pictures"
    assert metadata["version"] == "1"
    assert metadata["input"] == {
        "height": 32,
        "width": 32,
        "channels": 3,
        "rescale": 1 / 127.5,
        "offset": -1.0,
        "color_mode": "rgb",
    }
    dataset = metadata["training"]["dataset"]
    assert dataset["counts"]["train"] == {"circle": 6, "square": 6, "triangle": 6}
    assert dataset["skipped_files"] == 0
    assert metadata["training"]["options"]["filters"] == [4]
    assert metadata["training"]["epochs_run"] == 1
    evaluation = metadata["training"]["evaluation"]
    assert 0.0 <= evaluation["test_accuracy"] <= 1.0
    labels = json.loads((folder_run.folder / model_dir.LABELS).read_text())
    assert set(evaluation["per_class"]) == set(labels)
    assert set(metadata["training"]["versions"]) == {"tensorflow", "keras", "python"}
    assert metadata["created"].endswith("+00:00")


@pytest.mark.parametrize("run_name", ["folder_run", "shapes_run"])
def test_service_predicts_what_the_trained_model_predicts(run_name, request):
    run = request.getfixturevalue(run_name)
    classifier = load_classifier(run.folder, max_batch_size=4)
    assert classifier.info.spec == run.spec
    assert classifier.info.labels == run.dataset.classes
    test_images = [sample.read() for sample in run.dataset.splits["test"][:3]]
    inputs = np.stack([preprocess(image, classifier.info.spec) for image in test_images])
    expected = np.asarray(run.model(inputs, training=False))
    np.testing.assert_allclose(classifier.predict_batch(inputs), expected, rtol=0, atol=1e-5)


def test_grayscale_run_serves_one_channel(shapes_run):
    info = load_classifier(shapes_run.folder, max_batch_size=1).info
    assert info.input_shape == (24, 20, 1)
    assert info.spec.color_mode == "grayscale"
    assert info.name == "shapes" and info.version == "1"
    metadata = json.loads((shapes_run.folder / model_dir.METADATA).read_text())
    assert metadata["training"]["dataset"]["source"] == "synthetic:shapes"
    assert metadata["training"]["epochs_run"] == 2


def test_unreadable_files_are_skipped_counted_and_warned(tmp_path, caplog):
    folder = tmp_path / "pictures"
    write_folder(folder)
    (folder / "circle" / "broken.png").write_bytes(b"not a png at all")
    truncated = (folder / "square" / "1.jpg").read_bytes()[:200]
    (folder / "square" / "truncated.jpg").write_bytes(truncated)
    (folder / "square" / "notes.txt").write_text("not an image, not counted")
    run = train(tiny_options(tmp_path / "out", synthetic=None, data=folder))
    assert len(run.dataset.skipped) == 2
    assert "skipped 2 unreadable image file(s)" in caplog.text
    metadata = json.loads((run.folder / model_dir.METADATA).read_text())
    assert metadata["training"]["dataset"]["skipped_files"] == 2


def test_same_seed_gives_the_same_split_and_weights(tmp_path):
    runs = [train(tiny_options(tmp_path / name, seed=5)) for name in ("a", "b")]
    assert runs[0].dataset.splits == runs[1].dataset.splits
    for first, second in zip(runs[0].model.get_weights(), runs[1].model.get_weights(), strict=True):
        np.testing.assert_allclose(first, second, atol=1e-5)
