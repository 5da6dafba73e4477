"""Tiny CIFAR-10/100 "python version" trees on disk, written as the real files are."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the files' channel-major (N, 3072) rows."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def write_pickle(path: Path, obj: Any) -> None:
    """Write ``obj`` as the real files are: a Python 2 protocol-2 pickle."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_fake_cifar(root: Path, num_classes: int = 10, n: int = 4, seed: int = 0
                    ) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tiny CIFAR-10/100 "python version" tree under ``root``; returns its directory and
    the expected ``{split: (images, labels)}``."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        d = root / "cifar-10-batches-py"
        names, label_key = [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        test_names = ["test_batch"]
    else:
        d = root / "cifar-100-python"
        names, label_key, test_names = ["train"], b"fine_labels", ["test"]
    d.mkdir(parents=True)
    expected = {}
    for split, split_names in (("train", names), ("test", test_names)):
        xs, ys = [], []
        for name in split_names:
            x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            y = rng.integers(0, num_classes, size=n).tolist()
            batch = {
                b"batch_label": f"{name} of fake".encode(),
                b"data": cifar_rows(x),
                label_key: y,
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            }
            if num_classes == 100:
                batch[b"coarse_labels"] = [v // 5 for v in y]
            write_pickle(d / name, batch)
            xs.append(x)
            ys += y
        expected[split] = (np.concatenate(xs), np.array(ys))
    return d, expected
