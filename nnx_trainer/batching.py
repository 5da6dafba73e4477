"""Batches of a Task's examples: the per-epoch order, the transforms and one batched read.

A global batch is ``global_batch_size`` consecutive positions of an order of example
indices; each process reads its share (:meth:`PipelineConfig.process_rows`: the
contiguous rows its devices hold of the global batch array) with one ``_getitems``
call, stacks it and applies the batch transforms with per-example keys.
:class:`Batches` serves such batches from a fixed order (evaluation), and
:class:`TrainBatches` from one permutation per epoch. The Grain pipelines built on them
are in :mod:`nnx_trainer.data`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from nnx_trainer.transforms import BatchTransform, example_keys

__all__ = ["MASK_KEY", "Batches", "PipelineConfig", "TrainBatches", "apply_transforms",
           "check_host_batch", "epoch_order", "epoch_seed", "read_batch", "split_transforms",
           "stack", "train_steps_per_epoch"]

# Named after the package, not "mask": examples of text models often hold a "mask" of
# their own, which the padding mask would replace.
MASK_KEY = "nnx_trainer_mask"


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

    def process_rows(self) -> np.ndarray:
        """The rows of each global batch this process reads: a contiguous block.

        ``jax.make_array_from_process_local_data`` places process ``p``'s rows at the
        ``p``-th block of the global batch array (the strategies order the devices by
        process), so with contiguous blocks that array is the batch in its order, as
        one process would have it: row-position effects (an ``nnx.Dropout``'s masks,
        ``predict``'s rows) are the same on any number of processes.
        """
        n = self.local_batch_size
        return np.arange(self.process_index * n, (self.process_index + 1) * n)


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


def apply_transforms(ds: grain.MapDataset | grain.IterDataset, transforms: Sequence[Any],
                     seed: int):
    """``ds`` with the per-example transforms applied in order; ``RandomMap`` ones seeded
    from ``seed`` and their position in the list."""
    for i, transform in enumerate(transforms):
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=seed + i)
        else:  # a grain.transforms.Map or a plain callable, as MapDataset.map takes
            ds = ds.map(transform)
    return ds


def stack(elements: Sequence[Any]) -> Any:
    """Stack a list of examples (dicts whose values are arrays, lists or tuples of numbers
    or of arrays of one shape, or dicts of them) into one batch; examples that are not
    dicts, differ in keys or in shape fail naming it (NumPy's own error names neither key
    nor shapes)."""
    if not isinstance(elements[0], Mapping):
        raise ValueError(
            f"examples must be dicts of arrays (e.g. {{'x': ..., 'label': ...}}), got "
            f"{type(elements[0]).__name__}; return dicts from the data or a transform")
    return _stack(elements, "")


def _stack(elements: Sequence[Any], path: str) -> Any:
    first = elements[0]
    if isinstance(first, Mapping):
        # Counting keys, then indexing (a KeyError), finds any difference in keys for
        # less host time per batch than comparing every example's keys with the first's,
        # which is done only to name the difference.
        try:
            if any(len(e) != len(first) for e in elements):
                raise KeyError
            return {k: _stack([e[k] for e in elements], f"{path}[{k!r}]") for k in first}
        except KeyError:
            other = next((e for e in elements if e.keys() != first.keys()), None)
            if other is None:
                raise
            where = f" under {path}" if path else ""
            raise ValueError(f"the examples of a batch have different keys{where}: "
                             f"{sorted(first)} and {sorted(other)}; every example needs the "
                             "same keys") from None
    if isinstance(first, (tuple, list)):
        # A list (of numbers, or of arrays of one shape) is an array, as tf.data makes it;
        # stacked as a pytree, one leaf per position, a step would get a list of (batch,)
        # arrays and turn it into a transposed (positions, batch) array without an error.
        try:
            elements = [np.asarray(e) for e in elements]
        except ValueError:
            raise ValueError(f"the examples hold sequences that are not one array under "
                             f"{path} (items of different shapes); make each example's value "
                             "one array of a fixed shape") from None
    try:
        return np.stack(elements)
    except ValueError:
        shapes = ", ".join(str(s) for s in sorted({np.shape(e) for e in elements}))
        raise ValueError(f"the examples of a batch differ in shape under {path}: {shapes}; "
                         "every example needs the same shapes (pad or crop them in a "
                         "transform)") from None


def check_host_batch(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """``batch`` (after the batch transforms), refused if a value cannot enter a compiled
    step: strings or Python objects (JAX's error names a jit argument, not the key)."""
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            raise ValueError(
                f"the examples hold {value.dtype} values under {key!r}, which a compiled "
                "step cannot take; drop that key or turn it into numbers in a transform")
    return batch


def read_batch(
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
    positions = index * g + config.process_rows()
    batch = stack(parent._getitems(order[positions].tolist()))
    if num_real is not None:  # positions at or past it are padding
        if not isinstance(batch, dict):
            raise TypeError("evaluation examples must be dicts (a mask key is added)")
        if MASK_KEY in batch:
            raise ValueError(f"the examples hold a key {MASK_KEY!r}, which the Trainer adds "
                             "to evaluation batches (the padding mask); rename that key")
        batch[MASK_KEY] = positions < num_real
    if transforms:
        keys = example_keys(key_seed, positions)
        for transform in transforms:
            batch = transform.map_batch(batch, keys)
    return check_host_batch(batch)


class Batches(grain.MapDataset):
    """Batch ``i``: the examples at global positions ``[i*G, (i+1)*G)`` of ``order``.

    This process takes its block of them (:meth:`PipelineConfig.process_rows`),
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
        return read_batch(self._parent, self._order, index, self._config, self._transforms,
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
            parent = apply_transforms(self._parent, self._per_example, seed=s + 1)
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
        return read_batch(parent, order, batch, self._config, self._batched, key_seed)


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
