"""Grain pipelines the Trainer builds from a Task's examples, and device prefetch.

Training: a permutation per epoch from the seed, the global remainder dropped; each
batch is read with one batched read of this process's share, then batch transforms;
optional worker processes. Evaluation: pad to whole global batches with a ``mask`` so
every example counts exactly once and the last batch has the same shape as the
others (no recompile).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from nnx_trainer.transforms import BatchTransform, example_keys

MASK_KEY = "mask"


@dataclass(frozen=True)
class PipelineConfig:
    """How to batch and load: global batch size, process share and workers."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1
    worker_count: int = 0
    read_threads: int = 2
    read_buffer: int = 8

    @property
    def local_batch_size(self) -> int:
        """Examples this process contributes to each global batch."""
        return self.global_batch_size // self.process_count


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example indices of one training epoch, in the order they are consumed.

    A NumPy permutation rather than Grain's ``MapDataset.shuffle``: the whole order is
    needed anyway to read each batch with one batched read, and for any dataset that
    fits a Python process's index space (8 bytes per example) it costs milliseconds.
    """
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_examples)


def split_transforms(transforms: Sequence[Any]) -> tuple[list[Any], list[BatchTransform]]:
    """Per-example Grain transforms, then :class:`BatchTransform` ones; raises on other orders."""
    transforms = list(transforms)
    first_batch = next(
        (i for i, t in enumerate(transforms) if isinstance(t, BatchTransform)), len(transforms)
    )
    per_example, batched = transforms[:first_batch], transforms[first_batch:]
    late = [t for t in batched if not isinstance(t, BatchTransform)]
    if late:
        raise ValueError(
            f"per-example transform {late[0]!r} comes after a BatchTransform; batch "
            "transforms run after batching, so list every per-example transform first"
        )
    return per_example, batched


def _apply_transforms(ds: grain.MapDataset | grain.IterDataset, transforms: Sequence[Any],
                      seed: int):
    for i, transform in enumerate(transforms):
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=seed + i)
        else:  # a grain.transforms.Map or a plain callable, as MapDataset.map takes
            ds = ds.map(transform)
    return ds


def _stack(elements: Sequence[Any]) -> Any:
    """Stack a list of examples (dicts, tuples or arrays) into one batch."""
    first = elements[0]
    if isinstance(first, Mapping):
        return {k: _stack([e[k] for e in elements]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([e[i] for e in elements]) for i in range(len(first)))
    return np.stack(elements)


def _read_batch(
    parent: grain.MapDataset,
    order: np.ndarray,
    index: int,
    config: PipelineConfig,
    transforms: Sequence[BatchTransform],
    key_seed: int,
    num_real: int | None = None,
) -> Any:
    """Batch ``index`` of ``order``: this process's share, one batched read, batch transforms."""
    g = config.global_batch_size
    positions = np.arange(index * g + config.process_index, (index + 1) * g,
                          config.process_count)
    batch = _stack(parent._getitems(order[positions].tolist()))
    if num_real is not None:  # positions at or past it are padding
        if not isinstance(batch, dict):
            raise TypeError("evaluation examples must be dicts (a mask key is added)")
        batch[MASK_KEY] = positions < num_real
    if transforms:
        keys = example_keys(key_seed, positions)
        for transform in transforms:
            batch = transform.map_batch(batch, keys)
    return batch


class Batches(grain.MapDataset):
    """Batch ``i``: the examples at global positions ``[i*G, (i+1)*G)`` of ``order``.

    This process takes every ``process_count``-th of them (from ``process_index``),
    reads them with one ``_getitems`` call (Grain's batched-read path: a source that
    implements ``_getitems`` serves a whole batch with one fancy index), stacks them,
    adds ``mask`` when ``num_real`` is given (positions from it on are padding) and
    applies the batch transforms with per-example keys from ``key_seed`` and each
    example's global position.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        order: np.ndarray,
        config: PipelineConfig,
        *,
        batch_transforms: Sequence[BatchTransform] = (),
        key_seed: int = 0,
        num_real: int | None = None,
    ) -> None:
        super().__init__(parent)
        self._order = np.asarray(order, dtype=np.int64)
        self._config = config
        self._transforms = tuple(batch_transforms)
        self._key_seed = key_seed
        self._num_real = num_real

    def __len__(self) -> int:
        return len(self._order) // self._config.global_batch_size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return _read_batch(self._parent, self._order, index, self._config, self._transforms,
                           self._key_seed, self._num_real)


class TrainBatches(grain.MapDataset):
    """Training batches of epochs ``first_epoch .. first_epoch + num_epochs - 1``, in order.

    Item ``k`` is batch ``k % steps`` of epoch ``first_epoch + k // steps``; an epoch's
    batches depend only on the seed and the epoch (its own permutation and
    augmentation seeds), so one pipeline (one set of Grain threads or worker
    processes) serves a whole fit and a resume from any (epoch, batch) is exact.
    ``steps_per_epoch`` (default: all full batches) takes only the first batches of
    each epoch.
    """

    def __init__(
        self,
        examples: grain.MapDataset,
        transforms: Sequence[Any],
        config: PipelineConfig,
        *,
        seed: int,
        first_epoch: int,
        num_epochs: int,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(examples)
        self._steps = train_steps_per_epoch(len(examples), config.global_batch_size)
        if steps_per_epoch is not None:  # fewer batches per epoch (limit_train_batches)
            self._steps = min(self._steps, steps_per_epoch)
        self._per_example, self._batched = split_transforms(transforms)
        self._config = config
        self._seed = seed
        self._first_epoch = first_epoch
        self._num_epochs = num_epochs
        self._epochs: dict[int, tuple[grain.MapDataset, np.ndarray, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes rebuild their epochs' orders: no need to pickle them.
        return {**self.__dict__, "_epochs": {}}

    def _epoch(self, epoch: int) -> tuple[grain.MapDataset, np.ndarray, int]:
        cached = self._epochs.get(epoch)
        if cached is None:
            s = epoch_seed(self._seed, epoch)
            parent = _apply_transforms(self._parent, self._per_example, seed=s + 1)
            used = self._steps * self._config.global_batch_size
            order = epoch_order(self._seed, epoch, len(self._parent))[:used]
            cached = (parent, order, s + 2)
            if len(self._epochs) > 2:  # read threads may still finish the previous epoch
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = cached
        return cached

    def __len__(self) -> int:
        return self._steps * self._num_epochs

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, batch = divmod(index, self._steps)
        parent, order, key_seed = self._epoch(self._first_epoch + epoch)
        return _read_batch(parent, order, batch, self._config, self._batched, key_seed)


def _allow_grain_workers() -> None:
    # grain's mp_prefetch reads an absl flag; with no absl app having parsed flags
    # (the case for any library user) that read raises UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, config: PipelineConfig) -> grain.IterDataset:
    # Few read threads: on small machines extra threads compete with XLA's own. Grain's
    # default buffer is 500 elements; ours are whole batches, so a few keep the step fed
    # without holding hundreds of batches (hundreds of MB for ResNet inputs) in memory.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=config.read_buffer))
    if config.worker_count > 0:
        _allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return it


def train_steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one epoch; raises when the batch is larger than the data."""
    if num_examples == 0:
        raise ValueError("the training set has no examples (an empty dataset); check the "
                         "data source it reads")
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
    num_epochs: int = 1,
    start_batch: int = 0,
    steps_per_epoch: int | None = None,
) -> grain.IterDataset:
    """Training batches for this process: ``num_epochs`` epochs from ``epoch``, remainder dropped.

    Starts at batch ``start_batch`` of the first epoch (a resume). Per-example
    transforms are seeded by the epoch and the example's index; batch transforms by
    the epoch and the example's position in the epoch's global order. Neither depends
    on the process count, so N processes see what one would.
    """
    ds = TrainBatches(examples, transforms, config, seed=seed, first_epoch=epoch,
                      num_epochs=num_epochs, steps_per_epoch=steps_per_epoch)
    if start_batch:
        ds = ds[start_batch:]
    return _to_iter(ds, config)


def stream_pipeline(
    examples: grain.IterDataset,
    transforms: Sequence[Any],
    config: PipelineConfig,
    *,
    seed: int,
) -> grain.IterDataset:
    """Training batches from a stream (an ``IterDataset``: no length, no random access).

    Every process reads the same stream, batches ``global_batch_size`` examples and
    keeps its rows (every ``process_count``-th, as for indexed data), so the processes
    agree on each global batch without any coordination; a stream that is already
    split per process can read ``task.trainer.strategy.process_index`` itself. Per-
    example transforms are seeded by Grain's element counter; batch transforms get
    keys from each example's position in the stream. Its iterator's ``get_state()``
    (Grain's, JSON) is the data position a checkpoint keeps for an exact resume.
    """
    per_example, batched = split_transforms(transforms)
    ds = _apply_transforms(examples, per_example, seed=epoch_seed(seed, 0) + 1)
    g, key_seed = config.global_batch_size, epoch_seed(seed, 0) + 2
    rows = np.arange(config.process_index, g, config.process_count)

    def share(index: int, batch: Any) -> Any:
        if config.process_count > 1:
            batch = _rows(batch, rows)
        if batched:
            keys = example_keys(key_seed, index * g + rows)
            for transform in batched:
                batch = transform.map_batch(batch, keys)
        return batch

    ds = ds.batch(g, drop_remainder=True, batch_fn=_stack).map_with_index(share)
    # One background thread reads ahead while the device computes; its state is the
    # position of the batches handed out, not of those read ahead. Not worker processes:
    # Grain splits a stream over workers by slicing its source, which a generator-like
    # source cannot do, and each worker would batch (and key) its own slice.
    return grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=config.read_buffer
    )


def _rows(batch: Any, rows: np.ndarray) -> Any:
    """The given rows of every array of a stacked batch (dicts, tuples or arrays)."""
    if isinstance(batch, Mapping):
        return {k: _rows(v, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(v, rows) for v in batch)
    return np.asarray(batch)[rows]


def eval_num_batches(num_examples: int, global_batch_size: int) -> int:
    """Global batches needed to cover every example once (last one padded)."""
    return -(-num_examples // global_batch_size)


def eval_pipeline(
    examples: grain.MapDataset,
    transforms: Sequence[Any],
    config: PipelineConfig,
    *,
    limit_batches: int | None = None,
    source: str = "the evaluation data",
) -> tuple[grain.IterDataset, int]:
    """Padded, masked evaluation batches for this process and their count.

    The last global batch is filled up with copies of the last example and every
    batch carries ``mask`` (False = padding), so shapes never change and metrics
    count each example exactly once. ``source`` names the examples in errors (e.g.
    ``"MyTask.predict_data()"``).
    """
    n = len(examples)
    if n == 0:
        raise ValueError(f"{source} returned no examples (an empty dataset); check the data "
                         "source it reads, or provide at least one example")
    num_batches = eval_num_batches(n, config.global_batch_size)
    if limit_batches is not None:
        num_batches = min(num_batches, limit_batches)
    per_example, batched = split_transforms(transforms)
    parent = _apply_transforms(examples, per_example, seed=0)
    order = np.minimum(np.arange(num_batches * config.global_batch_size), n - 1)
    ds = Batches(parent, order, config, batch_transforms=batched, key_seed=0, num_real=n)
    return _to_iter(ds, config), num_batches


class DevicePrefetcher:
    """Keeps ``size`` batches on device ahead of the step that consumes them.

    Each item is ``(device_batch, data_state)`` where ``data_state`` is the host
    iterator's state right after that batch was read (``None`` unless
    ``record_state``: the Trainer resumes from its step counters instead), so a consumer
    can resume exactly at the next batch even though later batches were already
    prefetched. Time blocked on the host pipeline is
    summed in ``wait_seconds``.
    """

    def __init__(
        self,
        iterator: Iterator[Mapping[str, np.ndarray]],
        put: Callable[[Mapping[str, np.ndarray]], Any],
        size: int = 2,
        limit: int | None = None,
        record_state: bool = False,
    ) -> None:
        self._iterator = iterator
        self._record_state = record_state and hasattr(iterator, "get_state")
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
            state = self._iterator.get_state() if self._record_state else None
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
