"""Grain pipelines the Trainer builds from a Task's examples, and device prefetch.

Training: a permutation per epoch from the seed, the global remainder dropped; each
batch is read with one batched read of this process's share, then batch transforms;
optional worker processes. Evaluation: pad to whole global batches with a ``mask`` so
every example counts exactly once and the last batch has the same shape as the
others (no recompile).

The batching itself is :mod:`nnx_trainer.batching`, device prefetch
:mod:`nnx_trainer.prefetch`; their public names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from nnx_trainer.batching import (
    MASK_KEY,
    Batches,
    PipelineConfig,
    TrainBatches,
    apply_transforms,
    check_host_batch,
    epoch_order,
    epoch_seed,
    split_transforms,
    stack,
    train_steps_per_epoch,
)
from nnx_trainer.prefetch import DevicePrefetcher
from nnx_trainer.transforms import example_keys

__all__ = [
    "MASK_KEY", "Batches", "DevicePrefetcher", "PipelineConfig", "TrainBatches", "epoch_order",
    "epoch_seed", "eval_num_batches", "eval_pipeline", "split_transforms", "stream_pipeline",
    "train_pipeline", "train_steps_per_epoch",
]


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
    keeps its rows (its block, as for indexed data), so the processes
    agree on each global batch without any coordination; a stream that is already
    split per process can read ``task.trainer.strategy.process_index`` itself. Per-
    example transforms are seeded by Grain's element counter; batch transforms get
    keys from each example's position in the stream. Its iterator's ``get_state()``
    (Grain's, JSON) is the data position a checkpoint keeps for an exact resume.
    """
    per_example, batched = split_transforms(transforms)
    ds = apply_transforms(examples, per_example, seed=epoch_seed(seed, 0) + 1)
    g, key_seed = config.global_batch_size, epoch_seed(seed, 0) + 2
    rows = config.process_rows()

    def share(index: int, batch: Any) -> Any:
        if config.process_count > 1:
            batch = _rows(batch, rows)
        if batched:
            keys = example_keys(key_seed, index * g + rows)
            for transform in batched:
                batch = transform.map_batch(batch, keys)
        return check_host_batch(batch)

    ds = ds.batch(g, drop_remainder=True, batch_fn=stack).map_with_index(share)
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
    parent = apply_transforms(examples, per_example, seed=0)
    order = np.minimum(np.arange(num_batches * config.global_batch_size), n - 1)
    ds = Batches(parent, order, config, batch_transforms=batched, key_seed=0, num_real=n)
    return _to_iter(ds, config), num_batches
