"""What every image-classification loader shares: the :class:`DatasetInfo` it returns, the
in-memory :class:`ArraySource`, the checks of its arguments and the per-class train/val split.

Kept apart from the loaders (:mod:`resnet_task.data`, :mod:`resnet_task.cifar`,
:mod:`resnet_task.arrayrecord`, ...) so they all build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from resnet_task.errors import DataError

__all__ = ["DatasetInfo", "ArraySource", "IMAGENET_MEAN", "IMAGENET_STD", "check_fraction",
           "check_image_size", "stratified_split", "channel_mean_std"]

# ImageNet statistics (torchvision's) in [0, 1] pixel units, a reasonable default for
# arbitrary natural images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the input normalisation need to know about a dataset.

    ``mean`` and ``std`` are per channel, in [0, 1] pixel units (i.e. for ``image / 255``).
    ``class_names`` is empty when classes have no names beyond their index.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_val: int
    class_names: tuple[str, ...] = ()


# Sources are module-level classes holding only arrays / strings, so Grain can pickle them
# into its (spawned) worker processes.


class ArraySource:
    """Examples served from one in-memory uint8 image array and an int32 label array.

    The arrays are made read-only: elements are views into them, so an augmentation that
    wrongly modifies its input in place fails loudly instead of corrupting the dataset.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 array of shape (N, H, W, C), got {images.dtype} "
                f"{images.shape}"
            )
        if labels.shape != (len(images),):
            raise DataError(
                f"labels must have shape ({len(images)},) to match the images, got {labels.shape}"
            )
        # Read-only views: the caller's arrays keep their own flags.
        self._images = images.view()
        self._labels = labels.astype(np.int32, copy=False).view()
        self._images.flags.writeable = False
        self._labels.flags.writeable = False

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Grain's batched read: one fancy index per array for a whole batch."""
        index = np.asarray(indices)
        images, labels = self._images[index], self._labels[index]
        return [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]

    @property
    def images(self) -> np.ndarray:
        """All images, (N, H, W, C) uint8, read-only."""
        return self._images

    @property
    def labels(self) -> np.ndarray:
        """All labels, (N,) int32, read-only."""
        return self._labels

    def __repr__(self) -> str:
        return f"ArraySource(n={len(self)}, image_shape={self._images.shape[1:]})"


def check_fraction(val_fraction: float) -> None:
    """Raise DataError unless ``val_fraction`` is in (0, 1)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")


def check_image_size(image_size: int) -> None:
    """Raise DataError unless ``image_size`` is a positive integer."""
    if int(image_size) != image_size or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices: ``round(n * val_fraction)`` of each class to
    val, but never all of a class with >= 2 examples, and at least one when that is possible.

    Own implementation rather than sklearn's ``train_test_split(stratify=...)``: that one
    rejects classes with a single example, which small image folders can have.
    """
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = min(max(int(round(n * val_fraction)), 1), n - 1) if n >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in float64 for accuracy on small data."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))
