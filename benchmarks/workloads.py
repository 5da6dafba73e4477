"""The JAX side of the benchmarks: in-memory ResNet tasks, hand-written loops, fits, FLOPs.

Import only after :func:`harness.prepare_runtime` (this module imports JAX).

Everything trains ``resnet_task``'s own models with ``ResNetTask``'s own loss,
optimizer and train metrics, so a hand loop and ``Trainer.fit`` do exactly the
same math and differ only in what surrounds the step.
"""

from __future__ import annotations

import io
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_trainer
from nnx_trainer.plugin_manager import describe_plugins
from resnet_task.task import ResNetConfig, ResNetTask

# ---------------------------------------------------------------------------- data


class ArrayExamples:
    """Examples as views into two in-memory arrays (any dtype), one dict per index."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Grain's batched read: one fancy index per array, one example per index.

        Grain's contract is a sequence of elements (the engine stacks them), as
        ``resnet_task.data.ArraySource._getitems`` returns.
        """
        index = np.asarray(indices)
        images, labels = self.images[index], self.labels[index]
        return [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]


def synthetic_arrays(
    num_examples: int, image_size: int, channels: int = 3, num_classes: int = 10,
    dtype: Any = np.float32, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Standard-normal images (or random uint8 ones) and uniform labels."""
    rng = np.random.default_rng(seed)
    shape = (num_examples, image_size, image_size, channels)
    if np.dtype(dtype) == np.uint8:
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        images = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    return images, labels


@dataclass(frozen=True)
class ModelSpec:
    """A ``resnet_task`` model: its name, stem and constructor keywords."""

    name: str
    stem: str = "cifar"
    kwargs: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        """``resnet18 (cifar stem, width=16)``."""
        extra = "".join(f", {k}={v}" for k, v in self.kwargs)
        return f"{self.name} ({self.stem} stem{extra})"


class InMemoryResNetTask(ResNetTask):
    """``ResNetTask`` whose training examples are ready-made arrays: no transforms, no val set.

    The model, loss, optimizer (SGD, Nesterov momentum, weight decay, warmup + cosine)
    and train metrics are ``ResNetTask``'s own.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, model: ModelSpec, num_classes: int = 10,
        **config: Any,
    ) -> None:
        size, channels = images.shape[1], images.shape[3]
        super().__init__(ResNetConfig(
            dataset="synthetic", image_size=size, model=model.name, stem=model.stem,
            model_kwargs=model.kwargs,
            dataset_kwargs=(("num_examples", 16), ("num_classes", num_classes),
                            ("channels", channels)),
            **config,
        ))
        self._examples = grain.MapDataset.source(ArrayExamples(images, labels))
        self.images, self.labels = images, labels

    def train_data(self) -> grain.MapDataset:
        return self._examples

    def train_transforms(self) -> list[Any]:
        return []

    def val_data(self) -> None:
        return None


def device_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, limit: int | None = None
) -> list[dict[str, jax.Array]]:
    """The data cut into whole batches already on the default device."""
    count = len(labels) // batch_size if limit is None else limit
    return [
        jax.device_put({"image": images[i * batch_size:(i + 1) * batch_size],
                        "label": labels[i * batch_size:(i + 1) * batch_size]})
        for i in range(count)
    ]


# ---------------------------------------------------------------------- hand loops


class HandLoop:
    """A hand-written training loop over in-memory device batches; ``run(n)`` times n steps.

    ``style="jit"``: Flax's performance-guide pattern, ``jax.jit`` over a pure function
    of the split state with the state donated (the graph is walked once, here).
    ``style="nnx.jit"``: the tutorial pattern, ``@nnx.jit`` on the modules themselves
    (flattens and re-merges the object graph in Python on every call).
    """

    def __init__(
        self, task: ResNetTask, batches: Sequence[Any], total_steps: int, style: str = "jit",
        seed: int = 0,
    ) -> None:
        self.batches, self.style = list(batches), style
        # As the Trainer does: eager init with the non-partitionable threefry compiles
        # several times faster on XLA:CPU and gives the same weights as the Trainer's.
        with jax.threefry_partitionable(False):
            model = task.configure_model(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, task.configure_optimizer(total_steps), wrt=nnx.Param)
        metrics = task.configure_train_metrics()

        def update(model, optimizer, metrics, batch):
            def loss_fn(model):
                return task.training_step(model, batch)

            (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            optimizer.update(model, grads)
            metrics.update(loss=loss, **aux)
            return loss

        if style == "jit":
            graphdef, self.state = nnx.split((model, optimizer, metrics))

            def train_step(state, batch):
                model, optimizer, metrics = nnx.merge(graphdef, state)
                loss = update(model, optimizer, metrics, batch)
                return nnx.state((model, optimizer, metrics)), loss

            compiled = jax.jit(train_step, donate_argnums=0)

            def step(batch):
                self.state, loss = compiled(self.state, batch)
                return loss
        elif style == "nnx.jit":
            compiled = nnx.jit(update)

            def step(batch):
                return compiled(model, optimizer, metrics, batch)
        else:
            raise ValueError(f"unknown hand-loop style {style!r}")
        self._step = step
        self._index = 0
        self.compile_seconds = self.run(1)  # the first call traces and compiles

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps, from a drained device to the last step's completion.

        The process CPU time (all threads) per step of the call is left in
        ``cpu_seconds_per_step``.
        """
        loss = None
        start, cpu, python_cpu = time.perf_counter(), time.process_time(), python_threads_cpu()
        for _ in range(steps):
            loss = self._step(self.batches[self._index % len(self.batches)])
            self._index += 1
        jax.block_until_ready(loss)
        self.cpu_seconds_per_step = (time.process_time() - cpu) / steps
        self.python_cpu_seconds_per_step = (python_threads_cpu() - python_cpu) / steps
        return time.perf_counter() - start


# --------------------------------------------------------------------- Trainer.fit


def python_threads_cpu() -> float:
    """CPU seconds so far of this process's Python threads (main, Grain's, plugins').

    XLA's own compute threads are left out: both loops run the same computation there,
    so what differs between them (dispatch, data, hooks) is all in these threads.
    Threads that ended before the reading are not counted.
    """
    total = 0.0
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ProcessLookupError):  # ended between enumerate and the read
            pass
    return total


class StepClock:
    """Times a fit's steady state, split into whole-window, in-epoch and epoch-boundary time.

    After the first ``warmup_epochs`` epochs (compilation, Grain start-up), it waits for
    the device after the first and the last step of every epoch and reads the wall
    and process CPU clocks there. Runs after every other plugin's ``on_train_batch_end``
    (``trylast``), so what the plugins do per step is inside the windows. The two
    syncs per epoch cost the loop one drained pipeline each (well under 1% at
    dozens of steps per epoch).
    """

    name = "benchmark_step_clock"

    def __init__(self, warmup_epochs: int = 1) -> None:
        self.warmup_epochs = warmup_epochs
        self.marks: list[tuple[str, int, float, float]] = []  # (kind, step, wall, cpu)
        self.on_window_start: Callable[[], None] | None = None
        self.on_window_end: Callable[[], None] | None = None

    def _mark(self, kind: str, trainer: Any, loss: Any) -> None:
        jax.block_until_ready(loss)
        self.marks.append((kind, trainer.global_step, time.perf_counter(), time.process_time(),
                           python_threads_cpu()))

    @nnx_trainer.hookimpl
    def on_train_epoch_start(self, trainer: nnx_trainer.Trainer, epoch: int) -> None:
        # The checkpoint plugin saves at the warm-up epoch's end (the default policy: every
        # epoch, at most once a minute, so no more in this window). Let that asynchronous
        # save finish before the window's first step: its ~0.2 s of writer-thread CPU
        # then counts at the epoch boundary instead of being spread over a 1-2 s window
        # as a per-step cost that a real fit pays once a minute.
        if epoch == self.warmup_epochs:
            trainer.hook.wait_for_checkpoints(trainer=trainer)

    @nnx_trainer.hookimpl(trylast=True)
    def on_train_batch_end(self, trainer: nnx_trainer.Trainer, loss: Any) -> None:
        epoch = trainer.current_epoch
        if epoch < self.warmup_epochs - 1:
            return
        last_of_epoch = (trainer.batch_in_epoch == trainer.steps_per_epoch
                         or trainer.global_step == trainer.total_steps)
        if epoch == self.warmup_epochs - 1:
            if last_of_epoch:
                self._mark("end", trainer, loss)
                if self.on_window_start is not None:
                    self.on_window_start()
            return
        if trainer.batch_in_epoch == 1:
            self._mark("first", trainer, loss)
        if last_of_epoch:
            self._mark("end", trainer, loss)
        if trainer.global_step == trainer.total_steps and self.on_window_end is not None:
            self.on_window_end()

    def summary(self) -> dict[str, float]:
        """Steps/s over the window and within epochs; seconds per epoch boundary; CPU per step."""
        ends = [m for m in self.marks if m[0] == "end"]
        firsts = [m for m in self.marks if m[0] == "first"]
        if len(ends) < 2 or not firsts:
            raise RuntimeError("the fit ended before a whole epoch was timed")
        (_, s0, w0, _, _), (_, s1, w1, _, _) = ends[0], ends[-1]
        in_steps = sum(e[1] - f[1] for f, e in zip(firsts, ends[1:], strict=True))
        in_wall = sum(e[2] - f[2] for f, e in zip(firsts, ends[1:], strict=True))
        in_cpu = sum(e[3] - f[3] for f, e in zip(firsts, ends[1:], strict=True))
        in_python_cpu = sum(e[4] - f[4] for f, e in zip(firsts, ends[1:], strict=True))
        in_epoch_step = in_wall / in_steps
        # From the previous epoch's last step to this epoch's first: a boundary plus one step.
        gaps = [f[2] - e[2] for e, f in zip(ends[:-1], firsts, strict=True)]
        return {
            "steps": s1 - s0,
            "steps_per_second": (s1 - s0) / (w1 - w0),
            "in_epoch_steps_per_second": 1.0 / in_epoch_step,
            "boundary_seconds": max(0.0, sum(gaps) / len(gaps) - in_epoch_step),
            "cpu_seconds_per_step": in_cpu / in_steps,
            "python_cpu_seconds_per_step": in_python_cpu / in_steps,
        }


def quiet_progress() -> Any:
    """The default progress plugin as it behaves off a terminal, printing into a buffer."""
    from rich.console import Console

    from nnx_trainer_plugins.rich_progress import RichProgress

    return RichProgress(console=Console(file=io.StringIO()), force=False)


@dataclass
class FitResult:
    """What one timed ``Trainer.fit`` measured (rates are steady state, compile excluded)."""

    steps_per_second: float  # over the whole timed window, epoch boundaries included
    in_epoch_steps_per_second: float
    boundary_seconds: float  # per epoch boundary, beyond the step it holds
    cpu_seconds_per_step: float  # process CPU time (all threads) per in-epoch step
    python_cpu_seconds_per_step: float  # the same, Python threads only (python_threads_cpu)
    images_per_second: float
    timed_steps: int
    compile_seconds: float
    data_wait_share: float
    fit_seconds: float
    plugins: list[str]
    trainer: Any


def timed_fit(
    task: ResNetTask,
    *,
    batch_size: int,
    epochs: int,
    warmup_epochs: int = 1,
    default_plugins: bool = True,
    extra_plugins: Sequence[Any] = (),
    clock: StepClock | None = None,
    **trainer_kwargs: Any,
) -> FitResult:
    """``Trainer.fit`` with the steady state timed by :class:`StepClock`.

    ``default_plugins=True``: every installed plugin at its default settings (progress
    in its non-terminal mode, printing into a buffer); ``False``: ``plugin_autoload=False``.
    """
    clock = clock or StepClock(warmup_epochs)
    plugins: list[Any] = [clock, *extra_plugins]
    if default_plugins:
        plugins.append(quiet_progress())
    with tempfile.TemporaryDirectory(prefix="nnx-bench-") as run_dir:
        trainer = nnx_trainer.Trainer(
            max_epochs=epochs, batch_size=batch_size, run_dir=run_dir, plugins=plugins,
            plugin_autoload=default_plugins, **trainer_kwargs,
        )
        trainer.fit(task)
        jax.block_until_ready(trainer.state)
    timing = clock.summary()
    return FitResult(
        steps_per_second=timing["steps_per_second"],
        in_epoch_steps_per_second=timing["in_epoch_steps_per_second"],
        boundary_seconds=timing["boundary_seconds"],
        cpu_seconds_per_step=timing["cpu_seconds_per_step"],
        python_cpu_seconds_per_step=timing["python_cpu_seconds_per_step"],
        images_per_second=timing["in_epoch_steps_per_second"] * batch_size,
        timed_steps=int(timing["steps"]),
        compile_seconds=trainer.compile_seconds.get("train", float("nan")),
        data_wait_share=trainer.data_wait_seconds / trainer.fit_seconds,
        fit_seconds=trainer.fit_seconds,
        plugins=[name for name, _, _ in describe_plugins(trainer.plugin_manager)
                 if name != StepClock.name],
        trainer=trainer,
    )


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled executables in ``directory`` so repeated fits of one model compile once."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ------------------------------------------------------------------------- FLOPs


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    # rhs_spec = (out feature dim, in feature dim, *spatial dims) of the kernel.
    kernel_spatial = math.prod(rhs[d] for d in rhs_spec[2:])
    in_per_group = rhs[rhs_spec[1]]
    return math.prod(out) * kernel_spatial * in_per_group


def _dot_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _count_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif eqn.primitive.name == "dot_general":
            total += _dot_macs(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += _count_macs(sub)
    return total


def forward_macs(model: nnx.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass over a batch of ``input_shape`` (from the jaxpr).

    Only convolutions and matrix products count (the standard convention for
    ResNet FLOPs); BatchNorm, ReLU and pooling are not.
    """
    graphdef, state = nnx.split(model)  # ``model`` may be abstract (``nnx.eval_shape``)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    closed = jax.make_jaxpr(forward)(state, x)
    return _count_macs(closed.jaxpr)


def train_flops_per_example(model: nnx.Module, image_shape: Sequence[int]) -> float:
    """FLOPs of one training step per example: forward ``2*MACs``, backward twice that."""
    return 3 * 2 * forward_macs(model, (1, *image_shape))


# ------------------------------------------------------------------ small helpers


def state_bytes_per_device(state: Any) -> dict[str, int]:
    """Bytes of ``state``'s arrays held by each device (its addressable shards)."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return per_device
