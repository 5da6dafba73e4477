"""Grain pipelines the Trainer builds from a Task's examples, and device prefetch.

Training: shuffle per epoch from the seed, per-example transforms, drop the
global remainder, slice this process's share, batch, optional worker processes.
Evaluation: pad to whole global batches with a ``mask`` so every example counts
exactly once and the last batch has the same shape as the others (no recompile).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

MASK_KEY = "mask"


@dataclass(frozen=True)
class PipelineConfig:
    """How to batch and load: global batch size, process share and workers."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0
    read_threads: int = 2

    @property
    def local_batch_size(self) -> int:
        """Examples this process contributes to each global batch."""
        return self.global_batch_size // self.process_count


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _apply_transforms(ds: grain.MapDataset, transforms: Sequence[Any], seed: int):
    for i, transform in enumerate(transforms):
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=seed + i)
        else:
            ds = ds.map(transform)
    return ds


def _allow_grain_workers() -> None:
    # grain's mp_prefetch reads an absl flag; with no absl app having parsed flags
    # (the case for any library user) that read raises UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, config: PipelineConfig) -> grain.IterDataset:
    # Few read threads: on small machines extra threads compete with XLA's own.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads))
    if config.worker_count > 0:
        _allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return it


def train_steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one epoch; raises when the batch is larger than the data."""
    if global_batch_size > num_examples:
        raise ValueError(
            f"batch size {global_batch_size} is larger than the training set "
            f"({num_examples} examples); choose a batch size of at most {num_examples}"
        )
    return num_examples // global_batch_size


def train_pipeline(
    examples: grain.MapDataset,
    transforms: Sequence[Any],
    config: PipelineConfig,
    *,
    seed: int,
    epoch: int,
) -> grain.IterDataset:
    """One epoch of training batches for this process (remainder dropped)."""
    steps = train_steps_per_epoch(len(examples), config.global_batch_size)
    s = epoch_seed(seed, epoch)
    ds = examples.shuffle(seed=s)
    # Transforms before the process slice: an example's augmentation depends on its
    # global position only, so N processes see exactly what one process would.
    ds = _apply_transforms(ds, transforms, seed=s + 1)
    ds = ds[: steps * config.global_batch_size]
    ds = ds[config.process_index :: config.process_count]
    ds = ds.batch(config.local_batch_size, drop_remainder=True)
    return _to_iter(ds, config)


class PadWithMask(grain.MapDataset):
    """Extends a dataset to ``length`` elements; each element gets ``mask`` (False = padding)."""

    def __init__(self, parent: grain.MapDataset, length: int) -> None:
        super().__init__(parent)
        if length < len(parent):
            raise ValueError(f"cannot pad {len(parent)} examples down to {length}")
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        num_real = len(self._parent)
        is_real = index < num_real
        # Padding repeats a real example so shapes and dtypes match; the mask drops it.
        element = self._parent[index if is_real else num_real - 1]
        return {**element, MASK_KEY: np.bool_(is_real)}


def eval_num_batches(num_examples: int, global_batch_size: int) -> int:
    """Global batches needed to cover every example once (last one padded)."""
    return -(-num_examples // global_batch_size)


def eval_pipeline(
    examples: grain.MapDataset,
    transforms: Sequence[Any],
    config: PipelineConfig,
    *,
    limit_batches: int | None = None,
) -> tuple[grain.IterDataset, int]:
    """Padded, masked evaluation batches for this process and their count."""
    if len(examples) == 0:
        raise ValueError("the evaluation dataset is empty; provide at least one example")
    num_batches = eval_num_batches(len(examples), config.global_batch_size)
    if limit_batches is not None:
        num_batches = min(num_batches, limit_batches)
    ds = _apply_transforms(examples, transforms, seed=0)
    ds = PadWithMask(ds, eval_num_batches(len(examples), config.global_batch_size)
                     * config.global_batch_size)
    ds = ds[: num_batches * config.global_batch_size]
    ds = ds[config.process_index :: config.process_count]
    ds = ds.batch(config.local_batch_size, drop_remainder=False)
    return _to_iter(ds, config), num_batches


class DevicePrefetcher:
    """Keeps ``size`` batches on device ahead of the step that consumes them.

    Each item is ``(device_batch, data_state)`` where ``data_state`` is the host
    iterator's state right after that batch was read, so a checkpoint taken after
    the step resumes exactly at the next batch even though later batches were
    already prefetched. Time blocked on the host pipeline is summed in ``wait_seconds``.
    """

    def __init__(
        self,
        iterator: Iterator[Mapping[str, np.ndarray]],
        put: Callable[[Mapping[str, np.ndarray]], Any],
        size: int = 2,
        limit: int | None = None,
    ) -> None:
        self._iterator = iterator
        self._put = put
        self._size = max(1, size)
        self._remaining = limit
        self._queue: collections.deque = collections.deque()
        self.wait_seconds = 0.0

    def _fill(self) -> None:
        while len(self._queue) < self._size and (self._remaining is None or self._remaining > 0):
            start = time.perf_counter()
            try:
                host_batch = next(self._iterator)
            except StopIteration:
                self._remaining = 0
                break
            finally:
                self.wait_seconds += time.perf_counter() - start
            state = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
            self._queue.append((self._put(host_batch), state))
            if self._remaining is not None:
                self._remaining -= 1

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if not self._queue:
            self._fill()
            if not self._queue:
                raise StopIteration
        item = self._queue.popleft()
        # Refill after handing out: the caller dispatches its (async) step first, then
        # the next host batch is read and copied while the device computes.
        return item

    def refill(self) -> None:
        """Read and place batches until ``size`` are queued; call right after dispatching a step."""
        self._fill()

    def close(self) -> None:
        """Stop the host pipeline (worker processes, threads) now, not at garbage collection."""
        self._queue.clear()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
