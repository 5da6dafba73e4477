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
  ``max_bad_fraction`` of the dataset's files turned out bad.

``verify=True`` opens every file up front instead (Pillow's ``verify()``, with a
progress bar) and lists every bad file in one error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from resnet_task.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BAD_IMAGE_POLICIES = ("stop", "skip")

log = logging.getLogger("resnet_task")


class ImageFileSource:
    """Examples decoded lazily from image files (in Grain's readers, not up front).

    Each image is converted to RGB, resized so its shorter side is ``image_size`` and centre
    cropped to ``image_size`` x ``image_size``; cropping rather than squashing keeps the
    aspect ratio, as ImageNet-style evaluation does. ``bad_images`` and
    ``max_bad_fraction``: see the module docstring.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray,
        image_size: int,
        bad_images: str = "stop",
        max_bad_fraction: float = 0.01,
    ) -> None:
        check_bad_image_policy(bad_images, max_bad_fraction)
        self._paths = [str(p) for p in paths]
        self._labels = np.asarray(labels, dtype=np.int32)
        self._image_size = int(image_size)
        self._bad_images = bad_images
        self._max_bad_fraction = float(max_bad_fraction)
        self._bad: dict[int, str] = {}  # index -> reason, in this reader

    def __len__(self) -> int:
        return len(self._paths)

    def _decode(self, index: int) -> np.ndarray:
        size = (self._image_size, self._image_size)
        with Image.open(self._paths[index]) as img:
            # For JPEG, decode at a reduced scale that is still >= size: much faster for
            # large photos; no-op for other formats.
            img.draft("RGB", size)
            img = ImageOps.fit(img.convert("RGB"), size, Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        for offset in range(len(self._paths)):
            candidate = (index + offset) % len(self._paths)
            if candidate in self._bad:
                continue
            try:
                image = self._decode(candidate)
            except Exception as e:  # any decoder failure: name the file
                self._record_bad(candidate, e)
                continue
            return {"image": image, "label": self._labels[candidate]}
        raise DataError(f"none of the {len(self)} image files could be decoded")

    def _record_bad(self, index: int, error: Exception) -> None:
        path = self._paths[index]
        if self._bad_images == "stop":
            raise DataError(
                f"cannot decode image '{path}' ({type(error).__name__}: {error}); delete or "
                "replace that file, pass --bad-images skip to train around bad files, or "
                "--verify-images to list every bad file before training"
            ) from error
        self._bad[index] = f"{type(error).__name__}: {error}"
        log.warning("skipped undecodable image '%s' (%s): %d bad file(s) so far in this "
                    "reader", path, self._bad[index], len(self._bad))
        if len(self._bad) > self._max_bad_fraction * len(self._paths):
            shown = "; ".join(f"'{self._paths[i]}'" for i in sorted(self._bad)[:5])
            raise DataError(
                f"{len(self._bad)} of {len(self)} image files could not be decoded, more "
                f"than max_bad_fraction={self._max_bad_fraction} of them ({shown}); fix "
                "the files (--verify-images lists them all) or raise the bound"
            ) from error

    @property
    def skipped(self) -> dict[str, str]:
        """``{path: reason}`` of the files this reader found bad and skipped."""
        return {self._paths[i]: reason for i, reason in sorted(self._bad.items())}

    @property
    def labels(self) -> np.ndarray:
        """All labels, (N,) int32."""
        return self._labels

    def __repr__(self) -> str:
        return (f"ImageFileSource(n={len(self)}, image_size={self._image_size}, "
                f"bad_images={self._bad_images!r})")


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

    bad: list[str] = []
    for path in track(paths, description="verifying images", disable=not progress,
                      transient=True):
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError...
            bad.append(f"'{path}' ({type(e).__name__}: {e})")
    if bad:
        raise DataError(
            f"{len(bad)} unreadable or corrupt image file(s): " + "; ".join(bad)
            + "; delete or replace them (re-save them as PNG/JPEG), or pass "
            "--bad-images skip to train around them"
        )
