"""One model version as a worker sees it: uploads decoded here, the tensor sent to a runner.

The worker decodes and resizes each upload to the model's input (uint8 pixels: a quarter of
the float32 bytes on the channel), and the runner holding the version with the least work
runs it; that runner hears of the request before the decoding starts, so a batch it forms
meanwhile can wait for it, as within one process. No Flask, no model runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_folder.errors import ImageTooLarge, UndecodableImage
from model_folder.files import ModelInfo
from model_folder.preprocessing import decode_image
from service import metrics
from service.channel.client import RunnerClient
from service.channel.wire import Explanation
from service.errors import InvalidImage, InvalidRequest, ModelNotReady, PayloadTooLarge
from service.settings import Settings


@dataclass(frozen=True)
class Upload:
    """One image of a request: where it came from (for error messages) and its bytes."""

    name: str
    data: bytes


class RemoteVersion:
    """A model version held by one or more runners."""

    def __init__(
        self, info: ModelInfo, runners: tuple[int, ...], client: RunnerClient, settings: Settings
    ) -> None:
        """Send the work of `info`'s version to one of `runners` through `client`."""
        self.info = info
        self.runners = runners
        self.client = client
        self.settings = settings
        self.metrics = metrics.for_requests(info.name, info.version)

    @property
    def alive(self) -> bool:
        """Tell whether a runner holding it runs."""
        return any(self.client.slots.running(index) for index in self.runners)

    def hold(self) -> None:
        """Count nothing: the runner keeps a retired version for a request's timeout."""

    def release(self) -> None:
        """Count nothing (see `hold`)."""

    def predict(
        self, uploads: Sequence[Upload], deadline: float, request_id: str = ""
    ) -> list[np.ndarray]:
        """Decode each upload to the model's input and return its class probabilities.

        The runner is told first that the request is on its way, so that a batch it forms
        meanwhile waits for these images (up to MAX_BATCH_DELAY_MS).
        """
        index = self._least_held()
        announced = self.client.announce(
            index, model=self.info.name, version=self.info.version, deadline=deadline
        )
        pixels = self._decode(uploads, index, announced)
        return self._run(pixels, deadline, request_id, index, announced)

    def predict_explained(
        self, uploads: Sequence[Upload], deadline: float, request_id: str = ""
    ) -> tuple[list[np.ndarray], Explanation]:
        """Return what `predict` returns, and the Grad-CAM of each image on the same pixels."""
        index = self._least_held()
        pixels = self._decode(uploads, index, 0)
        outputs = self._run(pixels, deadline, request_id, index)
        return outputs, self._explain(pixels, deadline, request_id, index)

    def _decode(self, uploads: Sequence[Upload], index: int, announced: int) -> np.ndarray:
        spec = self.info.spec
        pixels = np.empty((len(uploads), *spec.shape), dtype=np.uint8)
        try:
            for i, upload in enumerate(uploads):
                started = time.perf_counter()
                try:
                    pixels[i] = decode_image(upload.data, spec, self.settings.max_image_pixels)
                except UndecodableImage as exc:
                    raise InvalidImage(f"{upload.name}: {exc}") from None
                except ImageTooLarge as exc:
                    raise PayloadTooLarge(f"{upload.name}: {exc}") from None
                self.metrics.preprocess.observe(time.perf_counter() - started)
        except BaseException:
            if announced:
                self.client.withdraw(index, announced)
            raise
        return pixels

    def predict_tensor(
        self, batch: np.ndarray, deadline: float, request_id: str = ""
    ) -> list[np.ndarray]:
        """Return the class probabilities of images already at the model's input size.

        `batch` is [N, H, W, C]: uint8 pixels are scaled as the model folder says (as decoded
        uploads are), float32 values are taken as the model's input values.
        """
        self._check_tensor(batch)
        return self._run(batch, deadline, request_id, self._least_held())

    def predict_tensor_explained(
        self, batch: np.ndarray, deadline: float, request_id: str = ""
    ) -> tuple[list[np.ndarray], Explanation]:
        """Return what `predict_tensor` returns, and the Grad-CAM of each image."""
        self._check_tensor(batch)
        index = self._least_held()
        outputs = self._run(batch, deadline, request_id, index)
        return outputs, self._explain(batch, deadline, request_id, index)

    def _check_tensor(self, batch: np.ndarray) -> None:
        spec = self.info.spec
        if batch.ndim != 4 or tuple(batch.shape[1:]) != spec.shape:
            raise InvalidRequest(
                f"the tensor's shape is {list(batch.shape)}; the model takes "
                f"[N, {', '.join(map(str, spec.shape))}]"
            )
        if batch.dtype == np.float32:
            if not np.isfinite(batch).all():
                raise InvalidRequest("the tensor holds a NaN or an infinity")
        elif batch.dtype != np.uint8:
            raise InvalidRequest(f"the tensor's type is {batch.dtype}; use uint8 or float32")

    def _explain(
        self, tensor: np.ndarray, deadline: float, request_id: str, index: int
    ) -> Explanation:
        return self._ask(self.client.explain, tensor, deadline, request_id, index)

    def _run(
        self,
        tensor: np.ndarray,
        deadline: float,
        request_id: str,
        index: int,
        announced: int = 0,
    ) -> list[np.ndarray]:
        return list(
            self._ask(self.client.predict, tensor, deadline, request_id, index, announced=announced)
        )

    def _ask(
        self,
        call: Callable[..., Any],
        tensor: np.ndarray,
        deadline: float,
        request_id: str,
        index: int,
        **extra: int,
    ) -> Any:
        return call(
            index,
            tensor,
            model=self.info.name,
            version=self.info.version,
            deadline=deadline,
            # Past its deadline a request still waits for its batch already running.
            wait_until=deadline + self.settings.running_batch_grace_s,
            request_id=request_id,
            **extra,
        )

    def _least_held(self) -> int:
        slots = self.client.slots
        running = [index for index in self.runners if slots.running(index)]
        if not running:
            raise ModelNotReady(
                f"no runner holding model {self.info.name!r} version {self.info.version} "
                "runs now; it is being restarted"
            )
        return min(running, key=slots.held)
