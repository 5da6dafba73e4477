"""Image decoding at a reduced JPEG scale, through simplejpeg when it is installed.

Every decode of the data path (:func:`resnet_task.image_folder.decode_image`,
:func:`resnet_task.imagenet.decode_crop`) goes through :func:`decode_rgb`: it decodes a
JPEG at the smallest of the 1/1, 1/2, 1/4, 1/8 DCT scales that keeps the size the
caller asks for, and any other format at full size, to an RGB Pillow image.

Two backends, chosen per call:

* ``simplejpeg`` (the ``jpeg`` extra: ``pip install "nnx-trainer[jpeg]"``), libjpeg-turbo
  through its TurboJPEG API, decodes straight to an RGB array. It picks the same scale by
  Pillow's rule and the same default (accurate) DCT and upsampling as Pillow, so the pixels
  are identical to Pillow's (a test compares them), only a little faster: decode +
  RandomResizedCrop 224 of a 500x375 photo in 1.73 vs 1.81 ms (benchmarks/README.md,
  section 8, "Decoders").
* ``pillow``: the fallback, and what handles every file simplejpeg does not (PNG, CMYK,
  anything it rejects; a file Pillow cannot read either is bad, so the ``bad_images``
  policy sees Pillow's error, whichever backend was tried first).

The others that ship as wheels were measured too and not kept: OpenCV (libjpeg-turbo
too) is faster only through its resize filter, which changes the pixels; PyTurboJPEG
needs a system ``libturbojpeg``, which the wheel does not bring.
``RESNET_TASK_JPEG_DECODER=pillow`` (environment, so Grain's worker processes see it
too) forces Pillow; the default ``auto`` takes simplejpeg when it imports.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from resnet_task.extras import require

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DECODERS", "decoder_name", "decode_rgb", "draft_scale"]

DECODERS = ("auto", "pillow", "simplejpeg")
ENV_VAR = "RESNET_TASK_JPEG_DECODER"

_JPEG_MAGIC = b"\xff\xd8\xff"

try:  # the optional backend (extra "jpeg")
    import simplejpeg
except ImportError:  # Pillow does everything, a little slower
    simplejpeg = None

T = TypeVar("T")

# (full height, full width) -> the (width, height) the decoded image must keep.
SizeRequest = Callable[[int, int], tuple[int, int]]


def _pillow():  # -> the PIL.Image module
    return require("PIL.Image", "decoding images")


def decoder_name() -> str:
    """The backend this process uses now: ``"simplejpeg"`` or ``"pillow"``."""
    wanted = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if wanted not in DECODERS:
        raise ValueError(f"{ENV_VAR}={wanted!r}: choose one of {', '.join(DECODERS)}")
    if wanted == "simplejpeg" and simplejpeg is None:
        raise ImportError(f"{ENV_VAR}=simplejpeg but simplejpeg is not installed: "
                          'pip install "nnx-trainer[jpeg]", or unset it to use Pillow')
    if wanted == "pillow" or simplejpeg is None:
        return "pillow"
    return "simplejpeg"


def draft_scale(width: int, height: int, request: tuple[int, int]) -> int:
    """Pillow's ``draft`` rule: the largest of 8, 4, 2, 1 not above either side's ratio."""
    ratio = min(width // max(1, request[0]), height // max(1, request[1]))
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def _read(file: str | Path | BinaryIO) -> bytes:
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            return f.read()
    return file.read()


def _simplejpeg_rgb(data: bytes, request: SizeRequest) -> tuple[Image.Image, float] | None:
    """simplejpeg's decode and its scale, or None where it does not apply (Pillow decides)."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace.upper() in ("CMYK", "YCCK"):  # Pillow inverts Adobe CMYK; leave it to it
            return None
        scale = draft_scale(width, height, request(height, width))
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_factor=scale,
            min_height=-(-height // scale), min_width=-(-width // scale))
    except ValueError:  # truncated, corrupt, or a variant it rejects: Pillow's verdict counts
        return None
    # 1/scale, as Pillow's draft reports it (not the rounded-up decoded size / full size).
    return _pillow().fromarray(pixels), 1.0 / scale


def decode_rgb(file: str | Path | BinaryIO, request: SizeRequest,
               use: Callable[[Image.Image, float], T]) -> T:
    """``use(image, scale)`` for ``file`` (a path or a binary file object) decoded to RGB.

    ``request(height, width)`` gets the full size and returns the ``(width, height)`` the
    decoded image must keep; a JPEG is decoded at the smallest DCT scale (1/1 .. 1/8) that
    keeps it. ``scale`` is the image's size relative to the full size (1, 1/2, 1/4 or
    1/8), to map full-size coordinates onto it. The image is valid only inside ``use``
    (Pillow's is closed after it). Raises what Pillow raises for a bad file.
    """
    if decoder_name() == "simplejpeg":
        data = _read(file)
        decoded = _simplejpeg_rgb(data, request)
        if decoded is not None:
            return use(*decoded)
        file = io.BytesIO(data)
    with _pillow().open(file) as img:
        width, height = img.size
        drafted = img.draft("RGB", request(height, width))  # None: no reduced decoding
        scale = drafted[1][2] / width if drafted else 1.0
        return use(img if img.mode == "RGB" else img.convert("RGB"), scale)
