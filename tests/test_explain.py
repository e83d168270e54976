"""Grad-CAM explanations: against an independent truth (where a trained CNN's shape is),
against Grad-CAM computed with Keras directly, on both backends, and in their own lane.

The located CNN is trained here, in seconds, on synthetic images whose class is the kind of
a bright shape (square, cross, ring) placed at a random position on a textured background:
its evidence for a class can only be the shape, so the heatmap must find it.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from service.frontend.app import create_app
from service.settings import Settings
from tests.conftest import image_bytes, make_cnn, run_python, write_model

pytestmark = pytest.mark.slow

SIZE = 32
KINDS = ("square", "cross", "ring")
DARK_GREY = image_bytes((32, 32), color=(64, 64, 64))  # the fault app holds its explanation


def draw(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return one image (uint8 RGB) of a bright `kind` at a random place on stripes and
    noise, and the shape's mask."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    frequency, angle, phase = rng.uniform(0.2, 0.8), rng.uniform(0, np.pi), rng.uniform(0, 6.3)
    stripes = np.sin(frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    background = 60 + 40 * stripes + rng.normal(0, 15, (SIZE, SIZE))
    cy, cx = rng.integers(6, SIZE - 6, 2)
    if kind == "square":
        mask = (abs(yy - cy) <= 3) & (abs(xx - cx) <= 3)
    elif kind == "cross":
        mask = ((abs(yy - cy) <= 1) & (abs(xx - cx) <= 4)) | (
            (abs(xx - cx) <= 1) & (abs(yy - cy) <= 4)
        )
    else:
        distance = np.hypot(yy - cy, xx - cx)
        mask = (distance <= 4.5) & (distance >= 2.5)
    gray = background.copy()
    gray[mask] = rng.uniform(200, 255)
    channels = [gray * rng.uniform(0.8, 1.2) for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), mask


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    drawn = [draw(KINDS[i % 3], rng) for i in range(count)]
    images = np.array([image for image, _ in drawn])
    return images, np.arange(count) % 3, np.array([mask for _, mask in drawn])


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def heatmap_of(explanation: dict) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(explanation["heatmap"])))
    assert image.mode == "L" and image.size == (SIZE, SIZE)
    return np.asarray(image)


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """Train the CNN (the design's layers) on the located shapes; write its model folder."""
    images, labels, _ = dataset(3000, seed=0)
    model = make_cnn(classes=3, seed=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32) / 255.0, labels, epochs=10, batch_size=64, verbose=0)
    folder = write_model(tmp_path_factory.mktemp("located") / "located" / "1", model, KINDS)
    return folder, model


@pytest.fixture(scope="module")
def located_client(located):
    """A Flask client of the app around the located model, its runner in this process."""
    from service.runner.runtime import load_classifier

    folder, _ = located
    app = create_app(Settings(model_dir=str(folder.parent)), load_classifier(folder, 16))
    yield app.test_client()
    app.extensions["runner"].close(timeout=5)


def explain(client, images: list[bytes]) -> list[dict]:
    files = {f"image{i}": (io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)}
    response = client.post("/predict?explain=gradcam", data=files)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["predictions"]


def keras_gradcam(model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM written out here with TensorFlow's GradientTape: the last Conv2D's
    activations, the top class's score before the softmax, and the map at the input size."""
    import keras
    import tensorflow as tf

    conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    probe = keras.Model(model.inputs, [conv.output, model.layers[-1].input])
    x = tf.constant(pixels.astype(np.float32) / 255.0)
    with tf.GradientTape() as tape:
        activations, scores = probe(x, training=False)
        top = tf.argmax(scores, axis=-1)
        chosen = tf.reduce_sum(tf.gather(scores, top, axis=1, batch_dims=1))
    grads = tape.gradient(chosen, activations).numpy()
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * activations.numpy()).sum(-1), 0)
    maps = []
    for cam in cams:
        big = np.asarray(
            Image.fromarray(cam.astype(np.float32), "F").resize((SIZE, SIZE), Image.BILINEAR)
        )
        maps.append(np.rint(255 * big / big.max()) if big.max() > 0 else np.zeros_like(big))
    return top.numpy(), np.array(maps)


def test_the_hottest_part_of_the_heatmap_lies_on_the_shape_for_most_images(located_client):
    from scipy import ndimage

    images, labels, masks = dataset(45, seed=1)
    predictions = explain(located_client, [png(image) for image in images])
    right = [p["label"] == KINDS[label] for p, label in zip(predictions, labels, strict=True)]
    assert np.mean(right) >= 0.8, "the located CNN did not learn its shapes"
    on_shape = []
    for prediction, mask in zip(predictions, masks, strict=True):
        about = prediction["explanation"]
        assert (about["method"], about["class"]) == ("gradcam", prediction["label"])
        heatmap = heatmap_of(about)
        y, x = np.unravel_index(heatmap.argmax(), heatmap.shape)
        # The map comes from an 8x8 grid of activations: a pixel of slack around the shape.
        on_shape.append(bool(ndimage.binary_dilation(mask, iterations=2)[y, x]))
    # By chance (a random pixel) about one in eight would land there.
    assert np.mean(on_shape) >= 0.7, f"{sum(on_shape)} of {len(on_shape)} on the shape"


def test_the_heatmap_is_grad_cam_as_keras_computes_it(located_client, located):
    import keras

    _, model = located
    last_conv = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    images, _, _ = dataset(6, seed=2)
    predictions = explain(located_client, [png(image) for image in images])
    top, expected = keras_gradcam(model, images)
    for prediction, index, heatmap in zip(predictions, top, expected, strict=True):
        assert prediction["explanation"]["class"] == KINDS[index]
        assert prediction["explanation"]["layer"] == last_conv
        got = heatmap_of(prediction["explanation"]).astype(int)
        assert np.abs(got - heatmap).max() <= 2


def test_jax_explains_as_tensorflow_does(located, tmp_path):
    from service.runner.runtime import load_classifier

    folder, _ = located
    images, _, _ = dataset(4, seed=3)
    inputs = images.astype(np.float32) / 255.0
    np.save(tmp_path / "inputs.npy", inputs)
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from service.runner.runtime import BACKEND, load_classifier\n"
        "layer, top, maps = load_classifier(sys.argv[1], 8).explain(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], maps)\n"
        "print(json.dumps({'backend': BACKEND, 'layer': layer, 'top': top.tolist()}))\n"
    )
    result = run_python(
        ["-c", script, str(folder), str(tmp_path / "inputs.npy"), str(tmp_path / "maps.npy")],
        KERAS_BACKEND="jax",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    layer, top, maps = load_classifier(folder, 8).explain(inputs)
    assert report == {"backend": "jax", "layer": layer, "top": top.tolist()}
    assert np.abs(np.load(tmp_path / "maps.npy").astype(int) - maps.astype(int)).max() <= 2


def test_v2_asks_by_parameter_and_gets_the_same_heatmaps(located_client):
    images, _, _ = dataset(2, seed=4)
    expected = explain(located_client, [png(image) for image in images])
    body = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [2, SIZE, SIZE, 3],
                "data": images.ravel().tolist(),
            }
        ],
        "parameters": {"explain": "gradcam"},
    }
    response = located_client.post("/v2/models/located/infer", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    explained = response.get_json()["parameters"]["explanations"]
    assert explained == [p["explanation"] for p in expected]


def test_an_unknown_method_is_400(located_client):
    response = located_client.post(
        "/predict?explain=lime", data=png(dataset(1, 5)[0][0]), content_type="image/png"
    )
    assert response.status_code == 400
    assert "explain must be one of gradcam" in response.get_json()["error"]["message"]


def test_a_model_without_a_convolution_is_400(tmp_path):
    import keras

    from service.runner.runtime import load_classifier

    flat = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
            keras.layers.Activation("softmax"),
        ]
    )
    folder = write_model(tmp_path / "flat" / "1", flat, KINDS)
    app = create_app(Settings(model_dir=str(folder.parent)), load_classifier(folder, 4))
    try:
        client = app.test_client()
        data = png(dataset(1, 6)[0][0])
        assert client.post("/predict", data=data, content_type="image/png").status_code == 200
        response = client.post("/predict?explain=gradcam", data=data, content_type="image/png")
    finally:
        app.extensions["runner"].close(timeout=5)
    assert response.status_code == 400
    assert "has no convolution layer" in response.get_json()["error"]["message"]


def test_explanations_have_their_own_bounded_lane(fault_server):
    server, control = fault_server(EXPLAIN_CONCURRENCY="1")
    url = server.url + "/predict"
    headers = {"Content-Type": "image/png"}

    def explained(data: bytes) -> requests.Response:
        return requests.post(url + "?explain=gradcam", data=data, headers=headers, timeout=60)

    with ThreadPoolExecutor(5) as pool:
        held = pool.submit(explained, DARK_GREY)
        control.wait_held(1, kind="explain-")
        # One explanation runs and one may wait; of four more, three are refused at once.
        more = [pool.submit(explained, DARK_GREY) for _ in range(4)]
        deadline = time.monotonic() + 60
        while sum(future.done() for future in more) < 3:
            assert time.monotonic() < deadline, "explanations over the bound were not refused"
            time.sleep(0.02)
        refused = [future.result() for future in more if future.done()]
        assert [r.status_code for r in refused] == [503] * 3
        assert all("Retry-After" in r.headers for r in refused)
        # A plain prediction is not queued behind the explanations.
        plain = requests.post(url, data=image_bytes((32, 32)), headers=headers, timeout=30)
        assert plain.status_code == 200
        assert not held.done()
        control.release(1, kind="explain-")
        control.release(2, kind="explain-")
        waiting = [f for f in more if f.result(timeout=60).status_code != 503]
        assert held.result(timeout=60).status_code == 200
        assert [f.result().status_code for f in waiting] == [200]
