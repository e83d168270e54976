"""What every protocol does alike, HTTP or gRPC: the image-count limit and the top-k order."""

from __future__ import annotations

import numpy as np

from service.errors import PayloadTooLarge


def check_image_count(count: int, limit: int) -> None:
    """Refuse a request carrying more images than `limit` (413, or its protocol's twin)."""
    if count > limit:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {limit}")


def ranked(probabilities: np.ndarray | list[float], k: int | None = None) -> np.ndarray:
    """Return each row's class indices, the most probable first (ties in class order), the
    first `k` of them if given."""
    return np.argsort(-np.asarray(probabilities), axis=-1, kind="stable")[..., :k]
