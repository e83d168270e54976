"""The page at /, in a real browser: Debian's Chromium, driven by playwright, against a real
gunicorn serving the small Keras model. Expected answers come from /predict itself, asked
with requests for the same files, never from the page.

With PAGE_SCREENSHOT=<path> the three-image test also saves the page there (make screenshot).
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from service.frontend.http.page import assets as page_files
from tests.conftest import (
    LABELS,
    ROOT,
    free_port,
    image_bytes,
    start_server,
    unavailable,
    write_model,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "page-test-token"
EXAMPLES = [ROOT / "examples" / f"{shape}.png" for shape in ("circle", "square", "triangle")]
# Seconds to wait for what the page shows after a request or a metrics poll (every 3 s).
SHOWN_WITHIN_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Launch Debian's Chromium (never a downloaded one) through playwright."""
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (the dev extra)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    started = start_server(model_dir, tmp_path_factory.mktemp("page-server"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory, model_dir):
    started = start_server(model_dir, tmp_path_factory.mktemp("page-token"), API_TOKEN=TOKEN)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, model_dir):
    """Start a server taking two images a request, with /metrics on a port of its own."""
    started = start_server(
        model_dir,
        tmp_path_factory.mktemp("page-limited"),
        MAX_IMAGES_PER_REQUEST="2",
        METRICS_PORT=str(free_port()),
    )
    yield started
    started.stop()


@pytest.fixture(scope="module")
def flat_server(tmp_path_factory):
    """Start a server of a model without a convolution layer: it classifies, but has no
    Grad-CAM to give."""
    import keras

    flat = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(len(LABELS)),
            keras.layers.Activation("softmax"),
        ]
    )
    folder = tmp_path_factory.mktemp("page-flat")
    write_model(folder / "flat" / "1", flat, LABELS)
    started = start_server(folder / "flat", folder)
    yield started
    started.stop()


@dataclass
class Visit:
    """One browser tab on the page, with every request it made and every error it logged."""

    page: object
    requests: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # statuses >= 400 the service answered
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    def unexplained_errors(self) -> list[str]:
        """Return the errors logged, less Chromium's one line per refused response."""
        errors = list(self.errors)
        for status in self.refused:
            line = f"Failed to load resource: the server responded with a status of {status} "
            logged = [e for e in errors if e.startswith(line)]
            assert logged, f"no console line for a {status}: {errors}"
            errors.remove(logged[0])
        return errors


@pytest.fixture
def visit(browser) -> Iterator[Callable[..., Visit]]:
    """Open the page of a server in a fresh browser context; close them all afterwards."""
    contexts = []

    def open_page(url: str, width: int = 1280, height: int = 900) -> Visit:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        seen = Visit(page)
        page.on("request", lambda request: seen.requests.append(request.url))
        page.on(
            "response",
            lambda response: (
                seen.refused.append(response.status) if response.status >= 400 else None
            ),
        )
        page.on(
            "console",
            lambda message: seen.errors.append(message.text) if message.type == "error" else None,
        )
        page.on("pageerror", lambda error: seen.errors.append(str(error)))
        page.goto(url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        return seen

    yield open_page
    for context in contexts:
        context.close()


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write each file into `folder`; return their paths, in order."""
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def predict(url: str, paths: list[Path], query: str = "", **headers: str) -> requests.Response:
    """Ask /predict directly about the files, all in one multipart request."""
    parts = [(path.name, (path.name, path.read_bytes())) for path in paths]
    return requests.post(f"{url}/predict{query}", files=parts, headers=headers, timeout=30)


def predict_requests(visit: Visit) -> list[dict[str, list[str]]]:
    """Return the query parameters of each /predict request the page made, in order."""
    return [parse_qs(urlsplit(url).query) for url in visit.requests if "/predict" in url]


def upload(visit: Visit, paths: list[Path]) -> None:
    """Choose the files in the page's file input, as a user does in the file dialog."""
    visit.page.set_input_files("#files", [str(path) for path in paths])


def wait_answered(visit: Visit, count: int) -> list:
    """Wait until `count` cards are answered or refused; return every card, newest first."""
    visit.page.wait_for_function(
        f"document.querySelectorAll('.card:not([aria-busy])').length >= {count}",
        timeout=SHOWN_WITHIN_MS,
    )
    return visit.page.query_selector_all(".card")


def card_named(visit: Visit, name: str):
    (card,) = [
        c
        for c in visit.page.query_selector_all(".card")
        if c.query_selector(".name").inner_text() == name
    ]
    return card


def test_loading_the_page_requests_nothing_outside_the_services_origin(server, visit):
    tab = visit(server.url)
    tab.page.wait_for_function(
        "document.querySelector('#metrics-status').textContent.startsWith('Inference')"
    )
    origin = urlsplit(server.url)
    paths = set()
    for url in tab.requests:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc), url
        paths.add(parts.path)
    files = {f"/page/{name}" for name in page_files() if name != "index.html"}
    assert files | {"/", "/readyz", "/metrics", "/v2/models/shapes/versions/2"} == paths
    assert "shapes" in tab.page.inner_text("#models")
    assert "circle, square, triangle" in tab.page.inner_text("#models")
    assert not tab.unexplained_errors()


def test_three_uploaded_images_show_the_labels_and_probabilities_of_predict(server, visit):
    tab = visit(server.url)
    expected = predict(server.url, EXAMPLES).json()["predictions"]
    upload(tab, EXAMPLES)
    wait_answered(tab, 3)
    for path, answer in zip(EXAMPLES, expected, strict=True):
        card = card_named(tab, path.name)
        bars = card.query_selector_all(".bar")
        assert len(bars) == len(answer["top"])
        for bar, top in zip(bars, answer["top"], strict=True):
            assert bar.query_selector(".label").inner_text() == top["label"]
            assert float(bar.get_attribute("data-probability")) == pytest.approx(
                top["probability"], rel=1e-6
            )
            shown = float(bar.query_selector(".value").inner_text().rstrip("%"))
            assert shown == pytest.approx(top["probability"] * 100, abs=0.05)
        timing = card.query_selector(".timing").inner_text()
        assert re.search(r"Round trip [\d.]+ ms for 3 images in one request", timing), timing
        assert re.search(r"the server took [\d.]+ ms \(read [\d.]+ ms, model [\d.]+ ms\)", timing)
    assert "3 images classified" in tab.page.inner_text("#summary")
    card_named(tab, EXAMPLES[0].name).query_selector("summary").click()
    assert (
        "triangle" in card_named(tab, EXAMPLES[0].name).query_selector(".distribution").inner_text()
    )
    assert sum("/predict" in url for url in tab.requests) == 1, "three images, one request"
    assert "explain" not in predict_requests(tab)[0], "the Explain switch starts off"
    assert not tab.page.query_selector_all(".heatmap, .explanation:not([hidden])")
    if os.environ.get("PAGE_SCREENSHOT"):
        tab.page.wait_for_function(
            "document.querySelectorAll('#chart-rate rect').length > 0", timeout=SHOWN_WITHIN_MS
        )
        tab.page.screenshot(path=os.environ["PAGE_SCREENSHOT"], full_page=True)
    assert not tab.unexplained_errors()


def test_a_non_image_shows_the_services_message_in_its_card_and_the_page_stays_usable(
    server, visit, tmp_path
):
    good, notes = write_files(
        tmp_path, {"good.png": image_bytes(seed=1), "notes.txt": b"not an image at all\n"}
    )
    refused = predict(server.url, [notes])
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    tab = visit(server.url)
    upload(tab, [good, notes])
    wait_answered(tab, 2)
    assert message in card_named(tab, "notes.txt").query_selector(".error").inner_text()
    assert card_named(tab, "good.png").query_selector_all(".bar")
    assert "1 image classified, 1 refused" in tab.page.inner_text("#summary")
    (again,) = write_files(tmp_path, {"again.jpg": image_bytes(fmt="JPEG", seed=2)})
    upload(tab, [again])
    wait_answered(tab, 3)
    assert card_named(tab, "again.jpg").query_selector_all(".bar")
    assert tab.refused == [400, 400], "the request of both, then notes.txt alone"
    assert not tab.unexplained_errors()


def test_with_a_token_set_the_page_asks_for_it_and_a_wrong_one_shows_the_401_message(
    token_server, visit, tmp_path
):
    first, second, third = write_files(
        tmp_path, {f"{n}.png": image_bytes(seed=i) for i, n in enumerate(("one", "two", "three"))}
    )
    wrong = predict(token_server.url, [first], Authorization="Bearer wrong")
    assert wrong.status_code == 401
    message = wrong.json()["error"]["message"]
    tab = visit(token_server.url)
    dialog = tab.page.locator("#token-dialog")

    upload(tab, [first])
    dialog.wait_for(state="visible")
    assert message in dialog.inner_text()
    tab.page.get_by_label("Token", exact=True).fill("wrong")
    with tab.page.expect_response(lambda r: "/predict" in r.url and r.status == 401):
        tab.page.get_by_role("button", name="Use this token").click()
    dialog.wait_for(state="visible")
    assert message in tab.page.inner_text("#token-error")
    tab.page.get_by_role("button", name="Cancel").click()
    wait_answered(tab, 1)
    refused = card_named(tab, "one.png").query_selector(".error").inner_text()
    assert message in refused and "HTTP 401" in refused

    upload(tab, [second])
    dialog.wait_for(state="visible")
    tab.page.get_by_label("Token", exact=True).fill(TOKEN)
    tab.page.get_by_role("button", name="Use this token").click()
    wait_answered(tab, 2)
    assert card_named(tab, "two.png").query_selector_all(".bar")
    assert tab.page.evaluate("sessionStorage.getItem('cnn-serving.token')") == TOKEN

    upload(tab, [third])  # asked once: the kept token goes with every request now
    wait_answered(tab, 3)
    assert card_named(tab, "three.png").query_selector_all(".bar")
    assert not dialog.is_visible()
    assert tab.refused == [401, 401, 401]
    assert not tab.unexplained_errors()


def test_a_401_while_the_token_dialog_is_open_keeps_the_typing_and_every_image_gets_answered(
    token_server, visit, tmp_path
):
    paths = write_files(tmp_path, {f"{n}.png": image_bytes(seed=30 + n) for n in range(4)})
    bearer = f"Bearer {TOKEN}"
    expected = [predict(token_server.url, [p], Authorization=bearer).json() for p in paths]
    message = predict(token_server.url, paths[:1]).json()["error"]["message"]
    tab = visit(token_server.url)
    dialog = tab.page.locator("#token-dialog")
    field = tab.page.get_by_label("Token", exact=True)
    waiting = """(count) => [...document.querySelectorAll('.card .pending')]
        .filter((p) => p.textContent === 'Waiting for the token…').length === count"""

    for path in paths[:3]:  # three requests, one after another, each refused for want of a token
        upload(tab, [path])
    dialog.wait_for(state="visible")
    field.press_sequentially("wro")
    refused = tab.page.expect_response(
        lambda r: "/predict" in r.url and r.status == 401, timeout=SHOWN_WITHIN_MS
    )
    with refused:
        upload(tab, [paths[3]])  # one more, refused while the user types
    tab.page.wait_for_function(waiting, arg=4, timeout=SHOWN_WITHIN_MS)
    assert dialog.is_visible()
    assert field.input_value() == "wro", "a 401 while the dialog is open keeps what was typed"
    field.press_sequentially("ng")
    carrying = tab.page.expect_request(
        lambda r: "/predict" in r.url and r.headers.get("authorization") == "Bearer wrong"
    )
    with carrying:
        tab.page.get_by_role("button", name="Use this token").click()

    said = "document.querySelector('#token-error').textContent.startsWith('The service refused')"
    tab.page.wait_for_function(said, timeout=SHOWN_WITHIN_MS)
    tab.page.wait_for_function(waiting, arg=4, timeout=SHOWN_WITHIN_MS)  # all four asked again
    assert dialog.is_visible()
    assert message in tab.page.inner_text("#token-error")
    assert field.input_value() == ""
    field.fill(TOKEN)
    tab.page.get_by_role("button", name="Use this token").click()
    wait_answered(tab, 4)
    for path, answer in zip(paths, expected, strict=True):
        labels = [
            bar.inner_text() for bar in card_named(tab, path.name).query_selector_all(".bar .label")
        ]
        assert labels == [top["label"] for top in answer["predictions"][0]["top"]], path.name
    assert "4 images classified." in tab.page.inner_text("#summary")
    assert not dialog.is_visible()
    assert tab.page.evaluate("sessionStorage.getItem('cnn-serving.token')") == TOKEN
    assert tab.refused == [401] * 8, "four without a token, four after the wrong one"
    assert sum("/predict" in url for url in tab.requests) == 12
    assert not tab.unexplained_errors()


def metric_text(visit: Visit, element: str) -> str:
    return visit.page.inner_text(f"#metric-{element}")


def test_the_metrics_panel_counts_the_uploaded_requests(server, visit, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    tab = visit(server.url)
    tab.page.wait_for_function(
        "document.querySelector('#metrics-status').textContent.startsWith('Inference')"
    )
    before = int(metric_text(tab, "total"))
    upload(tab, write_files(tmp_path, {f"{n}.png": image_bytes(seed=n) for n in range(2)}))
    wait_answered(tab, 2)
    shown = f"document.querySelector('#metric-total').textContent === '{before + 1}'"
    tab.page.wait_for_function(shown, timeout=SHOWN_WITHIN_MS)
    scraped = requests.get(server.url + "/metrics", timeout=10).text
    (family,) = [
        f
        for f in text_string_to_metric_families(scraped)
        if f.name == "cnn_model_request_duration_seconds"
    ]
    counts = [s.value for s in family.samples if s.name.endswith("_count")]
    assert int(metric_text(tab, "total")) == sum(counts) > 0
    # The poll after the upload saw one request of two images, run as one batch of two.
    batch = "document.querySelector('#metric-batch').textContent === '2.0'"
    tab.page.wait_for_function(batch, timeout=SHOWN_WITHIN_MS)
    assert float(metric_text(tab, "rate")) > 0
    assert metric_text(tab, "p50").endswith(" ms") and metric_text(tab, "p99").endswith(" ms")
    assert metric_text(tab, "queue") == "0"
    assert tab.page.locator("#chart-batch rect").count() >= 1
    assert not tab.unexplained_errors()


PHONE_WIDTH = 390


def test_the_page_works_on_a_390_px_wide_screen(server, visit, tmp_path):
    formats = {"JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}
    files = {
        f"a-photo-with-a-rather-long-file-name.{ext}": image_bytes((640, 480), fmt=fmt, seed=i)
        for i, (fmt, ext) in enumerate(formats.items())
    }
    tab = visit(server.url, width=PHONE_WIDTH, height=844)
    upload(tab, write_files(tmp_path, files))
    cards = wait_answered(tab, len(files))
    assert len(cards) == len(files)
    assert tab.page.evaluate("document.scrollingElement.scrollWidth") <= PHONE_WIDTH
    for card in cards:
        assert card.query_selector_all(".bar"), card.inner_text()
        box = card.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE_WIDTH
        card.scroll_into_view_if_needed()
        assert card.is_visible()
    assert not tab.unexplained_errors()


def test_the_keyboard_reaches_the_labelled_file_input_and_opens_it(server, visit):
    tab = visit(server.url)
    for _ in range(15):
        tab.page.keyboard.press("Tab")
        if tab.page.evaluate("document.activeElement.id") == "files":
            break
    else:
        raise AssertionError("Tab never reached the file input")
    assert tab.page.get_by_label("Choose images…").get_attribute("id") == "files"
    outline = "getComputedStyle(document.querySelector('label[for=files]')).outlineStyle"
    assert tab.page.evaluate(outline) == "solid", "the focused input's label shows the focus"
    with tab.page.expect_file_chooser() as chooser:
        tab.page.keyboard.press("Space")
    chooser.value.set_files([str(EXAMPLES[0])])
    wait_answered(tab, 1)
    assert card_named(tab, EXAMPLES[0].name).query_selector_all(".bar")
    assert not tab.unexplained_errors()


def test_images_over_the_services_limit_a_request_are_each_sent_alone(
    limited_server, visit, tmp_path
):
    paths = write_files(tmp_path, {f"{n}.png": image_bytes(seed=n) for n in range(3)})
    refused = predict(limited_server.url, paths)
    assert refused.status_code == 413
    expected = [predict(limited_server.url, [path]).json()["predictions"][0] for path in paths]
    tab = visit(limited_server.url)
    upload(tab, paths)
    wait_answered(tab, 3)
    for path, answer in zip(paths, expected, strict=True):
        shown = card_named(tab, path.name).query_selector(".bar .label").inner_text()
        assert shown == answer["label"]
    assert sum("/predict" in url for url in tab.requests) == 4, "three at once, then one by one"
    assert 413 in tab.refused
    assert not tab.unexplained_errors()


def test_with_metrics_on_their_own_port_the_panel_says_so(limited_server, visit):
    tab = visit(limited_server.url)
    status = tab.page.locator("#metrics-status")
    status.get_by_text("separate port (METRICS_PORT)").wait_for(timeout=SHOWN_WITHIN_MS)
    assert tab.refused == [404]
    assert not tab.unexplained_errors()


def test_dropped_and_pasted_images_are_classified(server, visit):
    tab = visit(server.url)
    png = base64.b64encode(EXAMPLES[0].read_bytes()).decode()
    send = """([kind, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], `${kind}.png`, { type: "image/png" }));
        const target = kind === "dropped" ? document.querySelector("#drop-zone") : document;
        const event = kind === "dropped"
            ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
            : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
        target.dispatchEvent(event);
    }"""
    tab.page.evaluate(send, ["dropped", png])
    wait_answered(tab, 1)
    tab.page.evaluate(send, ["pasted", png])
    cards = wait_answered(tab, 2)
    names = [card.query_selector(".name").inner_text() for card in cards]
    assert names[1] == "dropped.png" and names[0].startswith("pasted ")
    assert all(card.query_selector_all(".bar") for card in cards)
    assert not tab.unexplained_errors()


def heatmap_pixels(b64_png: str) -> np.ndarray:
    """Return a /predict explanation's heatmap as a grayscale array."""
    image = Image.open(io.BytesIO(base64.b64decode(b64_png)))
    assert image.mode == "L"
    return np.asarray(image)


# The overlay's pixels as the browser decoded them: drawn at its own size, without the
# page's colouring (a canvas ignores CSS filters); the red channel of an opaque grey image.
OVERLAY_PIXELS = """(img) => {
    const canvas = Object.assign(document.createElement("canvas"), {
        width: img.naturalWidth, height: img.naturalHeight });
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
    return { width: canvas.width, height: canvas.height,
             red: Array.from(data.filter((_, i) => i % 4 === 0)),
             opaque: data.every((v, i) => i % 4 !== 3 || v === 255) };
}"""


def rendered(element, size: tuple[int, int]) -> np.ndarray:
    """Return a screenshot of an element, resized (box) to `size`, as float RGB."""
    image = Image.open(io.BytesIO(element.screenshot())).convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def test_with_explain_on_each_card_lays_the_servers_heatmap_over_its_thumbnail(
    server, visit, tmp_path
):
    (wide,) = write_files(tmp_path, {"wide.png": image_bytes((48, 24), seed=7)})
    paths = [*EXAMPLES, wide]
    plain = predict(server.url, paths).json()["predictions"]
    expected = predict(server.url, paths, "?explain=gradcam").json()["predictions"]
    tab = visit(server.url)
    switch = tab.page.get_by_role("switch", name="Explain")
    assert not switch.is_checked()
    switch.focus()
    tab.page.keyboard.press("Space")  # the keyboard works the switch
    assert switch.is_checked()

    upload(tab, paths)
    wait_answered(tab, len(paths))
    (sent,) = predict_requests(tab)
    assert sent["explain"] == ["gradcam"]
    for path, answer, unexplained in zip(paths, expected, plain, strict=True):
        about = answer["explanation"]
        assert about["class"] == answer["label"] == unexplained["label"]
        card = card_named(tab, path.name)
        # The caption names the predicted class and the layer.
        caption = f"Grad-CAM for {answer['label']}, layer {about['layer']}"
        assert card.query_selector(".explanation").inner_text() == caption
        (overlay,) = card.query_selector_all(".thumb img.heatmap")
        assert overlay.get_attribute("title") == caption
        assert answer["label"] in overlay.get_attribute("alt")
        # Its pixels are the server's heatmap, as the browser decoded them.
        heatmap = heatmap_pixels(about["heatmap"])
        shown = overlay.evaluate(OVERLAY_PIXELS)
        assert (shown["height"], shown["width"]) == heatmap.shape == (32, 32)
        assert shown["opaque"]
        assert np.array_equal(np.reshape(shown["red"], heatmap.shape), heatmap), path.name
        # It covers the thumbnail exactly, smoothly scaled and coloured by the page's filter.
        thumb = card.query_selector(".thumb img:not(.heatmap)")
        box, under = overlay.bounding_box(), thumb.bounding_box()
        for key in ("x", "y", "width", "height"):
            assert box[key] == pytest.approx(under[key], abs=0.5), (path.name, key)
        with Image.open(path) as image:
            width, height = image.size
        assert box["width"] / box["height"] == pytest.approx(width / height, rel=0.03)
        assert max(box["width"], box["height"]) > 2 * heatmap.shape[0], "scaled up"
        style = overlay.evaluate(
            "(img) => { const s = getComputedStyle(img);"
            " return [s.filter, s.imageRendering, s.objectFit]; }"
        )
        assert style == ['url("#heat")', "auto", "fill"]

        # Laid over the preview: warmer where the heatmap is hot, untouched where it is cold.
        picture = card.query_selector(".picture")
        with_overlay = rendered(picture, heatmap.shape[::-1])
        overlay.evaluate("(img) => { img.hidden = true; }")
        without = rendered(picture, heatmap.shape[::-1])
        overlay.evaluate("(img) => { img.hidden = false; }")
        change = np.abs(with_overlay - without).sum(axis=2)
        hot, cold = heatmap >= 192, heatmap <= 8
        assert hot.any()
        assert change[hot].mean() > 30, path.name
        if cold.any():
            assert change[cold].mean() < change[hot].mean() / 3, path.name
        warmth = with_overlay[..., 0] - with_overlay[..., 2]
        assert warmth[hot].mean() > (without[..., 0] - without[..., 2])[hot].mean() + 20

    # Switched off (by the keyboard again): no explain asked, no overlay on the new card; the
    # explained cards keep theirs.
    switch.focus()
    tab.page.keyboard.press("Space")
    assert not switch.is_checked()
    (again,) = write_files(tmp_path, {"again.png": image_bytes(seed=8)})
    upload(tab, [again])
    wait_answered(tab, len(paths) + 1)
    assert "explain" not in predict_requests(tab)[-1]
    card = card_named(tab, "again.png")
    assert card.query_selector_all(".bar")
    assert not card.query_selector_all(".heatmap")
    assert card.query_selector(".explanation").is_hidden()
    assert len(tab.page.query_selector_all(".card .heatmap")) == len(paths)
    assert not tab.unexplained_errors()


def test_explain_on_a_model_without_a_convolution_shows_the_services_400_in_the_cards(
    flat_server, visit, tmp_path
):
    paths = write_files(tmp_path, {f"{n}.png": image_bytes(seed=40 + n) for n in range(2)})
    refused = predict(flat_server.url, paths[:1], "?explain=gradcam")
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "has no convolution layer" in message
    tab = visit(flat_server.url)
    tab.page.get_by_role("switch", name="Explain").check()
    upload(tab, paths)
    wait_answered(tab, 2)
    for path in paths:
        card = card_named(tab, path.name)
        shown = card.query_selector(".error").inner_text()
        assert message in shown and "HTTP 400" in shown
        assert not card.query_selector_all(".bar, .heatmap")
    assert "0 images classified, 2 refused" in tab.page.inner_text("#summary")
    assert [q["explain"] for q in predict_requests(tab)] == [["gradcam"]] * 3, "both, then each"
    assert tab.refused == [400] * 3

    tab.page.get_by_role("switch", name="Explain").uncheck()  # the same images, unexplained
    upload(tab, paths)
    wait_answered(tab, 4)
    assert all(c.query_selector_all(".bar") for c in tab.page.query_selector_all(".card.done"))
    assert len(tab.page.query_selector_all(".card.done")) == 2
    assert "explain" not in predict_requests(tab)[-1]
    assert not tab.unexplained_errors()
