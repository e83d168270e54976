"""The wire format between front-end workers and runners: the one module that encodes it.

A message is a list of ZeroMQ frames: a JSON header, then, for a tensor, its raw bytes in a
second frame (dtype and shape in the header). Arrays are never pickled, and a received array
is a view of its frame, so an image crosses the boundary as one copy: the socket's.

- Request `predict`: seq, request id, deadline (time.monotonic(), which all the processes
  of one machine share), model, version; the frame holds [N, H, W, C] uint8 or float32.
- Request `explain`: as `predict`; the answer is each image's Grad-CAM heatmap ([N, H, W]
  uint8 in the frame), its top class and the layer used (in the header).
- Request `catalogue`: seq; the answer's header holds what the runner serves.
- Notices `arriving` (seq, deadline, model, version: a request whose upload is being decoded,
  for which a forming batch may wait) and `left` (seq: it will not come); no answer. A
  `predict` that follows an `arriving` names its seq as `announced`.
- Answer: seq, and either the outputs ([N, classes] float32 in the frame) or an error as its
  code, message and retry-after, rebuilt on the other side as the same typed error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import Overloaded, ServiceError, rebuild

PREDICT, EXPLAIN, CATALOGUE = "predict", "explain", "catalogue"
ARRIVING, LEFT = "arriving", "left"
_DTYPES = {"uint8": np.uint8, "float32": np.float32}

Frames = list[Any]  # bytes, memoryviews or zmq.Frame


@dataclass(frozen=True)
class Request:
    """A request as the runner reads it."""

    kind: str
    seq: int
    request_id: str = ""
    deadline: float = 0.0
    model: str = ""
    version: str = ""
    tensor: np.ndarray | None = None
    announced: int = 0


@dataclass(frozen=True)
class Explanation:
    """The answer to `explain`: each image's top class and heatmap, and the layer used."""

    layer: str
    classes: list[int]
    heatmaps: np.ndarray


def predict_request(
    seq: int,
    request_id: str,
    deadline: float,
    model: str,
    version: str,
    tensor: np.ndarray,
    announced: int = 0,
    kind: str = PREDICT,
) -> Frames:
    """Encode a prediction request for `tensor` (announced by the `arriving` notice of seq
    `announced`, if not 0), or with `kind` EXPLAIN, an explanation request."""
    header = {
        "kind": kind,
        "seq": seq,
        "request_id": request_id,
        "deadline": deadline,
        "model": model,
        "version": version,
        "announced": announced,
        **_describe(tensor),
    }
    return [orjson.dumps(header), np.ascontiguousarray(tensor)]


def arriving_notice(seq: int, deadline: float, model: str, version: str) -> Frames:
    """Encode the notice that a request for `model` `version` is on its way."""
    header = {"kind": ARRIVING, "seq": seq, "deadline": deadline, "model": model}
    return [orjson.dumps({**header, "version": version})]


def left_notice(seq: int) -> Frames:
    """Encode the notice that the request announced as `seq` will not come."""
    return [orjson.dumps({"kind": LEFT, "seq": seq})]


def catalogue_request(seq: int) -> Frames:
    """Encode a request for the runner's catalogue."""
    return [orjson.dumps({"kind": CATALOGUE, "seq": seq})]


def read_request(frames: Frames) -> Request:
    """Decode a request; raise ValueError if it is not one."""
    header = orjson.loads(_bytes(frames[0]))
    kind = header.get("kind")
    if kind in (CATALOGUE, LEFT):
        return Request(kind, int(header["seq"]))
    if kind == ARRIVING:
        deadline, model, version = header["deadline"], header["model"], header["version"]
        return Request(ARRIVING, int(header["seq"]), "", float(deadline), model, version)
    if kind not in (PREDICT, EXPLAIN) or len(frames) != 2:
        raise ValueError(f"not a request: {header!r}")
    return Request(
        kind,
        int(header["seq"]),
        str(header["request_id"]),
        float(header["deadline"]),
        str(header["model"]),
        str(header["version"]),
        _array(header, frames[1]),
        int(header.get("announced", 0)),
    )


def outputs_answer(seq: int, outputs: np.ndarray) -> Frames:
    """Encode the outputs of a prediction."""
    return [orjson.dumps({"seq": seq, **_describe(outputs)}), np.ascontiguousarray(outputs)]


def explanation_answer(seq: int, explanation: Explanation) -> Frames:
    """Encode the heatmaps, classes and layer of an explanation."""
    header = {
        "seq": seq,
        "explanation": {"layer": explanation.layer, "classes": explanation.classes},
        **_describe(explanation.heatmaps),
    }
    return [orjson.dumps(header), np.ascontiguousarray(explanation.heatmaps)]


def catalogue_answer(seq: int, catalogue: dict[str, Any]) -> Frames:
    """Encode a runner's catalogue."""
    return [orjson.dumps({"seq": seq, "catalogue": catalogue})]


def error_answer(seq: int, error: ServiceError) -> Frames:
    """Encode a typed error, to be raised again on the other side."""
    retry_after = error.retry_after_s if isinstance(error, Overloaded) else 1
    body = {"code": error.code, "message": error.message, "retry_after": retry_after}
    return [orjson.dumps({"seq": seq, "error": body})]


def answer_seq(frames: Frames) -> tuple[int, dict[str, Any]]:
    """Return an answer's seq and header."""
    header = orjson.loads(_bytes(frames[0]))
    return int(header["seq"]), header


def read_answer(header: dict[str, Any], frames: Frames) -> Any:
    """Return an answer's outputs array, explanation or catalogue; raise the error it
    carries."""
    error = header.get("error")
    if error is not None:
        raise rebuild(error["code"], error["message"], int(error.get("retry_after", 1)))
    if "catalogue" in header:
        return header["catalogue"]
    if "explanation" in header:
        about = header["explanation"]
        return Explanation(about["layer"], about["classes"], _array(header, frames[1]))
    return _array(header, frames[1])


def _describe(array: np.ndarray) -> dict[str, Any]:
    if array.dtype.name not in _DTYPES:
        raise ValueError(f"arrays of {array.dtype} do not cross the channel")
    return {"dtype": array.dtype.name, "shape": list(array.shape)}


def _array(header: dict[str, Any], frame: Any) -> np.ndarray:
    dtype = _DTYPES[header["dtype"]]
    shape = tuple(int(n) for n in header["shape"])
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape)


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
