"""Training quality: it learns, keeps images with their labels, restores the best epoch, reports.

Expected values come from the images themselves (pixel values and colours written here, shape
geometry measured here) and from Keras and numpy called directly, never from training/.
Every run is a few seconds: 8x8 images of three solid colours, one small convolution block
(8 filters, 16 dense units: with 4 and 8, one seed in twelve left a class unlearnt).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from model_folder import files as model_dir
from model_folder.preprocessing import InputSpec
from training import data, shapes
from training.pipeline import TrainingOptions, train

SIZE = 8
# Class folders sort to this order, which is therefore the class-index order.
COLOURS = {"blue": (30, 40, 210), "green": (40, 200, 50), "red": (210, 40, 30)}
CLASSES = tuple(COLOURS)


def write_colour_images(folder: Path, colour: str, count: int, rng: np.random.Generator) -> None:
    """Add `count` SIZE x SIZE PNGs of one solid colour, with a little pixel noise, to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    first = len(list(folder.iterdir()))
    for i in range(first, first + count):
        noise = rng.normal(0.0, 10.0, (SIZE, SIZE, 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{colour}-{i}.png")


def drawn_colour(path: Path) -> str:
    """Return the colour an image was drawn in (its file name says), whatever folder it is in."""
    return path.name.split("-")[0]


def pixels_of(path: Path) -> np.ndarray:
    """Return an image file's RGB pixels as float32, read with Pillow."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def model_input(path: Path) -> np.ndarray:
    """Scale an image file to [-1, 1] by hand, as the README says models take it."""
    return pixels_of(path) / 127.5 - 1.0


def crossentropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Return the mean categorical crossentropy (Keras computes it from the logits: no clipping)."""
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    return float(-np.mean(np.log(picked)))


def colour_options(root: Path, out: Path, **overrides) -> TrainingOptions:
    """Return options for a seconds-long run on SIZE x SIZE colour images."""
    settings = {
        "data": root,
        "out": out,
        "img_size": (SIZE, SIZE),
        "batch_size": 8,
        "filters": (8,),
        "convs_per_block": 1,
        "dense_units": 16,
        "learning_rate": 0.01,
        "epochs": 8,
        "verbose": 0,
        **overrides,
    }
    return TrainingOptions(**settings)


def evaluate_by_hand(model: keras.Model, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Return (true class indices from the folder names, predicted probabilities)."""
    true = np.array([CLASSES.index(path.parent.name) for path in files])
    probabilities = np.asarray(model.predict(np.stack([model_input(p) for p in files]), verbose=0))
    return true, probabilities


def metadata_of(run) -> dict:
    return json.loads((run.folder / model_dir.METADATA).read_text())


class EpochRecorder(keras.callbacks.Callback):
    """Record the initial weights, and every epoch's validation loss and final weights."""

    def __init__(self) -> None:
        super().__init__()
        self.train_batches = None  # what training handed `fit` to train on
        self.initial_weights: list[np.ndarray] = []
        self.val_loss: list[float] = []
        self.weights: list[list[np.ndarray]] = []

    def on_train_begin(self, logs=None) -> None:
        self.initial_weights = [np.array(w) for w in self.model.get_weights()]

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.val_loss.append(float(logs["val_loss"]))
        self.weights.append([np.array(w) for w in self.model.get_weights()])


def train_recording_epochs(options: TrainingOptions):
    """Train with an EpochRecorder added to the callbacks training passes to `fit`."""
    recorder = EpochRecorder()
    fit = keras.Model.fit

    def fit_and_record(self, x=None, *args, callbacks=None, **kwargs):
        recorder.train_batches = x
        return fit(self, x, *args, callbacks=[*(callbacks or []), recorder], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.Model, "fit", fit_and_record)
        run = train(options)
    return run, recorder


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """Return a run on root/<colour>/*, 22 clean images per class, and its EpochRecorder."""
    root = tmp_path_factory.mktemp("flat") / "colours"
    rng = np.random.default_rng(11)
    for colour in COLOURS:
        write_colour_images(root / colour, colour, 22, rng)
    options = colour_options(root, tmp_path_factory.mktemp("out"), val_split=0.1, test_split=0.3)
    return train_recording_epochs(options)


@pytest.fixture(scope="module")
def mislabelled_test_run(tmp_path_factory):
    """Return a run (and recorder) on clean train/ and val/, and a test/ with two misfiled images.

    test/blue holds one red image and test/red one green image, so a model that sees colours
    gets exactly these (true, predicted) counts, rows true and columns predicted:
    blue [3, 0, 1], green [0, 3, 0], red [0, 1, 3].
    """
    root = tmp_path_factory.mktemp("presplit") / "colours"
    rng = np.random.default_rng(12)
    for colour in COLOURS:
        write_colour_images(root / "train" / colour, colour, 12, rng)
        write_colour_images(root / "val" / colour, colour, 3, rng)
        write_colour_images(root / "test" / colour, colour, 3, rng)
    write_colour_images(root / "test" / "blue", "red", 1, rng)
    write_colour_images(root / "test" / "red", "green", 1, rng)
    return train_recording_epochs(colour_options(root, tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def overfitting_run(tmp_path_factory):
    """Return a run whose validation loss falls and then rises, and its EpochRecorder.

    One image in six of each val/ class is drawn in another class's colour: validation loss is
    lowest while the model is still somewhat unsure (epochs 4 to 7 for seeds 1 to 8) and grows
    as it becomes confident, so early stopping must stop it and restore an earlier epoch.
    """
    root = tmp_path_factory.mktemp("overfit") / "colours"
    rng = np.random.default_rng(13)
    for k, colour in enumerate(COLOURS):
        write_colour_images(root / "train" / colour, colour, 10, rng)
        write_colour_images(root / "val" / colour, colour, 5, rng)
        write_colour_images(root / "val" / colour, CLASSES[(k + 1) % 3], 1, rng)
        write_colour_images(root / "test" / colour, colour, 2, rng)
    options = colour_options(
        root, tmp_path_factory.mktemp("out"), epochs=20, patience=2, learning_rate=0.003, seed=2
    )
    return train_recording_epochs(options)


# It learns.


def test_clearly_separable_classes_are_learned_well_above_chance(flat_run):
    run, _ = flat_run
    files = [sample.source for sample in run.dataset.splits["test"]]
    true, probabilities = evaluate_by_hand(run.model, files)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == true))
    assert accuracy >= 0.9  # chance is 1/3
    evaluation = metadata_of(run)["training"]["evaluation"]
    assert evaluation["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert evaluation["test_loss"] == pytest.approx(
        crossentropy(probabilities, true), rel=1e-4, abs=1e-5
    )


def test_exported_model_names_new_images_by_their_colour(flat_run, tmp_path):
    run, _ = flat_run
    folder = run.folder
    model = keras.models.model_from_json((folder / model_dir.MODEL_JSON).read_text())
    model.load_weights(folder / model_dir.WEIGHTS)
    labels = json.loads((folder / model_dir.LABELS).read_text())
    assert labels == list(CLASSES)
    scaling = metadata_of(run)["input"]
    rng = np.random.default_rng(99)
    for colour in COLOURS:
        write_colour_images(tmp_path / colour, colour, 4, rng)
    files = sorted(tmp_path.glob("*/*.png"))
    pixels = np.stack([pixels_of(path) for path in files])
    predicted = model.predict(pixels * scaling["rescale"] + scaling["offset"], verbose=0)
    assert [labels[i] for i in predicted.argmax(axis=1)] == [p.parent.name for p in files]


def test_split_follows_the_requested_fractions_per_class(flat_run):
    run, _ = flat_run
    # 22 per class: val round(2.2) = 2, test round(6.6) = 7, train the other 13.
    counts = metadata_of(run)["training"]["dataset"]["counts"]
    assert counts == {
        "train": dict.fromkeys(CLASSES, 13),
        "val": dict.fromkeys(CLASSES, 2),
        "test": dict.fromkeys(CLASSES, 7),
    }


def test_optimizer_runs_at_the_requested_learning_rate(flat_run):
    run, _ = flat_run
    assert float(run.model.optimizer.learning_rate) == pytest.approx(0.01)
    assert metadata_of(run)["training"]["options"]["learning_rate"] == 0.01


def nearest_colour(image: np.ndarray) -> str:
    """Return the class colour nearest to a model input's mean pixel, scaled back by hand."""
    mean = ((image + 1.0) * 127.5).mean(axis=(0, 1))
    return min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())


def test_training_batches_mix_the_classes_and_keep_images_with_labels(flat_run):
    _, recorder = flat_run
    batches, labels = recorder.train_batches, []
    for index in range(len(batches)):
        images, one_hot = batches[index]
        named = [CLASSES[k] for k in one_hot.argmax(axis=1)]
        assert [nearest_colour(image) for image in images] == named
        labels += one_hot.argmax(axis=1).tolist()
    assert sorted(labels) == [0] * 13 + [1] * 13 + [2] * 13
    assert labels != sorted(labels)  # the loader lists samples class by class: fit must not


def test_seed_fixes_the_initial_weights(flat_run, mislabelled_test_run, overfitting_run):
    runs = (flat_run, mislabelled_test_run, overfitting_run)  # seeds 1, 1 and 2
    seed_1, again, seed_2 = (recorder.initial_weights for _, recorder in runs)
    for first, second in zip(seed_1, again, strict=True):
        np.testing.assert_array_equal(first, second)
    assert any(not np.array_equal(a, b) for a, b in zip(seed_1, seed_2, strict=True))


# The test split's report.


def test_evaluation_counts_test_predictions_by_true_and_predicted_class(mislabelled_test_run):
    run, _ = mislabelled_test_run
    assert run.evaluation.confusion.tolist() == [[3, 0, 1], [0, 3, 0], [0, 1, 3]]
    evaluation = metadata_of(run)["training"]["evaluation"]
    assert evaluation["test_accuracy"] == pytest.approx(9 / 11)
    assert evaluation["per_class"] == {
        "blue": {"precision": 1.0, "recall": pytest.approx(3 / 4), "support": 4},
        "green": {"precision": pytest.approx(3 / 4), "recall": 1.0, "support": 3},
        "red": {"precision": pytest.approx(3 / 4), "recall": pytest.approx(3 / 4), "support": 4},
    }
    files = [sample.source for sample in run.dataset.splits["test"]]
    assert sorted(drawn_colour(p) != p.parent.name for p in files) == [False] * 9 + [True] * 2
    true, probabilities = evaluate_by_hand(run.model, files)
    assert evaluation["test_loss"] == pytest.approx(
        crossentropy(probabilities, true), rel=1e-4, abs=1e-5
    )


# Early stopping.


def test_early_stopping_stops_patience_epochs_after_the_lowest_validation_loss(overfitting_run):
    run, recorder = overfitting_run
    best = int(np.argmin(recorder.val_loss))
    assert best > 0  # the data make validation loss fall for a few epochs first
    assert len(recorder.val_loss) < metadata_of(run)["training"]["options"]["epochs"]
    assert len(recorder.val_loss) == best + 1 + 2  # patience 2
    training = metadata_of(run)["training"]
    assert (training["epochs_run"], training["best_epoch"]) == (len(recorder.val_loss), best + 1)


def test_trained_and_exported_weights_are_those_of_the_best_epoch(overfitting_run):
    run, recorder = overfitting_run
    best_weights = recorder.weights[int(np.argmin(recorder.val_loss))]
    last_weights = recorder.weights[-1]
    assert any(
        not np.array_equal(b, last) for b, last in zip(best_weights, last_weights, strict=True)
    )
    exported = keras.models.model_from_json((run.folder / model_dir.MODEL_JSON).read_text())
    exported.load_weights(run.folder / model_dir.WEIGHTS)
    for model in (run.model, exported):
        for got, expected in zip(model.get_weights(), best_weights, strict=True):
            np.testing.assert_array_equal(got, expected)
    files = [sample.source for sample in run.dataset.splits["val"]]
    true, probabilities = evaluate_by_hand(exported, files)
    assert crossentropy(probabilities, true) == pytest.approx(
        min(recorder.val_loss), rel=1e-4, abs=1e-5
    )


# Images stay with their labels.

# Pairing folder: image i of class k is one flat colour (v, 255 - v, 60), v = 10 + 85k + 4i,
# so every image's pixels name the image and its class, whatever order it arrives in.
PAIRING_CLASSES = ("dim", "mid", "vivid")
PAIRING_PER_CLASS = 15
PAIRING_SPEC = InputSpec(SIZE, SIZE, 3, rescale=1 / 127.5, offset=-1.0)


def pairing_value(label: int, index: int) -> int:
    return 10 + 85 * label + 4 * index


@pytest.fixture(scope="module")
def pairing_folder(tmp_path_factory) -> Path:
    """Return root/<class>/<v>.png, each image one flat colour made from its value v."""
    root = tmp_path_factory.mktemp("pairing") / "values"
    for label, name in enumerate(PAIRING_CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(PAIRING_PER_CLASS):
            v = pairing_value(label, index)
            Image.new("RGB", (SIZE, SIZE), (v, 255 - v, 60)).save(root / name / f"{v}.png")
    return root


def value_parts(v: int) -> tuple[int, int]:
    """Return (label, index) of the pairing image whose value is v."""
    label, rest = divmod(v - 10, 85)
    assert rest % 4 == 0 and rest // 4 < PAIRING_PER_CLASS, f"no image has value {v}"
    return label, rest // 4


def class_of_value(v: int) -> int:
    return value_parts(v)[0]


def batch_values(images: np.ndarray) -> list[int]:
    """Return each model input's value v, checking it is the flat colour (v, 255 - v, 60)."""
    pixels = np.rint((images + 1.0) * 127.5).astype(np.int64)
    values = []
    for image in pixels:
        v = int(image[0, 0, 0])
        assert (image == [v, 255 - v, 60]).all(), "not one flat colour of the pairing folder"
        values.append(v)
    return values


def assert_batches_pair_images_with_labels(batches: data.ImageBatches, classes: int) -> list[int]:
    """Check one epoch: every label is the one-hot of its image's class; return the values."""
    seen = []
    for index in range(len(batches)):
        images, labels = batches[index]
        values = batch_values(images)
        expected = np.eye(classes, dtype=np.float32)[[class_of_value(v) for v in values]]
        np.testing.assert_array_equal(labels, expected)
        seen += values
    return seen


def mixed(samples: list[data.Sample]) -> list[data.Sample]:
    """Return the samples in an order of our own.

    The loaders list samples class by class, which would hide labels looked up by position
    rather than by sample.
    """
    return [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]


def test_folder_splits_keep_each_file_with_its_class_folder(pairing_folder):
    dataset = data.load_folder(pairing_folder, PAIRING_SPEC, 0.2, 0.2, seed=4)
    assert dataset.classes == PAIRING_CLASSES
    sizes = {"train": 9, "val": 3, "test": 3}  # 15 per class, 20% = 3 each for val and test
    every_file = []
    for split, samples in dataset.splits.items():
        assert len(samples) == sizes[split] * len(PAIRING_CLASSES)
        for sample in samples:
            assert PAIRING_CLASSES[sample.label] == sample.source.parent.name
            assert class_of_value(int(sample.source.stem)) == sample.label
            every_file.append(sample.source)
    assert sorted(every_file) == sorted(pairing_folder.glob("*/*.png"))


def test_shuffled_batches_pair_each_image_with_its_label_in_every_epoch(pairing_folder):
    samples = mixed(
        data.load_folder(pairing_folder, PAIRING_SPEC, 0.2, 0.2, seed=4).splits["train"]
    )
    batches = data.ImageBatches(samples, 3, PAIRING_SPEC, batch_size=4, shuffle_seed=5)
    expected = sorted(int(sample.source.stem) for sample in samples)
    orders = []
    for _ in range(3):
        seen = assert_batches_pair_images_with_labels(batches, 3)
        assert sorted(seen) == expected  # every image once per epoch, none twice
        orders.append(seen)
        batches.on_epoch_end()
    assert len({tuple(order) for order in orders}) == 3  # reshuffled each epoch


def test_unshuffled_batches_keep_the_sample_order(pairing_folder):
    samples = mixed(data.load_folder(pairing_folder, PAIRING_SPEC, 0.2, 0.2, seed=4).splits["test"])
    batches = data.ImageBatches(samples, 3, PAIRING_SPEC, batch_size=4)
    seen = assert_batches_pair_images_with_labels(batches, 3)
    batches.on_epoch_end()
    again = assert_batches_pair_images_with_labels(batches, 3)
    assert seen == again == [int(sample.source.stem) for sample in samples]
    assert batches.labels.tolist() == [class_of_value(v) for v in seen]


def test_pre_split_folders_keep_their_files_in_their_split_and_class(tmp_path, pairing_folder):
    for split in ("train", "test"):
        for name in PAIRING_CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
    for path in pairing_folder.glob("*/*.png"):
        split = "test" if value_parts(int(path.stem))[1] % 2 else "train"  # odd index: test/
        (tmp_path / split / path.parent.name / path.name).write_bytes(path.read_bytes())
    dataset = data.load_folder(tmp_path, PAIRING_SPEC, 0.25, 0.1, seed=4)
    for split, samples in dataset.splits.items():
        folder = "test" if split == "test" else "train"
        for sample in samples:
            assert sample.source.parent.parent.name == folder
            assert class_of_value(int(sample.source.stem)) == sample.label
    # Per class: 7 odd indices in test/; of the 8 in train/, round(8 x 0.25) = 2 carved for val.
    sizes = {split: len(samples) for split, samples in dataset.splits.items()}
    assert sizes == {"train": 3 * 6, "val": 3 * 2, "test": 3 * 7}


def test_grayscale_batches_hold_each_images_luma(pairing_folder):
    samples = data.load_folder(pairing_folder, PAIRING_SPEC, 0.2, 0.2, seed=4).splits["train"]
    spec = InputSpec(SIZE, SIZE, 1, rescale=1 / 127.5, offset=-1.0)
    images, _ = data.ImageBatches(samples, 3, spec, batch_size=len(samples))[0]
    assert images.shape == (len(samples), SIZE, SIZE, 1)
    values = np.array([int(sample.source.stem) for sample in samples], dtype=np.float64)
    luma = 0.299 * values + 0.587 * (255 - values) + 0.114 * 60  # ITU-R 601-2
    expected = np.broadcast_to(luma[:, None, None, None], images.shape)
    np.testing.assert_allclose((images + 1.0) * 127.5, expected, atol=1.0)


# The synthetic shapes: the geometry of each drawing says which shape it is.


def shape_of(pixels: np.ndarray) -> str:
    """Name the shape in a shapes image by measuring it: shapes are one exact colour, no noise.

    Around the shape's centroid, `inner` is the distance to the nearest background pixel and
    `outer` to the farthest shape pixel. inner/outer: circle 1, square 0.71, cross 0.45 (its
    inner corners), triangle 0.5; area/outer^2 parts triangle (1.3) from cross (2.0).
    """
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    mask = (pixels == colours[counts.argmax()]).all(axis=2)
    padded = np.pad(mask, 1)
    mask &= padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    ys, xs = np.nonzero(mask)
    centre_y, centre_x = ys.mean(), xs.mean()
    outer = np.hypot(ys - centre_y, xs - centre_x).max()
    background_y, background_x = np.nonzero(~mask)
    inner = np.hypot(background_y - centre_y, background_x - centre_x).min()
    if inner / outer > 0.88:
        return "circle"
    if mask.sum() / outer**2 < 1.7:
        return "triangle"
    return "square" if inner / outer > 0.61 else "cross"


def test_shape_measure_tells_the_four_shapes_apart():
    rng = np.random.default_rng(21)
    for shape in ("circle", "square", "triangle", "cross"):
        for _ in range(5):
            assert shape_of(np.asarray(shapes.draw_shape(shape, rng))) == shape


def test_synthetic_splits_and_batches_pair_each_drawing_with_its_shape():
    dataset = data.load_shapes(8, 0.25, 0.25, seed=6)
    assert set(dataset.classes) == {"circle", "square", "triangle", "cross"}
    for samples in dataset.splits.values():
        for sample in samples:
            with Image.open(io.BytesIO(sample.source)) as image:
                assert shape_of(np.asarray(image.convert("RGB"))) == dataset.classes[sample.label]
    spec = InputSpec(shapes.RENDER_SIZE, shapes.RENDER_SIZE, 3, rescale=1 / 127.5, offset=-1.0)
    train_samples = dataset.splits["train"]
    assert len(train_samples) == 4 * 4
    batches = data.ImageBatches(train_samples, 4, spec, batch_size=5, shuffle_seed=7)
    for _ in range(2):
        seen = 0
        for index in range(len(batches)):
            images, labels = batches[index]
            for image, label in zip(images, labels, strict=True):
                pixels = np.rint((image + 1.0) * 127.5).astype(np.uint8)
                assert shape_of(pixels) == dataset.classes[int(label.argmax())]
                assert label.sum() == 1.0
                seen += 1
        assert seen == len(train_samples)
        batches.on_epoch_end()
