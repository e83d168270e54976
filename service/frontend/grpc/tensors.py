"""The Open Inference Protocol's tensors in protobuf: typed contents or raw, in and out.

Pure translation between the messages (Triton's generated modules, which tritonclient ships:
the stock client and this server share one definition of them) and the protocol-neutral
tensors of service/frontend/open_inference.py, which hold the rules both framings share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from service.errors import InvalidRequest
from service.frontend import open_inference
from service.frontend.open_inference import InputTensor, OutputTensor, RequestedOutput

# Where each data type's elements lie in InferTensorContents.
_CONTENTS = {"BYTES": "bytes_contents", "UINT8": "uint_contents", "FP32": "fp32_contents"}


def inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """Return a request's inputs, from raw_input_contents (all of them) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        datatype = open_inference.check_datatype(name, tensor.datatype)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers")
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name!r} has both contents and raw_input_contents")
            value = open_inference.from_raw(raw[i], datatype, count, name)
        else:
            value = _typed(tensor.contents, datatype, count, name)
        if isinstance(value, np.ndarray):
            value = value.reshape(shape)
        tensors.append(InputTensor(name, datatype, shape, value))
    if not tensors:
        raise InvalidRequest('"inputs" must be a non-empty list of tensors')
    return tensors


def requested_outputs(request: pb.ModelInferRequest) -> list[RequestedOutput]:
    """Return the outputs a request asks for (the model's one output when it names none)."""
    binary = len(request.raw_input_contents) > 0
    if not request.outputs:
        return [RequestedOutput(open_inference.OUTPUT, binary, 0)]
    found = []
    for output in request.outputs:
        count: Any = 0
        if "classification" in output.parameters:
            count = _parameter(output.parameters["classification"])
        found.append(
            RequestedOutput(output.name, binary, open_inference.check_classification(count))
        )
    return found


def explain_parameter(request: pb.ModelInferRequest) -> object:
    """Return the request's "explain" parameter (None when absent)."""
    if "explain" not in request.parameters:
        return None
    return _parameter(request.parameters["explain"])


def response(
    request: pb.ModelInferRequest, model: str, version: str, outputs: list[OutputTensor]
) -> pb.ModelInferResponse:
    """Return the answer to `request`: raw outputs if it sent raw inputs, typed otherwise
    (tritonclient sends and reads raw; a typed request is read by eye, as JSON)."""
    answer = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    raw = len(request.raw_input_contents) > 0
    for tensor in outputs:
        entry = answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            answer.raw_output_contents.append(open_inference.to_raw(tensor))
        elif isinstance(tensor.value, list):
            entry.contents.bytes_contents.extend(tensor.value)
        else:
            entry.contents.fp32_contents.extend(np.asarray(tensor.value, np.float32).ravel())
    return answer


def _typed(contents: pb.InferTensorContents, datatype: str, count: int, name: str):
    field = _CONTENTS[datatype]
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise InvalidRequest(f"input {name!r}: {datatype} elements go in {field}, not {others[0]}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(f"input {name!r}: {len(values)} values for a shape of {count}")
    if datatype == "BYTES":
        return list(values)
    array = np.asarray(values)
    if datatype == "UINT8":
        if array.size and array.max() > 255:
            raise InvalidRequest(f"input {name!r}: UINT8 data must lie in 0..255")
        return array.astype(np.uint8)
    return array.astype(np.float32)


def _parameter(parameter: pb.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None
