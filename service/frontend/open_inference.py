"""The Open Inference Protocol (KServe V2) as this service speaks it, over HTTP or gRPC.

One model takes one of two inputs: "image", BYTES [N] of encoded images (decoded and resized
as for /predict), or "pixels", UINT8 or FP32 [N, H, W, C] at the model's input size (UINT8
scaled as the model folder says, FP32 taken as the model's input values). It gives one
output, "probabilities", FP32 [N, classes] of softmax probabilities, or with the
classification extension the top classes as "<value>:<index>:<label>".

The tensors, their raw layout, the metadata and the rules live here once; the REST routes
(service/frontend/http/v2.py) and the gRPC service (service/frontend/grpc/) only translate
their own framing to and from these. No Flask, no gRPC, no model here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.channel.wire import Explanation
from service.errors import InvalidRequest
from service.frontend import explanations
from service.frontend.protocol_rules import check_image_count, ranked
from service.frontend.versions import RemoteVersion, Upload
from service.registry import Models, State

IMAGE, PIXELS, OUTPUT = "image", "pixels", "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "keras"
# The data types the service takes; BYTES elements are Python bytes, the rest little-endian.
DATATYPES: dict[str, np.dtype | None] = {
    "BYTES": None,
    "UINT8": np.dtype("<u1"),
    "FP32": np.dtype("<f4"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InputTensor:
    """One input of a request: BYTES as a flat list of bytes, numbers as a shaped array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes]


@dataclass(frozen=True)
class RequestedOutput:
    """One output a request asks for: by name, in binary or not, maybe as top-k classes."""

    name: str
    binary: bool
    classification: int


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response: BYTES as a flat list of bytes, FP32 as an array."""

    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]


def check_datatype(name: str, datatype: object) -> str:
    """Return `datatype` if the service takes it; refuse it otherwise."""
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"input {name!r}: datatype {datatype!r} is not supported; use {', '.join(DATATYPES)}"
        )
    assert isinstance(datatype, str)
    return datatype


def check_classification(count: object) -> int:
    """Return the classification extension's class count (0: plain probabilities)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise InvalidRequest(f"classification must be a positive integer, got {count!r}")
    return count


def from_raw(chunk: memoryview | bytes, datatype: str, count: int, name: str):
    """Return `count` elements of `datatype` laid out raw (BYTES: each length-prefixed)."""
    dtype = DATATYPES[datatype]
    if dtype is None:
        elements = deserialize_bytes(chunk)
        if len(elements) != count:
            raise InvalidRequest(f"input {name!r}: {len(elements)} BYTES elements for {count}")
        return elements
    if len(chunk) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r}: {len(chunk)} bytes of binary data; {count} {datatype} "
            f"elements take {count * dtype.itemsize}"
        )
    return np.frombuffer(chunk, dtype).astype(dtype.newbyteorder("="))


def to_raw(tensor: OutputTensor) -> bytes:
    """Return an output's elements laid out raw, as `from_raw` reads them."""
    if isinstance(tensor.value, list):
        return serialize_bytes(tensor.value)
    return np.ascontiguousarray(tensor.value, dtype="<f4").tobytes()


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """Return BYTES elements as the raw layout has them: each after its 4-byte length."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def deserialize_bytes(buffer: memoryview | bytes) -> list[bytes]:
    """Return the elements of a raw BYTES tensor (each a 4-byte little-endian length)."""
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + _LENGTH.size > len(buffer):
            raise InvalidRequest("a BYTES element's 4-byte length prefix is cut short")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += _LENGTH.size
        if offset + length > len(buffer):
            raise InvalidRequest(
                f"a BYTES element claims {length} bytes; {len(buffer) - offset} are left"
            )
        elements.append(bytes(buffer[offset : offset + length]))
        offset += length
    return elements


def infer(
    served: RemoteVersion,
    inputs: list[InputTensor],
    requested: list[RequestedOutput],
    *,
    max_images: int,
    deadline: float,
    request_id: str,
    explain: bool = False,
) -> tuple[list[OutputTensor], list[dict] | None]:
    """Run a request's one input through `served`; return the outputs it asks for, and with
    `explain` (the request's "explain" parameter) each image's explanation."""
    if len(inputs) != 1:
        raise InvalidRequest(f"send one input, {IMAGE!r} or {PIXELS!r}; got {len(inputs)}")
    tensor = inputs[0]
    check_image_count(len(tensor.value), max_images)
    answer = _predict(served, tensor, deadline, request_id, explain)
    probabilities = np.stack(answer[0])
    outputs = [_output(served, probabilities, output) for output in requested]
    if answer[1] is None:
        return outputs, None
    return outputs, explanations.described(answer[1], served.info.labels)


def model_metadata(models: Models, served: RemoteVersion, pinned: bool) -> dict[str, object]:
    """Describe a model's inputs and output, and its versions (the one asked for, if pinned)."""
    info = served.info
    versions = [s.version for s in models.statuses(info.name) if s.state is State.AVAILABLE]
    return {
        "name": info.name,
        "versions": [info.version] if pinned else versions,
        "platform": PLATFORM,
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "UINT8", "shape": [-1, *info.input_shape]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(info.labels)]}],
        # As MLServer's model metadata carries them: what a client shows beside the
        # probabilities (their labels, in output order) and where the model runs.
        "parameters": {"labels": list(info.labels), "device": info.device},
    }


def model_ready(models: Models, name: str, version: str | None, serving: bool) -> bool:
    """Tell whether the model (at that version) takes predictions now; `serving`: the
    front end is ready or draining. An unknown model raises ModelNotFound."""
    known = [s for s in models.statuses(name) if version in (None, s.version)]
    if not known:
        models.find(name, version)  # raises the error that names what is served
    ready = any(s.state is State.AVAILABLE and s.served and s.served.alive for s in known)
    return ready and serving


# Triton's names for the states of a repository index.
_INDEX_STATES = {
    State.AVAILABLE: "READY",
    State.LOADING: "LOADING",
    State.UNLOADING: "UNLOADING",
    State.END: "UNAVAILABLE",
    State.FAILED: "UNAVAILABLE",
}


def repository_index(models: Models, ready_only: bool) -> list[dict[str, str]]:
    """List every model version (or only those ready) with its state, as Triton's
    repository index does."""
    return [
        {
            "name": status.model,
            "version": status.version,
            "state": _INDEX_STATES[status.state],
            "reason": status.error or ("unloaded" if status.state is State.END else ""),
        }
        for status in models.statuses()
        if not ready_only or status.state is State.AVAILABLE
    ]


def _predict(
    served: RemoteVersion, tensor: InputTensor, deadline: float, request_id: str, explain: bool
) -> tuple[list[np.ndarray], Explanation | None]:
    if not len(tensor.value):
        raise InvalidRequest(f"input {tensor.name!r} holds no image")
    if tensor.name == IMAGE:
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            raise InvalidRequest(f"input {IMAGE!r} must be BYTES [N] of encoded images")
        assert isinstance(tensor.value, list)
        uploads = [
            Upload(f"image {i + 1} ({IMAGE}[{i}])", data) for i, data in enumerate(tensor.value)
        ]
        if explain:
            return served.predict_explained(uploads, deadline, request_id)
        return served.predict(uploads, deadline, request_id), None
    if tensor.name == PIXELS:
        if not isinstance(tensor.value, np.ndarray):
            raise InvalidRequest(f"input {PIXELS!r} must be UINT8 or FP32 [N, H, W, C]")
        if explain:
            return served.predict_tensor_explained(tensor.value, deadline, request_id)
        return served.predict_tensor(tensor.value, deadline, request_id), None
    raise InvalidRequest(f"unknown input {tensor.name!r}; the model takes {IMAGE!r} or {PIXELS!r}")


def _output(
    served: RemoteVersion, probabilities: np.ndarray, output: RequestedOutput
) -> OutputTensor:
    if output.name != OUTPUT:
        raise InvalidRequest(f"unknown output {output.name!r}; the model gives {OUTPUT!r}")
    if not output.classification:
        return OutputTensor(OUTPUT, "FP32", list(probabilities.shape), probabilities)
    labels = served.info.labels
    k = min(output.classification, len(labels))
    order = ranked(probabilities, k)
    # As Triton writes them: "<value>:<index>:<label>", the value as C's %f.
    classes = [
        f"{row[i]:f}:{i}:{labels[i]}".encode()
        for row, indices in zip(probabilities, order, strict=True)
        for i in indices
    ]
    return OutputTensor(OUTPUT, "BYTES", [len(probabilities), k], classes)
