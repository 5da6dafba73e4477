"""The standard ImageNet recipe: Inception-style random crops for training, a centre crop
for evaluation, decoded at a reduced JPEG scale, and the Flax ImageNet example's preset.

* :class:`RandomResizedCrop` (training): a box covering a uniform 8-100% of the image's
  area, with an aspect ratio log-uniform in [3/4, 4/3], at a uniform position; up to 10
  attempts, then a centre crop of the whole image narrowed to the allowed ratios (the
  algorithm of Szegedy et al., 2015, as torchvision describes it), resized to ``size``.
* :class:`CenterCrop` (evaluation): resize the shorter side to ``round(size / 0.875)``
  and take the central ``size`` x ``size`` (224 from 256).

Both work on the full-size image, so they act where decoding happens: given an
:class:`~resnet_task.image_folder.EncodedImage` (from a source in encoded mode, see
:meth:`resnet_task.image_folder.PolicySource.encoded`) they open the file, choose the box
from the image's size, ask libjpeg (Pillow's ``draft``) to decode at the smallest of the
1/1, 1/2, 1/4, 1/8 scales at which the box still has ``size`` x ``size`` pixels, and
resize just the box, in one Pillow call. A decoded ``(H, W, C)`` uint8 array (CIFAR, or a
source left in decoding mode) is cropped the same way, without the draft step.

Randomness: :class:`RandomResizedCrop` is a Grain ``RandomMap``. The Trainer applies
per-example transforms with ``random_map`` seeded per epoch, and Grain derives each
element's generator from that seed and the example's index, so an example's crop
depends only on (seed, epoch, example): the same on every process and after a resume.
All draws are made up front (4 per attempt), so the stream never depends on the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import grain
import numpy as np

from resnet_task.extras import require
from resnet_task.image_folder import EncodedImage
from resnet_task.jpeg import decode_rgb

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["RandomResizedCrop", "CenterCrop", "sample_crop_box", "center_crop_box",
           "decode_crop", "IMAGENET_PRESET", "resolve_recipe", "RECIPES"]

# (top, left, height, width) in the original image's pixel coordinates.
Box = tuple[float, float, float, float]

RESIZE_RATIO = 0.875  # evaluation: crop 224 out of a 256 resize
RECIPES = ("default", "imagenet")

_DRAWS_PER_ATTEMPT = 4  # area, log-ratio, top, left


def sample_crop_box(
    height: int,
    width: int,
    draws: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The random-resized-crop box ``(top, left, h, w)`` of a ``height`` x ``width`` image.

    ``draws`` is ``(attempts, 4)`` uniforms in [0, 1): per attempt the area fraction (in
    ``scale``), the log aspect ratio w/h (in ``log(ratio)``), the top and the left offset.
    The first attempt whose box fits in the image wins; if none does, the whole image,
    cut down to the nearest allowed ratio, centred.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in np.asarray(draws, dtype=np.float64):
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            # u < 1, so the offsets stay in [0, side - crop].
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    image_ratio = width / height
    if image_ratio < ratio[0]:  # too tall: full width, height cut to the narrowest ratio
        w, h = width, min(height, round(width / ratio[0]))
    elif image_ratio > ratio[1]:  # too wide
        w, h = min(width, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, size: int,
                    resize_ratio: float = RESIZE_RATIO) -> Box:
    """The box, in original pixels, of "resize the shorter side to ``round(size /
    resize_ratio)``, then centre-crop ``size`` x ``size``".

    The resized sizes and the crop offset are the integers the two-step version would use
    (longer side truncated, offsets rounded), so resizing this box straight to ``size``
    samples the same points as resizing the whole image and then cropping.
    """
    short = round(size / resize_ratio)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, size * sy, size * sx


def _crop_resize(img: Image.Image, box: Box, size: int, coord_scale: float) -> Image.Image:
    top, left, h, w = (v * coord_scale for v in box)
    # One resampling from the box straight to the output size (Pillow reads only the box).
    bilinear = require("PIL.Image", "cropping images").Resampling.BILINEAR
    return img.resize((size, size), bilinear, box=(left, top, left + w, top + h))


def decode_crop(file: str | BinaryIO, box_for: Callable[[int, int], Box], size: int) -> np.ndarray:
    """Decode an image file to RGB uint8 ``(size, size, 3)``: the box ``box_for(h, w)``
    (``(top, left, h, w)`` in full-size pixels) resized to ``size`` x ``size``.

    JPEGs are decoded at the smallest DCT scale (1/8, 1/4, 1/2 or 1) at which the box is
    still at least ``size`` pixels on each side: most of the decoding work is skipped
    for small boxes and large photos, and the output is never upsampled because of it.
    The decoder is :mod:`resnet_task.jpeg`'s (simplejpeg when installed, else Pillow).
    """
    boxes: list[Box] = []

    def request(height: int, width: int) -> tuple[int, int]:
        boxes.append(box_for(height, width))
        _, _, h, w = boxes[0]
        return max(1, math.ceil(width * size / w)), max(1, math.ceil(height * size / h))

    def crop(img: Image.Image, scale: float) -> np.ndarray:
        return np.asarray(_crop_resize(img, boxes[0], size, scale), dtype=np.uint8)

    return decode_rgb(file, request, crop)


def _crop_array(image: np.ndarray, box_for: Callable[[int, int], Box], size: int) -> np.ndarray:
    """:func:`decode_crop` of an already-decoded ``(H, W, C)`` uint8 array (C = 1 or 3)."""
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    pillow = require("PIL.Image", "cropping images")
    img = pillow.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(_crop_resize(img, box_for(*image.shape[:2]), size, 1.0), dtype=np.uint8)
    return out[..., None] if squeeze else out


def _apply(element: Mapping[str, Any], box_for: Callable[[int, int], Box],
           size: int) -> dict[str, Any]:
    image = element["image"]
    if isinstance(image, EncodedImage):
        # Under bad_images="skip" a bad file is replaced by the next good one, label too,
        # and the fields say so ("replaced").
        pixels, fields = image.decode(lambda f: decode_crop(f, box_for, size))
        return {**element, **fields, "image": pixels}
    return {**element, "image": _crop_array(np.asarray(image), box_for, size)}


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"crop size must be a positive integer, got {size!r}")
    return int(size)


class RandomResizedCrop(grain.transforms.RandomMap):
    """Inception-style crop: a random box of 8-100% of the area, aspect ratio 3/4-4/3,
    resized to ``size`` x ``size`` (bilinear). See :func:`sample_crop_box`.

    A per-example Grain transform: it needs each image at its own size, before batching.
    Takes an :class:`~resnet_task.image_folder.EncodedImage` (decoded here, at a reduced
    JPEG scale where possible) or a decoded ``(H, W, C)`` uint8 array.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> None:
        self.size = _check_size(size)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.attempts = int(attempts)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        draws = rng.random((self.attempts, _DRAWS_PER_ATTEMPT))
        return _apply(element, lambda h, w: sample_crop_box(h, w, draws, self.scale, self.ratio),
                      self.size)

    def __repr__(self) -> str:
        return (f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio="
                f"({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), attempts={self.attempts})")


class CenterCrop(grain.transforms.Map):
    """Evaluation crop: resize the shorter side to ``round(size / resize_ratio)``, then
    take the central ``size`` x ``size`` (one resampling; see :func:`center_crop_box`)."""

    def __init__(self, size: int, resize_ratio: float = RESIZE_RATIO) -> None:
        self.size = _check_size(size)
        if not 0 < resize_ratio <= 1:
            raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
        self.resize_ratio = float(resize_ratio)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return _apply(element, lambda h, w: center_crop_box(h, w, self.size, self.resize_ratio),
                      self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size}, resize_ratio={self.resize_ratio})"


# ---- the preset ------------------------------------------------------------------------

# The Flax ImageNet example's hyperparameters, by the example's argparse names. The
# learning rate and the warmup are derived (resolve_recipe), so they follow the batch
# size and the epochs actually used.
IMAGENET_PRESET: dict[str, Any] = {
    "model": "resnet50",
    "stem": "imagenet",
    "image_size": 224,
    "batch_size": 1024,
    "epochs": 90,
    "optimizer": "sgd",  # the task's SGD: momentum 0.9, Nesterov
    "weight_decay": 1e-4,  # kept off batch-norm parameters and biases (weight_decay_mask)
    "label_smoothing": 0.0,
    "precision": "bf16",
}
IMAGENET_BASE_LR = 0.1  # per 256 examples of global batch (linear scaling)
IMAGENET_WARMUP_EPOCHS = 5


def resolve_recipe(recipe: str, given: Mapping[str, Any],
                   defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run uses: ``defaults``, then the recipe's preset, then ``given``
    (the flags set explicitly), which always win.

    For ``"imagenet"``, unless given: ``lr = 0.1 * batch_size / 256`` and
    ``warmup_fraction = 5 / epochs`` (5 warmup epochs; at most half the run, for runs of
    under 10 epochs), from the resolved batch size and epochs, so changing either keeps
    the recipe's rule.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    values = dict(defaults)
    if recipe == "imagenet":
        values.update(IMAGENET_PRESET)
        values.update(given)
        if "lr" not in given:
            values["lr"] = IMAGENET_BASE_LR * values["batch_size"] / 256
        if "warmup_fraction" not in given:
            values["warmup_fraction"] = min(IMAGENET_WARMUP_EPOCHS / max(values["epochs"], 1),
                                            0.5)
        return values
    values.update(given)
    return values
