"""Image-classification datasets as Grain ``MapDataset``s of single examples.

Every loader returns ``(train, val, info)``: two ``grain.MapDataset``s whose elements are
``{"image": np.ndarray uint8 (H, W, C), "label": np.int32 scalar}`` and a ``DatasetInfo``.
The engine does the shuffling, augmentation, sharding and batching; the loaders only read.

All validation happens when a loader is called, so a bad ``--data-dir`` fails before any
model is built or compiled, with a message that says what is wrong and what to change.

:func:`load_dataset` picks a loader by name. The bundled digits and image folders are read
here; CIFAR (:mod:`resnet_task.cifar`), synthetic data (:mod:`resnet_task.synthetic`) and
converted ArrayRecord shards (:mod:`resnet_task.arrayrecord`) have modules of their own,
all built on :mod:`resnet_task.dataset_base`. Their public names are importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np

from resnet_task.arrayrecord import load_arrayrecord
from resnet_task.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar,
)
from resnet_task.dataset_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArraySource,
    DatasetInfo,
    channel_mean_std,
    check_fraction,
    check_image_size,
    stratified_split,
)
from resnet_task.errors import DataError
from resnet_task.extras import require
from resnet_task.image_folder import (
    IMAGE_EXTENSIONS,
    ImageFileSource,
    check_bad_image_policy,
    scan_folder,
    verify_images,
)
from resnet_task.synthetic import SyntheticSource, load_synthetic

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
    "load_arrayrecord",
    "load_dataset",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


def load_digits(
    image_size: int = 16, val_fraction: float = 0.2, seed: int = 0
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download).

    Pixel values 0..16 are scaled to uint8 0..255 and bilinearly resized to
    ``image_size`` x ``image_size`` with one channel. The stratified train/val split depends
    only on ``val_fraction`` and ``seed``, so the held-out set is the same on every run.
    Mean/std come from the training split. Needs scikit-learn (the ``examples`` extra) and,
    for any size but 8, Pillow (the ``images`` extra).
    """
    check_image_size(image_size)
    check_fraction(val_fraction)
    image_size = int(image_size)
    # Imported here: scikit-learn is optional, and slow to import.
    datasets = require("sklearn.datasets", "the bundled digits dataset")
    digits = datasets.load_digits()
    raw = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if image_size == raw.shape[1]:
        images = raw
    else:
        pillow = require("PIL.Image", f"resizing the digits to {image_size}x{image_size}")
        bilinear = pillow.Resampling.BILINEAR
        images = np.stack([
            np.asarray(pillow.fromarray(im).resize((image_size, image_size), bilinear))
            for im in raw
        ])
    images = np.ascontiguousarray(images[..., None])
    labels = digits.target.astype(np.int32)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    mean, std = channel_mean_std(images[train_idx])
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
    check_image_size(image_size)
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
        check_fraction(val_fraction)
        class_names, paths, labels = scan_folder(root_path)
        if verify:
            verify_images(paths)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
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
        return load_arrayrecord(data_dir, image_size, seed=seed, **kw)
    size = 32 if image_size is None else image_size
    check_image_size(size)
    kw.setdefault("num_examples", 2048)
    channels = kw.pop("channels", 3)
    return load_synthetic(image_shape=(size, size, channels), seed=seed, **kw)
