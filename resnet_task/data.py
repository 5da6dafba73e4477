"""Image-classification datasets as Grain ``MapDataset``s of single examples.

Every loader returns ``(train, val, info)``: two ``grain.MapDataset``s whose elements are
``{"image": np.ndarray uint8 (H, W, C), "label": np.int32 scalar}`` and a ``DatasetInfo``.
The engine does the shuffling, augmentation, sharding and batching; the loaders only read.

All validation happens when a loader is called, so a bad ``--data-dir`` fails before any
model is built or compiled, with a message that says what is wrong and what to change.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from resnet_task.errors import DataError
from resnet_task.image_folder import (
    IMAGE_EXTENSIONS,
    ImageFileSource,
    check_bad_image_policy,
    scan_folder,
    verify_images,
)

__all__ = [
    "DataError",
    "DatasetInfo",
    "ArraySource",
    "ImageFileSource",
    "SyntheticSource",
    "load_digits",
    "load_cifar",
    "load_image_folder",
    "load_synthetic",
    "load_dataset",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
]


# Standard per-channel statistics in [0, 1] pixel units.
# CIFAR: mean and per-pixel std over the 50,000 training images (e.g. the values used by
# torchvision-based CIFAR recipes; the often-quoted std (0.2023, 0.1994, 0.2010) is the std of
# per-image means and underestimates the pixel std, so it is not used here).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# ImageNet statistics (torchvision's), a reasonable default for arbitrary natural images.
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


# ---- random-access sources -------------------------------------------------------------------
# Module-level classes holding only arrays / strings, so Grain can pickle them into its
# (spawned) worker processes.


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


# ---- validation helpers ------------------------------------------------------------------------


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


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _check_image_size(image_size: int) -> None:
    if int(image_size) != image_size or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")


def _stratified_split(
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


def _mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in float64 for accuracy on small data."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


# ---- digits ------------------------------------------------------------------------------------


def load_digits(
    image_size: int = 16, val_fraction: float = 0.2, seed: int = 0
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    Pixel values 0..16 are scaled to uint8 0..255 and bilinearly resized to
    ``image_size`` x ``image_size`` with one channel. The stratified train/val split depends
    only on ``val_fraction`` and ``seed``, so the held-out set is the same on every run.
    Mean/std come from the training split.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # slow import: only when used

    _check_image_size(image_size)
    _check_fraction(val_fraction)
    image_size = int(image_size)
    digits = _sk_load_digits()
    raw = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if image_size == raw.shape[1]:
        images = raw
    else:
        images = np.stack(
            [
                np.asarray(
                    Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR)
                )
                for im in raw
            ]
        )
    images = np.ascontiguousarray(images[..., None])
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    mean, std = _mean_std(images[train_idx])
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(image_size, image_size, 1),
        mean=mean,
        std=std,
        num_train=len(train_idx),
        num_val=len(val_idx),
        class_names=tuple(str(i) for i in range(10)),
    )
    train = grain.MapDataset.source(ArraySource(images[train_idx], labels[train_idx]))
    val = grain.MapDataset.source(ArraySource(images[val_idx], labels[val_idx]))
    return train, val, info


# ---- CIFAR -------------------------------------------------------------------------------------

_CIFAR_LAYOUT = {
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


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle -> (N, 32, 32, 3) uint8 images and (N,) int64 labels."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the files were written by Python 2; keys come back as bytes.
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
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
    if num_classes not in _CIFAR_LAYOUT:
        raise DataError(f"CIFAR num_classes must be 10 or 100, got {num_classes}")
    layout = _CIFAR_LAYOUT[num_classes]
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


# ---- image folder ------------------------------------------------------------------------------


def load_image_folder(
    root: str | Path,
    image_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    verify: bool = False,
    bad_images: str = "stop",
    max_bad_fraction: float = 0.01,
    encoded: bool = False,
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """Images in ``root/<class_name>/*.{png,jpg,jpeg,bmp,gif,webp}``, labels by sorted class
    name; split per class into train/val by ``val_fraction`` and ``seed``. If ``root/train/``
    and ``root/val/`` exist they are used as the splits instead (same class names required).

    Building lists the directories and opens no file; decoding (to RGB, resized and
    centre-cropped to ``image_size``) happens lazily per element, in Grain's readers,
    where an undecodable file follows ``bad_images`` (``"stop"`` or ``"skip"``, bounded
    by ``max_bad_fraction``; see :mod:`resnet_task.image_folder`). ``verify=True`` checks
    every file with Pillow's ``verify()`` first and lists every bad one. ``encoded=True``:
    elements carry the undecoded file instead (for transforms that crop the full-size
    image, see :meth:`resnet_task.image_folder.PolicySource.encoded`).
    Normalisation uses ImageNet's mean/std.
    """
    _check_image_size(image_size)
    check_bad_image_policy(bad_images, max_bad_fraction)
    image_size = int(image_size)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(
            f"image folder '{root}' not found: expected '<dir>/<class_name>/<image>' "
            "(or '<dir>/train/<class_name>/' and '<dir>/val/<class_name>/'); "
            "pass --data-dir pointing at it"
        )
    has_train, has_val = (root_path / "train").is_dir(), (root_path / "val").is_dir()
    if has_train and has_val:
        class_names, train_paths, train_labels = scan_folder(root_path / "train")
        val_names, val_paths, val_labels = scan_folder(root_path / "val")
        if class_names != val_names:
            only_train = sorted(set(class_names) - set(val_names))
            only_val = sorted(set(val_names) - set(class_names))
            raise DataError(
                f"class folders of '{root_path / 'train'}' and '{root_path / 'val'}' differ "
                f"(only in train: {only_train}, only in val: {only_val}); "
                "make both hold the same class folders"
            )
        if verify:
            verify_images(train_paths + val_paths)
    elif has_train != has_val:
        present, absent = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"image folder '{root_path}' has '{present}/' but no '{absent}/': add "
            f"'{absent}/<class_name>/' folders, or put the class folders directly in "
            f"'{root_path}' to have a validation split carved out by val_fraction"
        )
    else:
        _check_fraction(val_fraction)
        class_names, paths, labels = scan_folder(root_path)
        if verify:
            verify_images(paths)
        train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
        train_paths = [paths[i] for i in train_idx]
        val_paths = [paths[i] for i in val_idx]
        train_labels, val_labels = labels[train_idx], labels[val_idx]

    info = DatasetInfo(
        name="folder",
        num_classes=len(class_names),
        image_shape=(image_size, image_size, 3),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_train=len(train_paths),
        num_val=len(val_paths),
        class_names=tuple(class_names),
    )
    policy = {"bad_images": bad_images, "max_bad_fraction": max_bad_fraction}
    train = ImageFileSource(train_paths, train_labels, image_size, **policy)
    val = ImageFileSource(val_paths, val_labels, image_size, **policy)
    if encoded:
        train, val = train.encoded(), val.encoded()
    return grain.MapDataset.source(train), grain.MapDataset.source(val), info


# ---- synthetic ---------------------------------------------------------------------------------


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
    _check_fraction(val_fraction)
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


# ---- dispatch ----------------------------------------------------------------------------------

DATASET_NAMES = ("digits", "cifar10", "cifar100", "folder", "arrayrecord", "synthetic")


def load_dataset(
    name: str,
    data_dir: str | Path | None,
    image_size: int | None,
    seed: int = 0,
    **kw: Any,
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """Load a dataset by name; ``image_size=None`` means the dataset's default size.

    Extra keyword arguments go to the loader (e.g. ``val_fraction``, or ``num_examples`` /
    ``num_classes`` for "synthetic").
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if name in ("cifar10", "cifar100", "folder", "arrayrecord") and data_dir is None:
        raise DataError(f"dataset {name!r} reads files from disk; pass --data-dir")
    if name == "digits":
        return load_digits(16 if image_size is None else image_size, seed=seed, **kw)
    if name in ("cifar10", "cifar100"):
        if image_size not in (None, 32):
            raise DataError(
                f"CIFAR images are 32x32; image_size={image_size} is not supported: "
                "omit --image-size (or set it to 32)"
            )
        return load_cifar(data_dir, num_classes=10 if name == "cifar10" else 100, **kw)
    if name == "folder":
        size = 64 if image_size is None else image_size
        return load_image_folder(data_dir, size, seed=seed, **kw)
    if name == "arrayrecord":  # shards written by `python -m resnet_task.convert`
        from resnet_task.arrayrecord import load_arrayrecord  # imports this module

        return load_arrayrecord(data_dir, image_size, seed=seed, **kw)
    size = 32 if image_size is None else image_size
    _check_image_size(size)
    kw.setdefault("num_examples", 2048)
    channels = kw.pop("channels", 3)
    return load_synthetic(image_shape=(size, size, channels), seed=seed, **kw)
