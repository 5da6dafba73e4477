"""CIFAR-10 and CIFAR-100 from the standard "python version" directories.

The batch files are pickles written by Python 2; they are read with an unpickler that
allows only NumPy array globals, so a tampered file cannot run code when it is loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import grain
import numpy as np

from resnet_task.dataset_base import ArraySource, DatasetInfo
from resnet_task.errors import DataError

__all__ = ["load_cifar", "CIFAR_LAYOUT", "ArrayOnlyUnpickler", "CIFAR10_MEAN", "CIFAR10_STD",
           "CIFAR100_MEAN", "CIFAR100_STD"]

# Per-channel statistics in [0, 1] pixel units: mean and per-pixel std over the 50,000
# training images (e.g. the values used by torchvision-based CIFAR recipes; the often-quoted
# std (0.2023, 0.1994, 0.2010) is the std of per-image means and underestimates the pixel
# std, so it is not used here).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

#: Each variant's directory, batch files, label key and statistics.
CIFAR_LAYOUT = {
    10: {
        "name": "cifar10",
        "title": "CIFAR-10",
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "archive": "the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz)",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
    },
    100: {
        "name": "cifar100",
        "title": "CIFAR-100",
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "archive": "the 'CIFAR-100 python version' archive (cifar-100-python.tar.gz)",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
    },
}

# The only globals a CIFAR pickle needs: NumPy array reconstruction, plus `_codecs.encode`,
# which Python 3 protocol-2 pickles use for bytes. Allowing nothing else means a tampered
# file cannot run code when it is loaded.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError naming the first label outside [0, num_classes); vectorised."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: label {int(labels[i])} at index {i} is outside [0, {num_classes}) "
            f"({bad.size} bad labels in total); the file does not belong to a "
            f"{num_classes}-class dataset: check the dataset name / num_classes and the files"
        )


def _read_cifar_batch(path: Path, label_key: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (N, 32, 32, 3) uint8 images and (N,) int64 labels."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the files were written by Python 2; keys come back as bytes.
            batch = ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, foreign globals...
        raise DataError(f"cannot read CIFAR batch '{path}' ({e}); {hint}") from e
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR batch '{path}' holds a {type(batch).__name__}, not a dict; {hint}")
    # Real files use bytes keys; accept str keys too (files re-saved under Python 3).
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise DataError(
            f"CIFAR batch '{path}' lacks key(s) {missing} (has {sorted(map(str, batch))}); {hint}"
        )
    data, labels = batch["data"], np.asarray(batch[label_key])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"CIFAR batch '{path}': 'data' must be a uint8 array of shape (N, 3072), "
            f"got {desc}; {hint}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"CIFAR batch '{path}': '{label_key}' must be {len(data)} integers (one per image), "
            f"got {labels.dtype} {labels.shape}; {hint}"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B); the engine wants (H, W, C).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _resolve_cifar_dir(data_dir: str | Path, layout: dict[str, Any]) -> Path:
    """Accept the extracted directory itself or its parent."""
    expected = (
        f"expected '{layout['dir']}/' with {', '.join(layout['train'][:1])}"
        f"{'..5' if len(layout['train']) > 1 else ''} and {layout['test'][0]} "
        f"({layout['archive']}, extracted)"
    )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{layout['title']} directory '{data_dir}' not found: {expected}; "
            "pass --data-dir pointing at it"
        )
    if (root / layout["dir"]).is_dir():
        return root / layout["dir"]
    if any((root / n).exists() for n in layout["train"] + layout["test"]):
        return root
    raise DataError(
        f"{layout['title']} directory '{data_dir}' contains neither '{layout['dir']}/' nor its "
        f"batch files: {expected}; pass --data-dir pointing at '{layout['dir']}/' or its parent"
    )


def load_cifar(
    data_dir: str | Path, num_classes: int = 10
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``, fine labels) from the
    standard "python version" directories; returns ``(train, test, info)``.

    ``data_dir`` may be ``cifar-10-batches-py/`` / ``cifar-100-python/`` or its parent. All
    images are read once into one (N, 32, 32, 3) uint8 array (~150 MB for the train split).
    The files are pickles; only NumPy array globals are allowed when loading them.
    """
    if num_classes not in CIFAR_LAYOUT:
        raise DataError(f"CIFAR num_classes must be 10 or 100, got {num_classes}")
    layout = CIFAR_LAYOUT[num_classes]
    root = _resolve_cifar_dir(data_dir, layout)
    hint = f"replace '{root}' by extracting {layout['archive']} again"

    def read_split(names: list[str]) -> ArraySource:
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise DataError(f"{layout['title']} directory '{root}' is missing {missing}; {hint}")
        parts = [_read_cifar_batch(root / n, layout["label_key"], hint) for n in names]
        for name, (_, labels) in zip(names, parts, strict=True):
            _check_labels(labels, num_classes, f"{layout['title']} batch '{root / name}'")
        images = np.concatenate([p[0] for p in parts])  # one contiguous copy (N, 32, 32, 3)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
        return ArraySource(images, labels)

    train_src = read_split(layout["train"])
    test_src = read_split(layout["test"])
    info = DatasetInfo(
        name=layout["name"],
        num_classes=num_classes,
        image_shape=(32, 32, 3),
        mean=layout["mean"],
        std=layout["std"],
        num_train=len(train_src),
        num_val=len(test_src),
    )
    return grain.MapDataset.source(train_src), grain.MapDataset.source(test_src), info
