"""Image folders (``root/<class>/<image>``) at any size: a scan to build, a policy for bad files.

Building the dataset lists the directories (``os.scandir``: names and entry types, no
file is opened or stat'ed), so an ImageNet-size tree of 1.28 million files costs a
directory walk, not a pass over its bytes. Files are decoded when an example is read,
in Grain's readers. A file that fails to decode then follows ``bad_images``:

* ``"stop"`` (default): the read raises :class:`DataError` naming the file; the
  Trainer's pipeline shuts its readers down on the way out.
* ``"skip"``: the example is replaced by the next decodable one in index order (a pure
  function of the index, so every process and a resumed run get the same replacement),
  a warning names the file, and the reader stops with :class:`DataError` once more than
  ``max_bad_fraction`` of the dataset's files turned out bad. Every element then
  carries ``"replaced"`` (:data:`REPLACED_KEY`; in encoded mode once decoded),
  ``np.bool_`` True where the example was replaced, so the training step can count
  replacements over the global batch (:class:`resnet_task.metrics.ReplacedExamples`):
  the warning and :attr:`PolicySource.skipped` only know what one reader saw, in
  whichever Grain worker read it.

``verify=True`` opens every file up front instead (Pillow's ``verify()``, with a
progress bar) and lists every bad file in one error.

A source in *encoded* mode (:meth:`PolicySource.encoded`) decodes nothing itself: its
elements carry an :class:`EncodedImage`, which a recipe transform (see
:mod:`resnet_task.imagenet`) decodes, crops and resizes in one go, under the same policy.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Self, TypeVar

import numpy as np

from resnet_task.errors import DataError
from resnet_task.extras import require
from resnet_task.jpeg import decode_rgb

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BAD_IMAGE_POLICIES = ("stop", "skip")
#: The element key that flags a replaced example, under ``bad_images="skip"`` only.
REPLACED_KEY = "replaced"

log = logging.getLogger("resnet_task")

T = TypeVar("T")


class EncodedImage:
    """An example's image before decoding: what a source in encoded mode hands out.

    Lives only inside the reader that produced it (it points back at its source), between
    the source and the transform that decodes it.
    """

    __slots__ = ("_source", "_index")

    def __init__(self, source: PolicySource, index: int) -> None:
        self._source = source
        self._index = int(index)

    def decode(self, fn: Callable[[str | BinaryIO], T]) -> tuple[T, dict[str, np.ndarray]]:
        """``(fn(file), fields)`` for this example's file (a path or a binary file object):
        ``fields`` are the element's other keys for the example actually decoded, its
        ``"label"`` and, under ``bad_images="skip"``, ``"replaced"``.

        If ``fn`` raises, the source's ``bad_images`` policy applies: ``"stop"`` raises
        :class:`DataError` naming the file, ``"skip"`` calls ``fn`` on the next decodable
        example in index order and returns *that* example's label, with ``"replaced"``
        True.
        """
        source = self._source
        result, used = source._first_good(self._index, lambda i: fn(source._open(i)))
        return result, source._fields(self._index, used)

    def __repr__(self) -> str:
        return f"EncodedImage({self._source._describe(self._index)})"


class PolicySource:
    """Base of sources whose examples are decoded lazily and may turn out undecodable.

    Subclasses set ``_labels``, call ``_init_policy`` and implement ``__len__``,
    ``_decode(index)``, ``_open(index)`` and ``_describe(index)``; this class applies the
    ``bad_images`` policy of the module docstring. Shared so every on-disk format behaves
    the same way.
    """

    _plural = "examples"  # what the examples are, for messages
    _encoded = False  # True: elements carry an EncodedImage (see encoded())
    _stop_fix = "pass --bad-images skip to train around bad examples"
    _bound_fix = "fix the data or raise the bound"

    def _init_policy(self, bad_images: str, max_bad_fraction: float) -> None:
        check_bad_image_policy(bad_images, max_bad_fraction)
        self._bad_images = bad_images
        self._max_bad_fraction = float(max_bad_fraction)
        self._bad: dict[int, str] = {}  # index -> reason, in this reader

    def __len__(self) -> int:
        raise NotImplementedError

    def _decode(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _open(self, index: int) -> str | BinaryIO:
        """The example's encoded image, as something ``PIL.Image.open`` takes."""
        raise NotImplementedError

    def encoded(self) -> Self:
        """A copy of this source whose elements carry an :class:`EncodedImage`, not pixels.

        For transforms that need the full-size image (and decode it at a reduced JPEG
        scale when they can), e.g. :class:`resnet_task.imagenet.RandomResizedCrop`.
        """
        other = copy.copy(self)
        other._encoded = True
        other._bad = {}
        return other

    def _describe(self, index: int) -> str:
        """The example for messages, e.g. ``image '/data/cat/1.png'``."""
        raise NotImplementedError

    def _key(self, index: int) -> str:
        """The example in :attr:`skipped`."""
        return self._describe(index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if self._encoded:
            # Decoded later, by the transform, through EncodedImage.decode: only then is
            # it known whether the example is replaced, so "replaced" is added there.
            return {"image": EncodedImage(self, index), "label": self._labels[index]}
        image, used = self._first_good(index, self._decode)
        return {"image": image, **self._fields(index, used)}

    def _fields(self, index: int, used: int) -> dict[str, np.ndarray]:
        """The keys besides ``"image"`` of example ``index``, read from example ``used``."""
        fields = {"label": self._labels[used]}
        if self._bad_images == "skip":  # "stop" never replaces: its elements stay as they were
            fields[REPLACED_KEY] = np.bool_(used != index)
        return fields

    def _first_good(self, index: int, decode: Callable[[int], T]) -> tuple[T, int]:
        """``(decode(i), i)`` for the first decodable ``i`` from ``index`` on."""
        n = len(self)
        for offset in range(n):
            candidate = (index + offset) % n
            if candidate in self._bad:
                continue
            try:
                result = decode(candidate)
            except Exception as e:  # any decoder failure: name the example
                self._record_bad(candidate, e)
                continue
            return result, candidate
        raise DataError(f"none of the {n} {self._plural} could be decoded")

    def _record_bad(self, index: int, error: Exception) -> None:
        what = self._describe(index)
        if self._bad_images == "stop":
            raise DataError(
                f"cannot decode {what} ({type(error).__name__}: {error}); {self._stop_fix}"
            ) from error
        self._bad[index] = f"{type(error).__name__}: {error}"
        log.warning("skipped undecodable %s (%s): %d skipped so far in this reader",
                    what, self._bad[index], len(self._bad))
        if len(self._bad) > self._max_bad_fraction * len(self):
            shown = "; ".join(self._describe(i) for i in sorted(self._bad)[:5])
            raise DataError(
                f"{len(self._bad)} of {len(self)} {self._plural} could not be decoded, more "
                f"than max_bad_fraction={self._max_bad_fraction} of them ({shown}); "
                f"{self._bound_fix}"
            ) from error

    @property
    def skipped(self) -> dict[str, str]:
        """``{example: reason}`` of the examples this reader found bad and skipped."""
        return {self._key(i): reason for i, reason in sorted(self._bad.items())}

    @property
    def labels(self) -> np.ndarray:
        """All labels, (N,) int32."""
        return self._labels


def decode_image(file: str | Path | BinaryIO, image_size: int) -> np.ndarray:
    """Decode an image file (a path or a binary file object) to ``image_size`` x ``image_size``
    RGB uint8: resized so its shorter side is ``image_size``, then centre cropped."""
    size = (int(image_size), int(image_size))
    image_ops = require("PIL.ImageOps", "decoding images")
    bilinear = require("PIL.Image", "decoding images").Resampling.BILINEAR

    def fit(img: Image.Image, _scale: float) -> np.ndarray:
        return np.asarray(image_ops.fit(img, size, bilinear), dtype=np.uint8)

    # A JPEG is decoded at a reduced scale that is still >= size: much faster for large
    # photos (resnet_task.jpeg).
    return decode_rgb(file, lambda height, width: size, fit)


class ImageFileSource(PolicySource):
    """Examples decoded lazily from image files (in Grain's readers, not up front).

    Each image is converted to RGB, resized so its shorter side is ``image_size`` and centre
    cropped to ``image_size`` x ``image_size``; cropping rather than squashing keeps the
    aspect ratio, as ImageNet-style evaluation does. ``bad_images`` and
    ``max_bad_fraction``: see the module docstring.
    """

    _plural = "image files"
    _stop_fix = ("delete or replace that file, pass --bad-images skip to train around bad "
                 "files, or --verify-images to list every bad file before training")
    _bound_fix = "fix the files (--verify-images lists them all) or raise the bound"

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray,
        image_size: int,
        bad_images: str = "stop",
        max_bad_fraction: float = 0.01,
    ) -> None:
        self._init_policy(bad_images, max_bad_fraction)
        self._paths = [str(p) for p in paths]
        self._labels = np.asarray(labels, dtype=np.int32)
        self._image_size = int(image_size)

    def __len__(self) -> int:
        return len(self._paths)

    def _open(self, index: int) -> str:
        return self._paths[index]

    def _decode(self, index: int) -> np.ndarray:
        return decode_image(self._open(index), self._image_size)

    def _describe(self, index: int) -> str:
        return f"image '{self._paths[index]}'"

    def _key(self, index: int) -> str:
        return self._paths[index]

    def __repr__(self) -> str:
        return (f"ImageFileSource(n={len(self)}, image_size={self._image_size}, "
                f"bad_images={self._bad_images!r}{', encoded' if self._encoded else ''})")


def check_bad_image_policy(bad_images: str, max_bad_fraction: float) -> None:
    """Fail early, naming the accepted values."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise DataError(f"bad_images={bad_images!r}: choose one of "
                        f"{', '.join(BAD_IMAGE_POLICIES)} (--bad-images stop|skip)")
    if not 0.0 <= max_bad_fraction < 1.0:
        raise DataError(f"max_bad_fraction={max_bad_fraction!r} must be in [0, 1), e.g. 0.01")


def _class_dirs(root: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store dirs...) are never classes.
    with os.scandir(root) as entries:
        return sorted(Path(e.path) for e in entries
                      if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    # DirEntry.is_file() answers from the directory listing (no stat per file on the
    # common filesystems), which keeps a million-file scan a directory walk.
    with os.scandir(class_dir) as entries:
        return sorted(
            e.path for e in entries
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower()
            in IMAGE_EXTENSIONS and e.is_file()
        )


def scan_folder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class names (sorted), image paths and labels of a ``root/<class>/*.<ext>`` tree."""
    classes = _class_dirs(root)
    if not classes:
        raise DataError(
            f"image folder '{root}' has no class sub-folders: expected "
            f"'{root}/<class_name>/<image>' with extensions {', '.join(IMAGE_EXTENSIONS)} "
            "(or 'train/' and 'val/' folders holding such class folders); "
            "pass --data-dir pointing at the folder that contains the class folders"
        )
    paths: list[str] = []
    labels: list[np.ndarray] = []
    for label, class_dir in enumerate(classes):
        files = _image_files(class_dir)
        if not files:
            raise DataError(
                f"class folder '{class_dir}' contains no images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        paths += files
        labels.append(np.full(len(files), label, np.int32))
    return [c.name for c in classes], paths, np.concatenate(labels)


def verify_images(paths: Sequence[str | Path], progress: bool = True) -> None:
    """Open every file and let Pillow check it (headers, PNG CRCs); list every bad one.

    A full pass over the files' bytes: opt-in (``--verify-images``), with a Rich
    progress bar when ``progress``.
    """
    from rich.progress import track

    pillow = require("PIL.Image", "verifying images")
    bad: list[str] = []
    for path in track(paths, description="verifying images", disable=not progress,
                      transient=True):
        try:
            with pillow.open(path) as img:
                img.verify()
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError...
            bad.append(f"'{path}' ({type(e).__name__}: {e})")
    if bad:
        raise DataError(
            f"{len(bad)} unreadable or corrupt image file(s): " + "; ".join(bad)
            + "; delete or replace them (re-save them as PNG/JPEG), or pass "
            "--bad-images skip to train around them"
        )
