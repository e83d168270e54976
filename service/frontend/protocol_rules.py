"""What every protocol does alike, HTTP or gRPC: the request id, the bearer token, the
image-count limit and the top-k order."""

from __future__ import annotations

import hmac
import itertools
import re
import uuid

import numpy as np

from service.errors import PayloadTooLarge, Unauthorized

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def request_id(supplied: str) -> str:
    """Return the client's request id if it is a sane one, else a new one (a per-process
    random prefix and a counter: unique, and no syscall per request)."""
    if _REQUEST_ID.match(supplied):
        return supplied
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def check_bearer(authorization: str, token: str, where: str) -> None:
    """Refuse (401, or its protocol's twin) unless `authorization` is "Bearer <token>"; no
    token configured: accept. `where` names what must carry it, for the message."""
    if not token:
        return
    scheme, _, supplied = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        supplied.strip().encode(), token.encode()
    ):
        raise Unauthorized(f"a valid {where} is required")


def check_image_count(count: int, limit: int) -> None:
    """Refuse a request carrying more images than `limit` (413, or its protocol's twin)."""
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {limit}")


def ranked(probabilities: np.ndarray | list[float], k: int | None = None) -> np.ndarray:
    """Return each row's class indices, the most probable first (ties in class order), the
    first `k` of them if given."""
    return np.argsort(-np.asarray(probabilities), axis=-1, kind="stable")[..., :k]
