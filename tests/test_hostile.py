"""Hostile and odd uploads against a real gunicorn, while valid traffic gets correct answers."""

from __future__ import annotations

import io
import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import distinct_images, expected_probabilities, image_bytes, png_bomb
from tests.load import post_png

pytestmark = pytest.mark.slow

TIMEOUT_S = 3  # REQUEST_TIMEOUT_S of the servers here: the slow client's deadline
BODY_LIMIT = 200_000  # MAX_BODY_BYTES of the servers here
IMAGE_LIMIT = 64  # MAX_IMAGES_PER_REQUEST, the default
BOUNDARY = "hostile-boundary-1234"


@dataclass
class Case:
    """One hostile or odd request and the answer it must get."""

    name: str
    status: int
    code: str = ""  # the error code of a 4xx
    image: bytes = b""  # for a 200: the image whose probabilities must come back
    params: str = ""
    request: dict = field(default_factory=dict)  # keyword arguments of requests.post


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.open(io.BytesIO(image_bytes((40, 30), seed=s))).convert("P") for s in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return image_bytes((48, 32), fmt="JPEG", seed=7, exif=exif)


def multipart(part: bytes, filename: str = "image.png") -> bytes:
    """Return a one-part multipart body, with BOUNDARY, closing boundary included."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
    )
    return head.encode() + part + f"\r\n--{BOUNDARY}--\r\n".encode()


def hostile_cases(escape_target: Path) -> list[Case]:
    """Return the issue's whole list of hostile and odd inputs, each with its answer."""
    png, jpeg = image_bytes((200, 200)), image_bytes((200, 200), fmt="JPEG")
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    rng = np.random.default_rng(3)
    sixteen_bit = encode(Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16)), "PNG")
    palette = encode(Image.open(io.BytesIO(image_bytes(seed=4))).convert("P"), "PNG")
    small = image_bytes((8, 8))
    well_formed = multipart(small)
    escape = "../" * 16 + str(escape_target).lstrip("/")

    def raw(data: bytes, content_type: str = "image/png") -> dict:
        return {"data": data, "headers": {"Content-Type": content_type}}

    def upload(data: bytes, filename: str = "upload.png") -> dict:
        return {"files": {"image": (filename, data, "image/png")}}

    bad = "invalid_request"
    cases = [
        Case("empty body", 400, bad),
        Case("zero-byte file part", 400, "invalid_image", request=upload(b"")),
        Case("text renamed .jpg", 400, "invalid_image", request=upload(b"hi there", "a.jpg")),
        Case("PDF renamed .jpg", 400, "invalid_image", request=upload(pdf, "report.jpg")),
        Case("truncated JPEG", 400, "invalid_image", request=raw(jpeg[: len(jpeg) // 2])),
        Case("truncated PNG", 400, "invalid_image", request=raw(png[: len(png) // 2])),
        Case("40000x40000 bomb", 413, "payload_too_large", request=raw(png_bomb(40000, 40000))),
        Case(
            f"{IMAGE_LIMIT + 1} files",
            413,
            "payload_too_large",
            request={"files": [("image", (f"{i}.png", small)) for i in range(IMAGE_LIMIT + 1)]},
        ),
        Case("body over the limit", 413, "payload_too_large", request=raw(bytes(BODY_LIMIT + 1))),
        Case(
            "chunked body over the limit",
            413,
            "payload_too_large",
            request=raw(iter([bytes(10_000)] * (BODY_LIMIT // 10_000 + 1))),
        ),
        Case("multipart, no boundary", 400, bad, request=raw(well_formed, "multipart/form-data")),
        Case(
            "multipart, wrong boundary",
            400,
            bad,
            request=raw(well_formed, "multipart/form-data; boundary=not-the-one"),
        ),
        Case(
            "multipart, unterminated part",
            400,
            bad,
            request=raw(
                well_formed[: well_formed.index(small) + len(small) // 2],
                f"multipart/form-data; boundary={BOUNDARY}",
            ),
        ),
        Case("JSON not an object", 400, bad, request={"json": [{"b64": "AAAA"}]}),
        Case("instances not a list", 400, bad, request={"json": {"instances": {"b64": "AAAA"}}}),
        Case("bad base64", 400, bad, request={"json": {"instances": [{"b64": "!!not base64"}]}}),
        Case("unknown query parameter", 400, bad, params="?topk=3", request=raw(small)),
        Case("top_k=0", 400, bad, params="?top_k=0", request=raw(small)),
        Case("top_k=-1", 400, bad, params="?top_k=-1", request=raw(small)),
        Case("top_k=abc", 400, bad, params="?top_k=abc", request=raw(small)),
    ]
    images = {
        "top_k=10**9": (small, raw(small)),
        "1x1": (image_bytes((1, 1)), None),
        "10000x1": (image_bytes((10000, 1)), None),
        "16-bit grayscale PNG": (sixteen_bit, None),
        "palette PNG": (palette, None),
        "CMYK JPEG": (image_bytes((40, 30), "CMYK", "JPEG"), None),
        "LA PNG": (image_bytes((40, 30), "LA"), None),
        "RGBA PNG": (image_bytes((40, 30), "RGBA"), None),
        "animated GIF": (animated_gif(), None),
        "WebP": (image_bytes((40, 30), fmt="WEBP"), None),
        "BMP": (image_bytes((40, 30), fmt="BMP"), None),
        "TIFF": (image_bytes((40, 30), fmt="TIFF"), None),
        "EXIF-rotated JPEG": (exif_rotated_jpeg(), None),
        "path traversal filename": (small, upload(small, "../../etc/passwd")),
        "path traversal to a known place": (small, upload(small, escape)),
    }
    for name, (data, request) in images.items():
        params = "?top_k=1000000000" if name == "top_k=10**9" else ""
        cases.append(Case(name, 200, image=data, params=params, request=request or upload(data)))
    return cases


@dataclass
class ValidTraffic:
    """Correct requests sent in a loop: when each correct answer came, and what went wrong."""

    answered_at: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@contextmanager
def valid_traffic(url: str, cnn, classifier) -> Iterator[ValidTraffic]:
    """Send valid images one after another until the block ends, checking every answer."""
    images = distinct_images(4, size=(48, 40))
    expected = [expected_probabilities(cnn, d, classifier.info.spec) for d in images]
    traffic = ValidTraffic()
    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.is_set():
            data, want = images[i % len(images)], expected[i % len(images)]
            i += 1
            try:
                response = post_png(url, data)
                got = response.json()["predictions"][0]["probabilities"]
                np.testing.assert_allclose(got, want, atol=1e-5)
            except Exception as exc:  # every kind of wrong answer is a problem to report
                traffic.problems.append(f"request {i}: {type(exc).__name__}: {exc}")
            else:
                traffic.answered_at.append(time.monotonic())

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield traffic
    finally:
        stop.set()
        thread.join(60)


def check(url: str, case: Case, cnn, classifier) -> str:
    """Send one case; return what is wrong with its answer, or "" if nothing."""
    try:
        response = requests.post(f"{url}/predict{case.params}", timeout=30, **case.request)
    except requests.RequestException as exc:
        return f"{case.name}: no answer: {exc!r}"
    if response.status_code != case.status:
        return f"{case.name}: {response.status_code} {response.text[:200]}, want {case.status}"
    if not response.headers.get("X-Request-ID"):
        return f"{case.name}: no X-Request-ID"
    body = response.json()
    if case.status != 200:
        return "" if body["error"]["code"] == case.code else f"{case.name}: {body}"
    [prediction] = body["predictions"]
    want = expected_probabilities(cnn, case.image, classifier.info.spec)
    if not np.allclose(prediction["probabilities"], want, atol=1e-5):
        return f"{case.name}: {prediction['probabilities']} != {want.tolist()}"
    return ""


def test_hostile_inputs_get_their_status_while_valid_traffic_stays_correct(
    server_factory, model_dir, cnn, classifier, tmp_path
):
    server = server_factory(
        model_dir, REQUEST_TIMEOUT_S=str(TIMEOUT_S), MAX_BODY_BYTES=str(BODY_LIMIT)
    )
    escape_target = tmp_path / "escaped.png"
    passwd = Path("/etc/passwd").stat()
    cases = hostile_cases(escape_target)
    with valid_traffic(server.url, cnn, classifier) as traffic, ThreadPoolExecutor(4) as pool:
        wrong = [p for p in pool.map(lambda c: check(server.url, c, cnn, classifier), cases) if p]
    print(
        f"\n{len(cases)} hostile cases; {len(traffic.answered_at)} valid answers checked meanwhile"
    )

    assert wrong == []
    assert traffic.problems == []
    assert traffic.answered_at, "no valid request was answered during the attack"
    assert server.process.poll() is None
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert not escape_target.exists(), "an upload's filename chose where it was written"
    after = Path("/etc/passwd").stat()
    assert (after.st_mtime_ns, after.st_size) == (passwd.st_mtime_ns, passwd.st_size)
    log = server.log_path.read_bytes()
    for line in log.decode(errors="replace").splitlines():
        assert isinstance(json.loads(line), dict), line
    # Signatures of the formats sent, raw and as Python would escape them in a message.
    for signature in (b"\x89PNG", b"IHDR", b"\xff\xd8\xff", b"%PDF", b"GIF89a", b"RIFF"):
        for marker in (signature, repr(signature)[2:-1].encode()):
            assert marker not in log, f"{marker!r} in the server log"
    assert not re.search(rb"[A-Za-z0-9+/]{64,}={0,2}", log), "base64 in the server log"


def trickle(url: str, content_length: int, every_s: float, give_up_s: float) -> tuple[bytes, float]:
    """Send headers, then one body byte every `every_s`; return what came back, and when.

    Stops at the first answer (or close) from the server, or after `give_up_s`.
    """
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {content_length}\r\n\r\n".encode()
        )
        while time.monotonic() - started < give_up_s:
            readable, _, _ = select.select([sock], [], [], every_s)
            if readable:
                try:
                    return sock.recv(4096), time.monotonic() - started
                except ConnectionResetError:
                    return b"", time.monotonic() - started
            try:
                sock.sendall(b"\0")
            except OSError:  # the server closed the connection
                return b"", time.monotonic() - started
        return b"(still waiting)", time.monotonic() - started


def test_slow_client_trickling_its_body_is_cut_off_at_the_deadline(
    server_factory, model_dir, cnn, classifier
):
    server = server_factory(model_dir, REQUEST_TIMEOUT_S=str(TIMEOUT_S))
    margin_s = 10.0  # the body (1000 bytes at 2 a second) would take 500 s to arrive
    with valid_traffic(server.url, cnn, classifier) as traffic:
        trickle_started = time.monotonic()
        answer, waited = trickle(server.url, 1000, every_s=0.5, give_up_s=TIMEOUT_S + 20)
    print(f"\nslow client: {answer[:40]!r} after {waited:.1f} s")

    assert traffic.problems == []
    assert any(t > trickle_started for t in traffic.answered_at), "others were not served"
    assert waited < TIMEOUT_S + margin_s, f"the slow client held its thread for {waited:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
