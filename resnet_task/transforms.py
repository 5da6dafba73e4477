"""Image-classification transforms, per example (Grain) and per batch (the Trainer's path).

Each class is both a Grain per-example transform (``Map``/``RandomMap`` over elements
``{"image": (H, W, C) uint8, "label": int32}``), usable in any Grain pipeline, and an
:class:`nnx_trainer.transforms.BatchTransform` (``map_batch`` over ``(B, H, W, C)``
batches), which the Trainer uses: one vectorised NumPy operation per batch instead of
one per example, the difference between a data pipeline that keeps up with a
few-millisecond step on a 2-core CPU and one that does not.

Transforms return new dicts and never write into their input: Grain (and the
array-backed sources, whose images are read-only views) may hand the same arrays out
again. They are NumPy-only module-level classes (picklable into Grain's worker
processes). Random draws come from Grain's per-element ``rng`` (per example) or from
the per-example keys the Trainer passes (per batch): either way an example's
augmentation does not depend on which worker or process computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from nnx_trainer.transforms import BatchTransform, integers, uniform
from resnet_task.errors import DataError

__all__ = ["CheckLabels", "RandomCrop", "RandomHorizontalFlip", "Normalize"]

_PAD_MODES = ("constant", "reflect")


class RandomCrop(grain.transforms.RandomMap, BatchTransform):
    """Pad the image by ``padding`` pixels on each side, then crop back to its original size
    at a uniformly random offset (the standard CIFAR augmentation).

    ``mode="constant"`` (default) pads with zeros, as in the ResNet paper (He et al., 2016)
    and torchvision's default, so results are comparable with published CIFAR numbers.
    ``mode="reflect"`` mirrors the border instead, which avoids black bands the model could
    learn to ignore; it needs ``padding`` smaller than the image side.
    """

    def __init__(self, padding: int, mode: str = "constant"):
        if int(padding) != padding or padding < 0:
            raise ValueError(f"RandomCrop padding must be a non-negative integer, got {padding!r}")
        if mode not in _PAD_MODES:
            raise ValueError(f"RandomCrop mode must be one of {_PAD_MODES}, got {mode!r}")
        self.padding = int(padding)
        self.mode = mode

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        p = self.padding
        # Always draw both offsets, so the rng stream is consumed the same way for any input.
        dy, dx = rng.integers(0, 2 * p + 1, size=2)
        if p == 0:
            return {**element}
        h, w = image.shape[:2]
        pad = ((p, p), (p, p)) + ((0, 0),) * (image.ndim - 2)
        padded = np.pad(image, pad, mode=self.mode)
        return {**element, "image": np.ascontiguousarray(padded[dy : dy + h, dx : dx + w])}

    def map_batch(self, batch: dict[str, Any], keys: np.ndarray) -> dict[str, Any]:
        images = batch["image"]
        p = self.padding
        if p == 0:
            return {**batch}
        n, h, w = images.shape[:3]
        pad = ((0, 0), (p, p), (p, p)) + ((0, 0),) * (images.ndim - 3)
        padded = np.pad(images, pad, mode=self.mode)
        dy = integers(keys, 0, 2 * p + 1)
        dx = integers(keys, 1, 2 * p + 1)
        # One gather for the whole batch: rows[b, i] = dy[b] + i, cols[b, j] = dx[b] + j.
        rows = (dy[:, None] + np.arange(h))[:, :, None]
        cols = (dx[:, None] + np.arange(w))[:, None, :]
        return {**batch, "image": padded[np.arange(n)[:, None, None], rows, cols]}

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding}, mode={self.mode!r})"


class RandomHorizontalFlip(grain.transforms.RandomMap, BatchTransform):
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = float(p)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        if rng.random() < self.p:
            # Contiguous copy rather than a negative-stride view: cheaper to batch and to
            # hand to JAX later.
            return {**element, "image": np.ascontiguousarray(image[:, ::-1])}
        return {**element}

    def map_batch(self, batch: dict[str, Any], keys: np.ndarray) -> dict[str, Any]:
        images = batch["image"]
        flip = uniform(keys, 2) < self.p
        if not flip.any():
            return {**batch}
        out = images.copy()
        out[flip] = images[flip][:, :, ::-1]
        return {**batch, "image": out}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize(grain.transforms.Map, BatchTransform):
    """uint8 image -> float32 ``(image / 255 - mean) / std`` per channel; other keys (the
    int32 label) pass through unchanged.

    ``mean`` and ``std`` are in [0, 1] pixel units, one value per channel (or one value
    for all channels), e.g. ``DatasetInfo.mean`` / ``DatasetInfo.std``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean_a = np.asarray(mean, dtype=np.float64).reshape(-1)
        std_a = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean_a.size == 0 or mean_a.shape != std_a.shape:
            raise ValueError(
                f"Normalize needs mean and std of the same non-zero length, got {mean} and {std}"
            )
        if np.any(std_a <= 0):
            raise ValueError(f"Normalize std must be positive, got {std}")
        self.mean = tuple(float(v) for v in mean_a)
        self.std = tuple(float(v) for v in std_a)
        # One multiply-add per pixel: x * scale - shift == (x / 255 - mean) / std.
        self.scale = (1.0 / (255.0 * std_a)).astype(np.float32)
        self.shift = (mean_a / std_a).astype(np.float32)

    def _normalize(self, image: np.ndarray, has_channels: bool) -> np.ndarray:
        channels = image.shape[-1] if has_channels else 1
        if self.scale.size not in (1, channels):
            # Without this check NumPy would silently broadcast a 1-channel image to 3.
            raise ValueError(
                f"Normalize has {self.scale.size} channel statistics but the image has shape "
                f"{image.shape}; use the mean/std of this dataset (DatasetInfo.mean/std)"
            )
        scale = self.scale if has_channels else self.scale[0]
        shift = self.shift if has_channels else self.shift[0]
        out = image.astype(np.float32)
        out *= scale
        out -= shift
        return out

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        image = element["image"]
        return {**element, "image": self._normalize(image, image.ndim == 3)}

    def map_batch(self, batch: dict[str, Any], keys: np.ndarray) -> dict[str, Any]:
        images = batch["image"]
        return {**batch, "image": self._normalize(images, images.ndim == 4)}

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class CheckLabels(grain.transforms.Map, BatchTransform):
    """Refuse labels outside ``[0, num_classes)``: raise :class:`~resnet_task.errors.DataError`
    naming the label, the valid range and ``source``; examples without a ``"label"`` pass.

    Without it such a label trains silently (its one-hot target is all zeros). It runs
    on the host, in Grain's read threads or worker processes, on each batch's label
    vector only (one comparison per example), so whatever ``train_data()`` or
    ``val_data()`` a Task returns is checked, not only the built-in loaders' output.
    """

    def __init__(self, num_classes: int, source: str = "the data"):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"CheckLabels num_classes must be a positive integer, got "
                             f"{num_classes!r}")
        self.num_classes = int(num_classes)
        self.source = source

    def _check(self, labels: Any) -> None:
        labels = np.asarray(labels)
        # Written so that NaN fails too (every comparison with NaN is False).
        bad = ~((labels >= 0) & (labels < self.num_classes))
        if np.any(bad):
            values = np.unique(labels[bad])
            shown = ", ".join(repr(v.item()) for v in values[:5])
            raise DataError(
                f"{self.source} yielded label {shown}{', ...' if values.size > 5 else ''}, "
                f"outside the valid range [0, {self.num_classes}) of the model's "
                f"{self.num_classes} classes; fix the labels of that data source, or give "
                f"the task a dataset with as many classes as its labels need"
            )

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if "label" in element:
            self._check(element["label"])
        return element

    def map_batch(self, batch: dict[str, Any], keys: np.ndarray) -> dict[str, Any]:
        if "label" in batch:
            self._check(batch["label"])
        return batch

    def __repr__(self) -> str:
        return f"CheckLabels(num_classes={self.num_classes}, source={self.source!r})"
