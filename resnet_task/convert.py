"""Convert an image folder or a CIFAR directory to ArrayRecord shards.

    python -m resnet_task.convert ~/data/flowers ~/data/flowers-ar --workers 8
    python -m resnet_task.convert ~/data/cifar-10-batches-py ~/data/cifar10-ar --num-shards 16

The layout and record format are described in :mod:`resnet_task.arrayrecord`. Images stay
encoded: an image folder's files are stored byte for byte (so a bad file is met, and handled
by ``--bad-images``, at training time, as with ``--dataset folder``), CIFAR images become
lossless PNGs. Examples keep the source's order, so the shards index exactly like the source.

Resumable: a shard is written as ``<name>.tmp``, renamed when complete, then recorded in
``DST/manifest.jsonl``. Re-running the same command skips the recorded shards that are still
intact (size, record count) and rewrites the others; ``metadata.json`` is written last.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from resnet_task.arrayrecord import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    RECORD_HEADER,
    WRITER_OPTIONS,
    atomic_write,
    encode_record,
    shard_problem,
)
from resnet_task.cifar import CIFAR_LAYOUT, ArrayOnlyUnpickler, load_cifar
from resnet_task.dataset_base import IMAGENET_MEAN, IMAGENET_STD
from resnet_task.errors import DataError
from resnet_task.extras import require
from resnet_task.image_folder import scan_folder

MANIFEST_FILE = "manifest.jsonl"
DEFAULT_EXAMPLES_PER_SHARD = 1024
SOURCES = ("auto", "folder", "cifar10", "cifar100")


@dataclass
class _Split:
    name: str
    labels: np.ndarray
    read: Callable[[int], bytes]  # example index -> encoded image bytes


@dataclass
class _Plan:
    kind: str
    class_names: list[str]
    image_size: int | None  # native size when every image has it (CIFAR), else None
    mean: Sequence[float]
    std: Sequence[float]
    splits: list[_Split]
    identity: Any  # what identifies the source's contents, for the resume fingerprint


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` did: the metadata written, and shard files written / skipped."""

    metadata: dict[str, Any]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def detect_source(src: Path) -> str:
    """``"cifar10"``, ``"cifar100"`` or ``"folder"``, from the files ``load_cifar`` looks for."""
    for n in (10, 100):
        layout = CIFAR_LAYOUT[n]
        if (src / layout["dir"]).is_dir() or all((src / f).is_file() for f in layout["train"]):
            return layout["name"]
    return "folder"


def _folder_reader(paths: list[str]) -> Callable[[int], bytes]:
    def read(i: int) -> bytes:
        try:
            return Path(paths[i]).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image file '{paths[i]}' ({e}); fix its permissions "
                            "or remove it, then re-run the same command to resume") from e
    return read


def _plan_folder(src: Path) -> _Plan:
    # The same layouts as load_image_folder: root/<class>/ (val is carved out at load
    # time, so the stored order is scan order), or root/train/<class>/ + root/val/<class>/.
    has_train, has_val = (src / "train").is_dir(), (src / "val").is_dir()
    if has_train and has_val:
        names, train_paths, train_labels = scan_folder(src / "train")
        val_names, val_paths, val_labels = scan_folder(src / "val")
        if names != val_names:
            raise DataError(f"class folders of '{src / 'train'}' and '{src / 'val'}' differ "
                            f"({sorted(set(names) ^ set(val_names))}); make both hold the "
                            "same class folders")
        parts = [("train", train_paths, train_labels), ("val", val_paths, val_labels)]
    elif has_train != has_val:
        raise DataError(f"image folder '{src}' has only one of 'train/' and 'val/': add the "
                        "other, or put the class folders directly in it")
    else:
        names, paths, labels = scan_folder(src)
        parts = [("train", paths, labels)]
    splits = [_Split(name, labels, _folder_reader(paths)) for name, paths, labels in parts]
    identity = [[name, [os.path.relpath(p, src) for p in paths], labels.tolist()]
                for name, paths, labels in parts]
    return _Plan("folder", names, None, IMAGENET_MEAN, IMAGENET_STD, splits, identity)


def _cifar_class_names(src: Path, num_classes: int) -> list[str]:
    """Names from the optional ``batches.meta`` / ``meta`` file, else "0", "1", ..."""
    file, key = ("batches.meta", b"label_names") if num_classes == 10 else ("meta",
                                                                             b"fine_label_names")
    for path in (src / CIFAR_LAYOUT[num_classes]["dir"] / file, src / file):
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    meta = ArrayOnlyUnpickler(f, encoding="bytes").load()
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
            except Exception:  # optional file: unreadable names fall back to indices
                break
            if len(names) == num_classes:
                return names
    return [str(i) for i in range(num_classes)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pillow = require("PIL.Image", "converting CIFAR images to PNG")
    pillow.fromarray(image).save(buf, format="PNG")  # lossless, unlike JPEG
    return buf.getvalue()


def _plan_cifar(src: Path, num_classes: int) -> _Plan:
    train, test, info = load_cifar(src, num_classes)  # validates the files, as training would
    splits, digest = [], hashlib.sha256()
    for name, ds in (("train", train), ("test", test)):
        items = [ds[i] for i in range(len(ds))]
        labels = np.array([e["label"] for e in items], dtype=np.int32)
        for e in items:
            digest.update(e["image"].tobytes())
        digest.update(labels.tobytes())
        splits.append(_Split(name, labels, lambda i, ds=ds: _png(ds[i]["image"])))
    return _Plan(info.name, _cifar_class_names(src, num_classes), 32, info.mean, info.std,
                 splits, digest.hexdigest())


def _shard_ranges(n: int, num_shards: int | None, per_shard: int) -> list[tuple[int, int]]:
    k = min(num_shards, n) if num_shards else max(1, math.ceil(n / per_shard))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def _read_manifest(dst: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Completed shards recorded by an earlier run of the same conversion."""
    path = dst / MANIFEST_FILE
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):  # end a line cut short, so appends start afresh
        with open(path, "a") as f:
            f.write("\n")
    lines = text.splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("plan") != fingerprint:
        raise DataError(
            f"'{dst}' holds (part of) a different conversion: another source, changed source "
            f"files or other sharding options (see '{path}'); choose an empty DST, or delete "
            f"'{dst}' to convert from scratch")
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            done[entry["file"]] = entry
        except (ValueError, KeyError, TypeError):  # a line cut short by an interruption
            continue
    return done


def _append(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_shard(path: Path, split: _Split, start: int, end: int,
                 on_record: Callable[[], None]) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
        for i in range(start, end):
            writer.write(encode_record(split.labels[i], split.read(i)))
            on_record()
        if not writer.ok():
            raise DataError(f"writing '{tmp}' failed; check free space in '{path.parent}' and "
                            "re-run the same command to resume")
    finally:
        writer.close()
    with open(tmp, "rb") as f:  # on disk before the rename makes the shard count as done
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "num_records": end - start, "bytes": path.stat().st_size}


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    source: str = "auto",
    num_shards: int | None = None,
    examples_per_shard: int | None = None,
    workers: int = 4,
    progress: bool = True,
) -> ConvertResult:
    """Write ``src`` (an image folder or CIFAR directory) to ArrayRecord shards in ``dst``.

    ``num_shards`` shards per split (fewer for a smaller split) or ``examples_per_shard``
    examples per shard (default 1024); ``workers`` threads write shards in parallel (file
    reads, PNG encoding and ArrayRecord's writer release the GIL). Resumes an earlier,
    interrupted run of the same conversion; fails with DataError on bad input.
    """
    if num_shards is not None and examples_per_shard is not None:
        raise DataError("pass --num-shards or --examples-per-shard, not both")
    for flag, value in (("--num-shards", num_shards), ("--examples-per-shard",
                                                       examples_per_shard), ("--workers", workers)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be >= 1, got {value}")
    if source not in SOURCES:
        raise DataError(f"source={source!r}: choose one of {', '.join(SOURCES)}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise DataError(f"source directory '{src}' not found: pass an image folder "
                        "('<dir>/<class>/<image>') or a CIFAR directory as SRC")
    if dst.resolve().is_relative_to(src.resolve()):
        raise DataError(f"DST '{dst}' is inside SRC '{src}'; write the shards elsewhere")
    kind = detect_source(src) if source == "auto" else source
    plan = (_plan_folder(src) if kind == "folder"
            else _plan_cifar(src, 10 if kind == "cifar10" else 100))
    jobs = []  # (split, shard path, start, end)
    for split in plan.splits:
        ranges = _shard_ranges(len(split.labels), num_shards,
                               examples_per_shard or DEFAULT_EXAMPLES_PER_SHARD)
        for k, (start, end) in enumerate(ranges):
            jobs.append((split, dst / f"{split.name}-{k:05d}-of-{len(ranges):05d}.arrayrecord",
                         start, end))
    fingerprint = hashlib.sha256(json.dumps({
        "format": [FORMAT_NAME, FORMAT_VERSION, WRITER_OPTIONS], "kind": plan.kind,
        "identity": plan.identity, "shards": [(p.name, s, e) for _, p, s, e in jobs],
    }).encode()).hexdigest()
    dst.mkdir(parents=True, exist_ok=True)
    done = _read_manifest(dst, fingerprint)
    manifest = dst / MANIFEST_FILE
    if not manifest.is_file():
        _append(manifest, {"plan": fingerprint, "source": str(src.resolve())})
    entries: dict[str, dict[str, Any]] = {}
    todo = []
    for job in jobs:
        _, path, start, end = job
        entry = done.get(path.name)
        if entry and shard_problem(path, end - start, entry.get("bytes")) is None:
            entries[path.name] = entry
        else:
            todo.append(job)

    total = sum(e - s for _, _, s, e in jobs)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task(f"converting to {dst.name}/", total=total,
                            completed=sum(e["num_records"] for e in entries.values()))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_shard, path, split, start, end,
                                   lambda: bar.advance(task, 1))
                       for split, path, start, end in todo]
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        entry = fut.result()  # re-raises a worker's error
                        _append(manifest, entry)  # only this thread writes the manifest
                        entries[entry["file"]] = entry
            except BaseException:  # an error or Ctrl-C: stop queued shards, keep done ones
                for fut in pending:
                    fut.cancel()
                raise

    for split in plan.splits:
        buf = io.BytesIO()
        np.save(buf, split.labels.astype(np.int32))
        atomic_write(dst / f"{split.name}-labels.npy", buf.getvalue())
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "record_format": f"struct '{RECORD_HEADER.format}' (magic b'NXR1', int32 label) "
                         "+ encoded image bytes",
        "source": {"kind": plan.kind, "path": str(src.resolve())},
        "class_names": list(plan.class_names),
        "image_size": plan.image_size,
        "mean": list(plan.mean),
        "std": list(plan.std),
        "splits": {
            split.name: {
                "num_examples": len(split.labels),
                "class_counts": np.bincount(split.labels, minlength=len(plan.class_names))
                .tolist(),
                "labels_file": f"{split.name}-labels.npy",
                "shards": [entries[p.name] for s, p, _, _ in jobs if s is split],
            } for split in plan.splits
        },
    }
    atomic_write(dst / METADATA_FILE, (json.dumps(metadata, indent=1) + "\n").encode())
    todo_names = {p.name for _, p, _, _ in todo}
    return ConvertResult(metadata, sorted(todo_names),
                         sorted(n for n in entries if n not in todo_names))


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m resnet_task.convert SRC DST [options]``."""
    p = argparse.ArgumentParser(prog="python -m resnet_task.convert",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="image folder (<dir>/<class>/<image>, or train/ and val/ "
                               "holding such folders) or CIFAR-10/100 python-format directory")
    p.add_argument("dst", help="output directory for the shards and metadata.json")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="what SRC is; auto looks for CIFAR's batch files, else a folder")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--num-shards", type=int, default=None,
                       help="shards per split (fewer for a split with fewer examples)")
    sizes.add_argument("--examples-per-shard", type=int, default=None,
                       help=f"examples per shard (default {DEFAULT_EXAMPLES_PER_SHARD})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads writing shards in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        result = convert(args.src, args.dst, source=args.source, num_shards=args.num_shards,
                         examples_per_shard=args.examples_per_shard, workers=args.workers,
                         progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    counts = ", ".join(f"{n} {s['num_examples']}" for n, s in result.metadata["splits"].items())
    print(f"{len(result.written)} shard(s) written, {len(result.skipped)} already complete; "
          f"{counts} examples in '{args.dst}'. Train on them with: python "
          f"examples/train_resnet.py --dataset arrayrecord --data-dir {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
