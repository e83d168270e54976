"""Open Inference Protocol tensors: JSON and binary (Triton's extension) in, and out.

Pure translation between bodies and numpy arrays; no Flask and no model here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidRequest
from service.frontend.open_inference import (
    DATATYPES,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    check_classification,
    check_datatype,
    from_raw,
    to_raw,
)


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[InputTensor]]:
    """Return an inference request's JSON header and its inputs, binary data included."""
    split = len(body)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise InvalidRequest(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
        if not 0 <= split <= len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length is {split}; the body has {len(body)} bytes"
            )
    try:
        document = orjson.loads(body[:split])
    except orjson.JSONDecodeError:
        raise InvalidRequest("the inference request is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidRequest('the inference request must be a JSON object {"inputs": [...]}')
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest('"inputs" must be a non-empty list of tensors')
    binary = memoryview(body)[split:]
    tensors = []
    for i, spec in enumerate(inputs):
        tensor, used = _input_tensor(spec, i, binary)
        tensors.append(tensor)
        binary = binary[used:]
    if len(binary):
        raise InvalidRequest(f"{len(binary)} bytes of binary data follow the last binary input")
    return document, tensors


def requested_outputs(document: dict, default_name: str) -> list[RequestedOutput]:
    """Return the outputs a request asks for (`default_name` alone when it names none)."""
    binary_default = _flag(parameters(document, "the request"), "binary_data_output", False)
    requested = document.get("outputs", [{"name": default_name}])
    if not isinstance(requested, list) or not requested:
        raise InvalidRequest('"outputs" must be a non-empty list of {"name": ...}')
    outputs = []
    for i, output in enumerate(requested):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidRequest(f'outputs[{i}] must be an object with a "name"')
        options = parameters(output, f"output {output['name']!r}")
        count = check_classification(options.get("classification", 0))
        outputs.append(
            RequestedOutput(output["name"], _flag(options, "binary_data", binary_default), count)
        )
    return outputs


def parameters(document: dict, where: str) -> dict[str, Any]:
    """Return an object's "parameters" (empty when absent)."""
    found = document.get("parameters", {})
    if not isinstance(found, dict):
        raise InvalidRequest(f'the "parameters" of {where} must be an object')
    return found


def encode_response(document: dict, outputs: Sequence[OutputTensor], binary: Sequence[bool]):
    """Return the response body and, when some output is binary, the length of its JSON."""
    entries, blobs = [], []
    for tensor, in_binary in zip(outputs, binary, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": tensor.shape,
        }
        if in_binary:
            blob = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(tensor.value, list):
            entry["data"] = [element.decode("utf-8", "replace") for element in tensor.value]
        else:
            entry["data"] = tensor.value.ravel().tolist()
        entries.append(entry)
    header = orjson.dumps({**document, "outputs": entries})
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def _input_tensor(spec: object, index: int, binary: memoryview) -> tuple[InputTensor, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest(f'inputs[{index}] must be an object with a "name"')
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    datatype = check_datatype(name, datatype)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    size = parameters(spec, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise InvalidRequest(
                f"input {name!r}: binary_data_size {size!r} is more than the "
                f"{len(binary)} bytes of binary data left"
            )
        value = from_raw(binary[:size], datatype, count, name)
    elif "data" in spec:
        value, size = _from_json(spec["data"], datatype, count, name), 0
    else:
        raise InvalidRequest(f"input {name!r} has neither data nor binary_data_size")
    if isinstance(value, np.ndarray):
        value = value.reshape(shape)
    return InputTensor(name, datatype, tuple(shape), value), size


def _from_json(data: object, datatype: str, count: int, name: str):
    dtype = DATATYPES[datatype]
    if dtype is None:
        elements = [element for element in _flatten(data) if isinstance(element, str)]
        if len(elements) != len(list(_flatten(data))):
            raise InvalidRequest(f"input {name!r}: BYTES data in JSON must be strings")
        values: list[bytes] | np.ndarray = [element.encode() for element in elements]
    else:
        try:
            values = np.asarray(data).ravel()
        except ValueError:
            raise InvalidRequest(f"input {name!r}: data is a ragged list") from None
        kinds = "iu" if datatype == "UINT8" else "iuf"
        if values.size and values.dtype.kind not in kinds:
            raise InvalidRequest(f"input {name!r}: data must be {datatype} numbers")
        if datatype == "UINT8" and values.size and (values.min() < 0 or values.max() > 255):
            raise InvalidRequest(f"input {name!r}: UINT8 data must lie in 0..255")
        values = values.astype(dtype.newbyteorder("="))
    if len(values) != count:
        raise InvalidRequest(f"input {name!r}: {len(values)} values for a shape of {count}")
    return values


def _flatten(data: object) -> Iterable[object]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _flag(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false, got {value!r}")
    return value
