"""A tiny, fast Task shared by the engine and plugin tests (also run in subprocesses), the
one factory of the tests' Trainers (:func:`make_trainer`) and a plugin that crashes a fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nnx_trainer


def value_errors(attempts: dict) -> dict[str, str]:
    """``{label: ValueError message}`` for each ``{label: callable}`` that raises one."""
    errors = {}
    for label, attempt in attempts.items():
        try:
            attempt()
        except ValueError as exc:
            errors[label] = str(exc)
    return errors


def make_trainer(run_dir: str | Path, *plugins: Any, **options: Any) -> nnx_trainer.Trainer:
    """A Trainer for the tiny tasks: batches of 16 (:class:`TinyTask`'s 64 examples make 4
    steps per epoch), only ``plugins`` (no autoload); ``options`` override any of it."""
    if plugins and "plugins" in options:
        raise TypeError("pass the plugins either as arguments or as plugins=[...], not both")
    defaults = {"batch_size": 16, "plugin_autoload": False, "plugins": list(plugins)}
    return nnx_trainer.Trainer(run_dir=run_dir, **{**defaults, **options})


class CrashAfter:
    """A plugin that raises ``RuntimeError("simulated crash after step N")`` at the end of
    the train step that makes ``global_step`` N (after the plugins registered later)."""

    name = "crash_after"

    def __init__(self, step: int) -> None:
        self.step = step

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer: nnx_trainer.Trainer) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash after step {trainer.global_step}")


def make_examples(n: int, seed: int = 0, dim: int = 8, classes: int = 3) -> grain.MapDataset:
    """Linearly separable-ish vectors: class c has mean +3 on coordinate c."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n).astype(np.int32)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[np.arange(n), labels] += 3.0
    return grain.MapDataset.source([{"image": x[i], "label": labels[i]} for i in range(n)])


class TinyModel(nnx.Module):
    """Linear -> BatchNorm -> relu -> Linear: has batch stats, so eval mode matters."""

    def __init__(self, dim: int, classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> None:
        self.fc1 = nnx.Linear(dim, 16, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(16, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(16, classes, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x)))).astype(jnp.float32)


class TinyTask(nnx_trainer.Task):
    """Three-class classification of 8-d vectors."""

    def __init__(self, n_train: int = 64, n_val: int = 20, lr: float = 0.1, dim: int = 8) -> None:
        self.n_train, self.n_val, self.lr, self.dim = n_train, n_val, lr, dim

    def configure_model(self, rngs):
        return TinyModel(self.dim, 3, rngs=rngs, dtype=self.compute_dtype)

    def configure_optimizer(self, total_steps):
        return optax.sgd(self.lr, momentum=0.9)

    def configure_metrics(self):
        return nnx.MultiMetric(
            loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy()
        )

    def train_data(self):
        return make_examples(self.n_train, seed=0, dim=self.dim)

    def val_data(self):
        return make_examples(self.n_val, seed=1, dim=self.dim) if self.n_val else None

    def training_step(self, model, batch):
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {}

    def validation_step(self, model, batch):
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"loss": loss, "logits": logits, "labels": batch["label"]}

    def predict_step(self, model, batch):
        return model(batch["image"])

    def hparams(self):
        return {"lr": self.lr, "n_train": self.n_train}


class DropoutModel(nnx.Module):
    """Linear -> Dropout holding its own RNG stream (a typed PRNG key in the state) -> Linear."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(dim, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x))))


class DropoutTask(TinyTask):
    """TinyTask whose model draws dropout masks from an RNG stream it holds."""

    def configure_model(self, rngs):
        return DropoutModel(self.dim, rngs=rngs)


class AnnotatedMLP(nnx.Module):
    """An MLP whose kernels carry Flax sharding annotations (logical dimension names)."""

    def __init__(self, dim: int, hidden: int, classes: int, *, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            dim, hidden, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)),
        )
        self.down = nnx.Linear(
            hidden, classes, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("mlp", None)),
        )

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


class AnnotatedTask(TinyTask):
    """TinyTask with a tensor-parallel-ready MLP: ``("mlp", "model")`` shards its hidden layer."""

    hidden = 32

    def configure_model(self, rngs):
        return AnnotatedMLP(self.dim, self.hidden, 3, rngs=rngs)

    def configure_optimizer(self, total_steps):
        return optax.adam(1e-2)


class ShardStream(grain.IterDataset):
    """A stream over generated shards (no length, no random access), as a reader of
    files would be: its iterator's state is (shard, offset), so a resume skips nothing."""

    def __init__(self, num_shards: int = 16, shard_size: int = 24, dim: int = 8) -> None:
        super().__init__()
        self.num_shards, self.shard_size, self.dim = num_shards, shard_size, dim

    def __iter__(self) -> grain.DatasetIterator:
        return _ShardStreamIterator(self)


class _ShardStreamIterator(grain.DatasetIterator):
    def __init__(self, stream: ShardStream) -> None:
        super().__init__()
        self._stream, self._shard, self._offset = stream, 0, 0
        self._examples = None

    def __next__(self):
        stream = self._stream
        if self._shard >= stream.num_shards:
            raise StopIteration
        if self._examples is None:  # "open" the shard
            self._examples = make_examples(stream.shard_size, seed=100 + self._shard,
                                           dim=stream.dim)
        example = self._examples[self._offset]
        self._offset += 1
        if self._offset == stream.shard_size:
            self._shard, self._offset, self._examples = self._shard + 1, 0, None
        return example

    def get_state(self):
        return {"shard": self._shard, "offset": self._offset}

    def set_state(self, state):
        self._shard, self._offset, self._examples = state["shard"], state["offset"], None


class StreamingTinyTask(TinyTask):
    """TinyTask whose training data is a stream, with a random per-example transform."""

    def train_data(self):
        return ShardStream(dim=self.dim)

    def train_transforms(self):
        return [_Jitter()]


class _Jitter(grain.transforms.RandomMap):
    def random_map(self, element, rng):
        return {**element, "image": element["image"] + rng.normal(0, 0.1, element["image"].shape
                                                                 ).astype(np.float32)}
