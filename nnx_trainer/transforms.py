"""Batch transforms: augmentation and normalisation applied to whole batches on the host.

A Task's ``train_transforms()`` / ``eval_transforms()`` may mix Grain's per-example
transforms (``grain.transforms.Map`` / ``RandomMap``) with :class:`BatchTransform`
objects. Per-example ones run first, on each example as it is read; batch transforms
run after batching, once per batch, with NumPy operations over the leading batch axis.
On a small CPU that difference is most of the data pipeline's cost: one vectorised
crop of 32 images costs about what one per-example crop does.

Randomness stays per example and reproducible: a batch transform receives one
``uint64`` key per example, derived from the run seed, the epoch and the example's
position in the epoch's global order, and draws from it with :func:`random_bits`,
:func:`uniform` and :func:`integers`. These are counter-based (a SplitMix64 hash of
key and draw number), so an example's augmentation does not depend on which process,
worker or batch row computes it: N processes see exactly what one process would.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BatchTransform", "example_keys", "random_bits", "uniform", "integers"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _MIX1  # uint64 array arithmetic wraps modulo 2**64, which the hash relies on
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def example_keys(seed: int, positions: np.ndarray) -> np.ndarray:
    """One ``uint64`` key per example from a pipeline seed and the examples' global positions."""
    base = np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    base = _splitmix64(base * _GOLDEN + _GOLDEN)
    return _splitmix64(np.asarray(positions, dtype=np.uint64) * _GOLDEN + base)


def random_bits(keys: np.ndarray, draw: int) -> np.ndarray:
    """64 random bits per key for draw number ``draw`` (distinct draws are independent)."""
    salt = _splitmix64(np.asarray([draw + 1], dtype=np.uint64) * _GOLDEN)
    return _splitmix64(keys ^ salt)


def uniform(keys: np.ndarray, draw: int) -> np.ndarray:
    """A float64 in [0, 1) per key."""
    return (random_bits(keys, draw) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def integers(keys: np.ndarray, draw: int, high: int) -> np.ndarray:
    """An int64 in [0, high) per key (modulo bias below 2**-50 for small ``high``)."""
    if high < 1:
        raise ValueError(f"integers needs high >= 1, got {high}")
    return (random_bits(keys, draw) % np.uint64(high)).astype(np.int64)


class BatchTransform(abc.ABC):
    """A transform of a whole host batch (a dict of NumPy arrays with a leading batch axis).

    Subclasses implement :meth:`map_batch`; they must not write into the input arrays
    (a source may hand out views of its data) and must keep the batch size. A class can
    also be a Grain per-example transform (as ``resnet_task``'s are); the Trainer uses
    the batch form.
    """

    @abc.abstractmethod
    def map_batch(self, batch: Mapping[str, Any], keys: np.ndarray) -> dict[str, Any]:
        """Return the transformed batch.

        :param batch: the batch; ``batch[k].shape[0]`` is the number of examples.
        :param keys: one ``uint64`` random key per example (see :func:`uniform`);
            deterministic transforms ignore it.
        """
