"""Image-classification data read from ArrayRecord shards written by :mod:`resnet_task.convert`.

A converted dataset is a directory ``DST`` holding

* ``metadata.json``: class names, mean/std, the native image size (or null), and per split
  (``train``, plus ``val`` or ``test`` where the source had one) its example count, class
  counts, labels file and shards (file name, record count, size in bytes). The converter
  writes it last, so its presence means every shard was completed;
* ``<split>-<k>-of-<n>.arrayrecord``: the records of a split, in the source's order;
* ``<split>-labels.npy``: the labels of a split (int32), so the loader can split off a
  validation set and count classes without reading a record.

Each record is one example: :data:`RECORD_HEADER` (4-byte magic ``NXR1``, little-endian int32
label) followed by the encoded image bytes (the original file's bytes for image folders,
a lossless PNG for CIFAR). A fixed ``struct`` header instead of msgpack/protobuf: it needs
nothing beyond the standard library and the image bytes are a plain slice, never re-encoded.

Building the dataset checks every shard cheaply (exists, size, opens, record count) and
reads no record; records are decoded in Grain's readers, where an undecodable one follows
the same ``bad_images`` policy as image folders (see :mod:`resnet_task.image_folder`).
"""

from __future__ import annotations

import io
import json
import os
import struct
from bisect import bisect_right
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import numpy as np

from resnet_task.dataset_base import (
    DatasetInfo,
    check_fraction,
    check_image_size,
    stratified_split,
)
from resnet_task.errors import DataError
from resnet_task.image_folder import PolicySource, check_bad_image_policy, decode_image

RECORD_MAGIC = b"NXR1"
RECORD_HEADER = struct.Struct("<4si")  # magic, label
METADATA_FILE = "metadata.json"
FORMAT_NAME = "nnx-trainer-arrayrecord"
FORMAT_VERSION = 1
# group_size:1 makes every record its own chunk, which Grain's random access needs to be
# fast; "uncompressed" because the payloads are already-compressed PNG/JPEG bytes.
WRITER_OPTIONS = "group_size:1,uncompressed"

__all__ = ["ShardSource", "load_arrayrecord", "encode_record", "decode_record",
           "METADATA_FILE", "RECORD_HEADER", "WRITER_OPTIONS"]


def encode_record(label: int, image_bytes: bytes) -> bytes:
    """One example as a record: header (magic, int32 label) + the encoded image bytes."""
    return RECORD_HEADER.pack(RECORD_MAGIC, int(label)) + bytes(image_bytes)


def decode_record(record: bytes) -> tuple[int, memoryview]:
    """``(label, image bytes)`` of a record written by :func:`encode_record`."""
    if len(record) < RECORD_HEADER.size:
        raise ValueError(f"record of {len(record)} bytes is shorter than its header")
    magic, label = RECORD_HEADER.unpack_from(record)
    if magic != RECORD_MAGIC:
        raise ValueError(f"record starts with {magic!r}, not {RECORD_MAGIC!r}")
    return label, memoryview(record)[RECORD_HEADER.size:]


def convert_command(meta: dict[str, Any], root: Path) -> str:
    """The command that (re)writes ``root`` from the source recorded in its metadata."""
    source = meta.get("source", {}).get("path", "SRC")
    return f"python -m resnet_task.convert {source} {root}"


class ShardSource(PolicySource):
    """The examples ``indices`` of a split stored in ArrayRecord shards, decoded lazily.

    Reads through ``grain.sources.ArrayRecordDataSource`` (picklable: its readers reopen in
    each Grain worker). Images are decoded and sized as :class:`ImageFileSource` does, or
    left encoded for a recipe transform (:meth:`encoded`).
    """

    _plural = "records"

    def __init__(
        self,
        shards: Sequence[tuple[str, int]],
        labels: np.ndarray,
        indices: np.ndarray,
        image_size: int,
        bad_images: str = "stop",
        max_bad_fraction: float = 0.01,
        fix: str = "re-run the converter",
    ) -> None:
        self._init_policy(bad_images, max_bad_fraction)
        self._shards = [str(p) for p, _ in shards]
        # "path[start:end]" tells Grain the record count, so it does not reopen every
        # shard to count records (the loader has checked the counts already).
        self._records = grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in shards])
        self._starts = np.concatenate([[0], np.cumsum([n for _, n in shards])]).tolist()
        self._indices = np.asarray(indices, dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int32)[self._indices]
        self._image_size = int(image_size)
        self._stop_fix = (f"delete that shard and re-run `{fix}` (it rewrites missing "
                          "shards; an image folder's files are copied as they are, so replace "
                          "a bad source image first), or pass --bad-images skip to train "
                          "around bad records")
        self._bound_fix = f"re-create the shards (`{fix}`) or raise the bound"

    def __len__(self) -> int:
        return len(self._indices)

    def _open(self, index: int) -> io.BytesIO:
        label, data = decode_record(self._records[int(self._indices[index])])
        if label != self._labels[index]:
            raise ValueError(f"record label {label} differs from the labels file's "
                             f"{int(self._labels[index])}")
        return io.BytesIO(data)

    def _decode(self, index: int) -> np.ndarray:
        return decode_image(self._open(index), self._image_size)

    def _describe(self, index: int) -> str:
        key = int(self._indices[index])
        shard = bisect_right(self._starts, key) - 1
        return f"record {key - self._starts[shard]} of shard '{self._shards[shard]}'"

    def __repr__(self) -> str:
        return (f"ShardSource(n={len(self)}, shards={len(self._shards)}, "
                f"image_size={self._image_size}, bad_images={self._bad_images!r}"
                f"{', encoded' if self._encoded else ''})")


def shard_problem(path: Path, num_records: int, num_bytes: int | None) -> str | None:
    """What is wrong with a shard file (missing, wrong size, unreadable), or None if it is fine.

    Cheap: a stat and opening the reader (it reads the footer and index, no record).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        return f"has {size} bytes, not the {num_bytes} it was written with (truncated?)"
    try:
        reader = ArrayRecordReader(str(path))
    except Exception as e:  # not an ArrayRecord file at all
        return f"cannot be opened ({type(e).__name__}: {e})"
    # A damaged footer does not raise on opening: the reader has ok() False, 0 records,
    # and close() raises the reason.
    ok, found = reader.ok(), reader.num_records()
    try:
        reader.close()
    except Exception as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if not ok:
        return "cannot be read (damaged or truncated)"
    if found != num_records:
        return f"holds {found} records, not {num_records}"
    return None


def read_metadata(root: Path) -> dict[str, Any]:
    """``root/metadata.json``, checked for the format; DataError with the fix otherwise."""
    path = root / METADATA_FILE
    hint = ("convert a dataset with `python -m resnet_task.convert SRC DST` (a re-run resumes an "
            "interrupted conversion; metadata.json is written last) and pass --data-dir DST")
    if not root.is_dir():
        raise DataError(f"ArrayRecord directory '{root}' not found; {hint}")
    if not path.is_file():
        raise DataError(f"'{path}' not found: '{root}' is not a finished conversion; {hint}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{path}' ({e}); {hint}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(f"'{path}' is not {FORMAT_NAME} metadata; {hint}")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"'{path}' has format version {meta.get('version')}, this code reads "
                        f"{FORMAT_VERSION}; re-convert with this version: {hint}")
    return meta


def _split_labels(root: Path, meta: dict[str, Any], split: str) -> np.ndarray:
    info = meta["splits"][split]
    path = root / info["labels_file"]
    fix = convert_command(meta, root)
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read labels file '{path}' ({e}); re-run `{fix}`") from e
    num_classes = len(meta["class_names"])
    if labels.shape != (info["num_examples"],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels file '{path}' holds {labels.dtype} {labels.shape}, expected "
                        f"{info['num_examples']} integers; re-run `{fix}`")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels file '{path}' has labels outside [0, {num_classes}); "
                        f"re-run `{fix}`")
    return labels.astype(np.int32)


def check_shards(root: Path, meta: dict[str, Any]) -> None:
    """Every shard listed in the metadata exists, opens and holds its record count."""
    shards = [(root / s["file"], s["num_records"], s.get("bytes"))
              for split in meta["splits"].values() for s in split["shards"]]
    # Opening a reader is a small read at the file's end; threads overlap the latency.
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        problems = list(pool.map(lambda s: shard_problem(*s), shards))
    bad = [f"shard '{path}' {why}" for (path, _, _), why in zip(shards, problems, strict=True)
           if why is not None]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} bad ArrayRecord shard(s): {shown}; re-run "
                        f"`{convert_command(meta, root)}`: it rewrites missing or damaged shards")


def load_arrayrecord(
    data_dir: str | Path,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    bad_images: str = "stop",
    max_bad_fraction: float = 0.01,
    encoded: bool = False,
) -> tuple[grain.MapDataset, grain.MapDataset, DatasetInfo]:
    """A converted dataset as ``(train, held_out, info)``, elements as the folder loader's
    (``encoded``: undecoded, see :meth:`resnet_task.image_folder.PolicySource.encoded`).

    The held-out split is the stored ``val`` (or ``test``) split; a source without one
    (a flat image folder) gets one carved out of ``train`` per class by ``val_fraction``
    and ``seed``, exactly as :func:`resnet_task.data.load_image_folder` does, so the splits
    equal the folder loader's. ``image_size=None``: the native size (32 for CIFAR), else 64.
    """
    check_bad_image_policy(bad_images, max_bad_fraction)
    root = Path(data_dir).expanduser()
    meta = read_metadata(root)
    size = image_size if image_size is not None else (meta.get("image_size") or 64)
    check_image_size(size)
    check_shards(root, meta)
    fix = convert_command(meta, root)
    splits = meta["splits"]

    def source(split: str, labels: np.ndarray, indices: np.ndarray) -> ShardSource:
        shards = [(str(root / s["file"]), s["num_records"]) for s in splits[split]["shards"]]
        return ShardSource(shards, labels, indices, size, bad_images, max_bad_fraction, fix=fix)

    labels = _split_labels(root, meta, "train")
    held_out = next((s for s in ("val", "test") if s in splits), None)
    if held_out is not None:
        val_labels = _split_labels(root, meta, held_out)
        train = source("train", labels, np.arange(len(labels)))
        val = source(held_out, val_labels, np.arange(len(val_labels)))
    else:
        check_fraction(val_fraction)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        train, val = source("train", labels, train_idx), source("train", labels, val_idx)
    info = DatasetInfo(
        name="arrayrecord",
        num_classes=len(meta["class_names"]),
        image_shape=(int(size), int(size), 3),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        num_train=len(train),
        num_val=len(val),
        class_names=tuple(meta["class_names"]),
    )
    if encoded:
        train, val = train.encoded(), val.encoded()
    return grain.MapDataset.source(train), grain.MapDataset.source(val), info


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file and a rename, so it is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
