"""Synthetic images with a learnable class signal, generated lazily per element.

For smoke tests and benchmarks: no files, any size, and a small model's loss drops within
a few steps.
"""

from __future__ import annotations

import grain
import numpy as np

from resnet_task.dataset_base import DatasetInfo, check_fraction
from resnet_task.errors import DataError

__all__ = ["SyntheticSource", "load_synthetic"]


class SyntheticSource:
    """Random images with a learnable class signal, generated on the fly per index.

    Each class has a fixed blocky colour template (a 4x4 grid of random per-channel
    intensities, upsampled to the image size); an example is its class template plus Gaussian
    noise, clipped to uint8. The noise is seeded by ``(seed, split, index)`` so any element
    can be produced in any worker process and is the same every time.
    """

    def __init__(
        self, templates: np.ndarray, labels: np.ndarray, seed: int, split: int, noise_std: float
    ):
        self._templates = templates  # (num_classes, H, W, C) float32
        self._labels = np.asarray(labels, dtype=np.int32)
        self._seed = int(seed)
        self._split = int(split)
        self._noise_std = float(noise_std)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        label = self._labels[index]
        rng = np.random.default_rng((self._seed, self._split, index))
        template = self._templates[label]
        noise = rng.standard_normal(template.shape, dtype=np.float32) * self._noise_std
        image = np.clip(np.rint(template + noise), 0, 255).astype(np.uint8)
        return {"image": image, "label": label}

    @property
    def labels(self) -> np.ndarray:
        """All labels, (N,) int32."""
        return self._labels

    def __repr__(self) -> str:
        return f"SyntheticSource(n={len(self)}, image_shape={self._templates.shape[1:]})"


def load_synthetic(
    num_examples: int,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    seed: int = 0,
    val_fraction: float = 0.2,
    noise_std: float = 48.0,
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """``num_examples`` random images in total (``val_fraction`` of them held out) whose class
    is visible in a per-class blocky colour template under Gaussian noise, so a small model's
    loss drops within a few steps. Fully determined by ``seed``; generated lazily per element.
    """
    if num_examples < 2:
        raise DataError(f"num_examples must be >= 2 (one train, one val), got {num_examples}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise DataError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
    check_fraction(val_fraction)
    h, w, c = (int(s) for s in image_shape)
    rng = np.random.default_rng(seed)
    grid = rng.uniform(48.0, 208.0, size=(num_classes, 4, 4, c)).astype(np.float32)
    rows, cols = np.arange(h) * 4 // h, np.arange(w) * 4 // w
    templates = np.ascontiguousarray(grid[:, rows][:, :, cols])  # (K, H, W, C)
    # Balanced classes in random order.
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    num_val = min(max(int(round(num_examples * val_fraction)), 1), num_examples - 1)
    train_src = SyntheticSource(templates, labels[num_val:], seed, split=0, noise_std=noise_std)
    val_src = SyntheticSource(templates, labels[:num_val], seed, split=1, noise_std=noise_std)
    # Mean/std of the generating process, close enough to the sample statistics.
    mean = tuple(float(v) / 255.0 for v in templates.mean(axis=(0, 1, 2)))
    std = tuple(float(np.sqrt(v + noise_std**2)) / 255.0 for v in templates.var(axis=(0, 1, 2)))
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        image_shape=(h, w, c),
        mean=mean,
        std=std,
        num_train=len(train_src),
        num_val=len(val_src),
    )
    return grain.MapDataset.source(train_src), grain.MapDataset.source(val_src), info
