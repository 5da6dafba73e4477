"""Named contracts between the loop and plugins: the training state and a checkpoint's content."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


class Outcome(enum.StrEnum):
    """How a fit/validate/test/predict call ended (``on_run_end``'s ``outcome``)."""

    COMPLETED = "completed"  # ran to its end (max_epochs/max_steps, or all evaluation data)
    STOPPED = "stopped"  # a plugin set trainer.should_stop (early stopping, a time budget)
    PREEMPTED = "preempted"  # SIGTERM/SIGINT: the state was saved, the run can resume
    EXCEPTION = "exception"  # an exception (KeyboardInterrupt too) ended it; re-raised after


class TrainState(NamedTuple):
    """What one train step updates: ``trainer.state.model`` and ``trainer.state.optimizer``.

    Each is an ``nnx.State`` of device arrays. A NamedTuple is a pytree, so
    ``jax.tree.map`` and shardings work on it as on any tuple.
    """

    model: nnx.State
    optimizer: nnx.State


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """The JSON part of a checkpoint: counters (which are the data position) and plugin state.

    :param global_step: steps completed.
    :param epoch: the epoch the next step belongs to.
    :param batch_in_epoch: batches of that epoch already consumed.
    :param seed: the Trainer's seed (data order and augmentation derive from it).
    :param validation_pending: preempted on an epoch's last batch, before its validation;
        the resumed fit runs that validation first.
    :param plugins: every plugin's ``state_dict``, merged.
    :param data_state: a streamed training set's iterator state (Grain's
        ``get_state()``) after the last consumed batch; None for indexed data, whose
        position is the counters.
    """

    global_step: int
    epoch: int
    batch_in_epoch: int
    seed: int
    validation_pending: bool = False
    plugins: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_state: Any = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (field name to value); no ``data_state`` for indexed data."""
        data = dataclasses.asdict(self)
        if data["data_state"] is None:
            del data["data_state"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckpointMeta:
        """Read back :meth:`to_json`'s dict; unknown keys (a newer writer) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True)
class CheckpointContent:
    """Everything a checkpoint holds.

    :param model: the model's state (``TrainState.model``).
    :param optimizer: the optimizer's state.
    :param train_metrics: the training metrics' accumulators.
    :param plugin_arrays: plugin name to a pytree of device arrays (e.g. an EMA).
    :param meta: counters and plugin JSON state.
    :param source: where it was read from (a restored checkpoint's directory), if anywhere.
    """

    model: Any
    optimizer: Any
    train_metrics: Any
    plugin_arrays: Mapping[str, Any]
    meta: CheckpointMeta
    source: str | None = None

    def arrays(self) -> dict[str, Any]:
        """The array part as one named pytree (what is written as the checkpoint's state)."""
        tree = {"model": self.model, "optimizer": self.optimizer,
                "train_metrics": self.train_metrics}
        if self.plugin_arrays:
            tree["plugins"] = dict(self.plugin_arrays)
        return tree

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, Any], meta: CheckpointMeta, source: str | None = None
    ) -> CheckpointContent:
        """The inverse of :meth:`arrays`."""
        return cls(model=arrays["model"], optimizer=arrays["optimizer"],
                   train_metrics=arrays["train_metrics"],
                   plugin_arrays=dict(arrays.get("plugins", {})), meta=meta, source=source)


def structure_mismatch(expected: Any, got: Any) -> str | None:
    """Describe the first difference in structure, shape or dtype between two pytrees, or None."""
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    missing = [jax.tree_util.keystr(k) for k in flat_expected if k not in flat_got]
    extra = [jax.tree_util.keystr(k) for k in flat_got if k not in flat_expected]
    if missing or extra:
        return (f"missing {missing[:3] or 'nothing'}, unexpected {extra[:3] or 'nothing'}")
    for key, a in flat_expected.items():
        b = flat_got[key]
        if (getattr(a, "shape", None), getattr(a, "dtype", None)) != (
            getattr(b, "shape", None), getattr(b, "dtype", None)
        ):
            return (f"{jax.tree_util.keystr(key)} is {getattr(a, 'shape', '?')} "
                    f"{getattr(a, 'dtype', '?')} in the trained state but "
                    f"{getattr(b, 'shape', '?')} {getattr(b, 'dtype', '?')} here")
    return None


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bytes as uint32 words (one per element; 8-byte types get a trailing 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    # Position from iotas (not a reshape, which could move a sharded array's data).
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for dim in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(stride)
        stride = (stride * words.shape[dim]) % 2**32
    h = words ^ (index * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)  # murmur3's finaliser: bijective
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


@jax.jit
def _finite_and_checksum(x: jax.Array) -> jax.Array:
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return jnp.stack([jnp.asarray(finite, jnp.uint32), _checksum(x)])


@jax.jit
def _stacked(pairs: list[jax.Array]) -> jax.Array:
    return jnp.stack(pairs)  # one read back for all arrays


def finite_and_checksums(leaves: list[Any]) -> list[tuple[bool, int]]:
    """Per array of ``leaves``: (no NaN or Inf in it, a 32-bit checksum of its bytes).

    The checksum sums a bijective mix of each 32-bit word and its position, so any single
    changed word changes it (a floating-point sum would not); integer and key arrays
    count as finite. It is computed on the device over the global array (any sharding),
    and the answers are replicated: every process reads the same ones.

    One small jitted program per kind of array (shape, dtype, sharding), dispatched per
    array, serves both the non-finite state check and the checkpoint fingerprints: one
    program over all arrays would compile a kernel per array, and XLA:CPU keeps every
    compiled kernel resident for the life of the process (ResNet-50's 430 state arrays
    are 30 kinds: see "State checks" in benchmarks/README.md for the time and memory).
    """
    if not leaves:
        return []
    pairs = jax.device_get(_stacked([_finite_and_checksum(jnp.asarray(x)) for x in leaves]))
    return [(bool(finite), int(checksum)) for finite, checksum in pairs]


def first_nonfinite_leaf(leaves: list[Any]) -> int:
    """Index of the first array of ``leaves`` holding a NaN or Inf, or -1 (integer and key
    arrays count as finite; see :func:`finite_and_checksums`)."""
    return next((i for i, (finite, _) in enumerate(finite_and_checksums(leaves))
                 if not finite), -1)


def first_nonfinite(tree: Any) -> str | None:
    """The path (``"model/bn1/var/value"``) of the first array of ``tree`` holding a NaN or
    Inf, or ``None`` when all are finite (see :func:`first_nonfinite_leaf`)."""
    index = first_nonfinite_leaf(jax.tree.leaves(tree))
    return None if index < 0 else leaf_path(tree, index)


def leaf_path(tree: Any, index: int) -> str:
    """The path of ``jax.tree.leaves(tree)[index]`` as ``"model/bn1/bias"`` (an NNX
    Variable's trailing ``value`` left out)."""
    path = jax.tree_util.tree_flatten_with_path(tree)[0][index][0]
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
