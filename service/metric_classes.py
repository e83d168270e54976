"""cnn_predicted_class_total with a bounded number of series per model version."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import Counter

# The class label of the answers whose class has no series of its own.
OTHER_CLASSES = "other"


class ClassCounts:
    """cnn_predicted_class_total of one version in one runner, with at most `limit` series
    of their own (and "other").

    Every class is counted here; a class gets a series of its own, from then on, once it is
    among the `limit` most frequent so far while there is room. A model with `limit` classes
    or fewer has one per class; a 1,000-class model has the `limit` that were most frequent as
    the room filled, then "other" for the rest. The series always sum to every answer.
    """

    def __init__(
        self, family: Counter, name: str, version: str, classes: Sequence[str], limit: int
    ) -> None:
        """Count in `family` (labelled model, version, class) the answers of model `name`
        `version` among `classes`."""
        self.family = family
        self.labels = (name, version)
        self.classes = tuple(classes)
        self.limit = limit
        self.counts = np.zeros(len(self.classes), dtype=np.int64)
        self.series: dict[int, Counter] = {}
        if len(self.classes) <= limit:
            self.series = {i: self.family.labels(name, version, c) for i, c in enumerate(classes)}
        self.other = family.labels(name, version, OTHER_CLASSES)

    def add(self, top: np.ndarray) -> None:
        """Count answers whose top classes are `top` (class indices)."""
        found = np.bincount(top, minlength=len(self.counts))[: len(self.counts)]
        self.counts += found
        others = 0
        for index in np.flatnonzero(found).tolist():
            if index not in self.series and len(self.series) < self.limit:
                self._admit(index)
            if index in self.series:
                self.series[index].inc(int(found[index]))
            else:
                others += int(found[index])
        if others:
            self.other.inc(others)

    def _admit(self, index: int) -> None:
        """Give class `index` a series if it is among the `limit` most frequent so far."""
        if len(self.counts) > self.limit:
            threshold = np.partition(self.counts, -self.limit)[-self.limit]
            if self.counts[index] < threshold:
                return
        self.series[index] = self.family.labels(*self.labels, self.classes[index])
