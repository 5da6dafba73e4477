"""The class users subclass: it says WHAT is trained; the Trainer owns HOW."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from nnx_trainer.run_view import RunView

Batch = Mapping[str, jax.Array]
#: What selects variables: a Variable type, ``nnx.PathContains("backbone")``, ``nnx.All(...)``...
Filter = Any
#: The name of the optimizer when ``configure_optimizer`` returns one transformation.
DEFAULT_OPTIMIZER = "default"


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One of several named optimizers: an optax transformation over the parameters
    that ``wrt`` selects (an NNX filter, e.g. ``nnx.PathContains("generator")``).

    Each parameter belongs to at most one optimizer; parameters no optimizer selects
    (and those of ``Task.frozen_parameters``) get no update and no optimizer state.
    """

    tx: optax.GradientTransformation
    wrt: Filter = nnx.Param


class Task:
    """A training problem: model, optimizer, data, steps and metrics.

    Data methods return Grain ``MapDataset``s of single examples (dicts of NumPy
    arrays); the Trainer shuffles, shards, batches and prefetches them.
    ``training_step``, ``validation_step`` and ``predict_step`` are traced under
    ``jax.jit``: use ``jax.numpy`` and no Python side effects.

    ``self.trainer`` is set by the Trainer before any ``configure_*`` call: the run as a
    :class:`~nnx_trainer.run_view.RunView` (counters, options, ``compute_dtype``...).
    """

    trainer: RunView | None = None
    #: What one example is, in throughput figures and summaries ("images/s" for an image task).
    example_name: str = "examples"

    # ---- what gets trained -------------------------------------------------

    def configure_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Build the model. ``self.compute_dtype`` is the dtype the Trainer's precision asks for."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_model(rngs)")

    def configure_optimizer(
        self, total_steps: int
    ) -> optax.GradientTransformation | Mapping[str, OptimizerSpec]:
        """Build the optimizer; ``total_steps`` is the number of optimizer updates of the fit.

        Return one optax transformation (over every ``nnx.Param``), or several named
        ones, ``{"generator": OptimizerSpec(tx, wrt=filter), ...}``, each over its own
        parameters (a GAN's two networks; a head trained apart from a backbone). For
        parameter groups with their own learning rates, ``optax.multi_transform`` in
        one transformation is enough.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement configure_optimizer(total_steps)"
        )

    def frozen_parameters(self) -> Filter:
        """Parameters that get no update and no optimizer state (a frozen backbone,
        a distillation teacher): an NNX filter, default none. Batch-norm statistics of
        frozen layers still update in training mode, as in the forward pass they run.
        """
        return nnx.Nothing

    def import_weights(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Map a weight file read for ``Trainer.fit(init_from=...)`` to the model's
        ``nnx`` paths (``"stages/0/conv1/kernel"``) and layouts. The default keeps the
        tensors as they are (a file saved from this model, or a checkpoint);
        ``ResNetTask`` maps torchvision/timm ResNet state dicts here.
        """
        return tensors

    def configure_train_metrics(self) -> nnx.MultiMetric:
        """Metrics accumulated on device in training, updated with ``loss=`` and the aux dict."""
        return nnx.MultiMetric(loss=nnx.metrics.Average("loss"))

    def configure_metrics(self) -> nnx.MultiMetric:
        """Evaluation metrics, updated with ``validation_step``'s outputs and ``mask=``."""
        return nnx.MultiMetric(loss=nnx.metrics.Average("loss"))

    # ---- data ----------------------------------------------------------------

    def train_data(self) -> grain.MapDataset:
        """Training examples, one dict per example, before augmentation."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_data()")

    def val_data(self) -> grain.MapDataset | Mapping[str, grain.MapDataset] | None:
        """Validation examples, ``{name: examples}`` for several sets, or None for none.

        Several sets log ``val/<name>/<metric>`` each, in one evaluation.
        """
        return None

    def test_data(self) -> grain.MapDataset | Mapping[str, grain.MapDataset] | None:
        """Test examples; defaults to the validation examples."""
        return self.val_data()

    def predict_data(self) -> grain.MapDataset | None:
        """Examples to predict; defaults to the test examples."""
        return self.test_data()

    def train_transforms(self) -> Sequence[Any]:
        """Per-example Grain transforms (``grain.transforms.Map`` / ``RandomMap``) applied
        after the per-epoch shuffle. Random ones get a seed derived from the Trainer seed,
        the epoch and the example's position, so runs are reproducible."""
        return ()

    def eval_transforms(self) -> Sequence[Any]:
        """Per-example deterministic transforms for validation, test and predict."""
        return ()

    # ---- steps (traced under jit) ----------------------------------------------

    def training_step(self, model: nnx.Module, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
        """Return ``(scalar loss, aux)``; ``aux`` is passed to the train metrics' ``update``."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def training_update(
        self, model: nnx.Module, optimizers: Mapping[str, nnx.Optimizer], batch: Batch
    ) -> tuple[jax.Array, dict[str, Any]]:
        """One optimisation step, traced inside the compiled train step; returns
        ``(scalar loss, aux)`` like ``training_step``.

        The default differentiates ``training_step`` with respect to every optimizer's
        parameters and lets each optimizer apply its part. Override it to take over the
        update (Lightning's manual optimisation): ``optimizers`` maps each name of
        ``configure_optimizer`` (``"default"`` for a single one) to an ``nnx.Optimizer``
        whose ``wrt`` already leaves out frozen parameters, e.g.::

            opt = optimizers["discriminator"]
            grads = nnx.grad(d_loss, argnums=nnx.DiffState(0, opt.wrt))(model, batch)
            opt.update(model, grads)

        The Trainer still jits, donates, shards, updates metrics and checkpoints.
        """
        wrt = nnx.Any(*(optimizer.wrt for optimizer in optimizers.values()))

        def loss_fn(model: nnx.Module) -> tuple[jax.Array, dict[str, Any]]:
            return loss_and_aux(self.training_step(model, batch),
                                f"{type(self).__name__}.training_step")

        (loss, aux), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True
        )(model)
        for optimizer in optimizers.values():
            optimizer.update(model, grads)  # each reads only the gradients of its wrt
        return loss, aux

    def validation_step(self, model: nnx.Module, batch: Batch) -> dict[str, Any]:
        """Return per-example outputs; the Trainer calls ``metrics.update(**outputs, mask=...)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement validation_step")

    def test_step(self, model: nnx.Module, batch: Batch) -> dict[str, Any]:
        """Like ``validation_step``; the default is ``validation_step``."""
        return self.validation_step(model, batch)

    def predict_step(self, model: nnx.Module, batch: Batch) -> Any:
        """Return a pytree with one leading row per example (e.g. ``model(batch["x"])``).

        The engine knows no input key, so there is no default: override it to predict.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement predict_step(model, batch) to predict: "
            "the engine does not know which keys of the batch are the model's input"
        )

    # ---- configuration seen by loggers -----------------------------------------

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters to log (JSON-serialisable)."""
        return {}

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype chosen by the Trainer's ``precision`` (float32 without a trainer)."""
        if self.trainer is None:
            return jnp.dtype(jnp.float32)
        return self.trainer.compute_dtype


def loss_and_aux(result: Any, where: str) -> tuple[jax.Array, Mapping[str, Any]]:
    """A step's ``(scalar loss, aux)``, or a TypeError naming what ``where`` returned instead
    (checked while tracing, before differentiation, whose own error names no step)."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping)):
        raise TypeError(f"{where} must return (scalar loss, dict of metric inputs), got "
                        f"{type(result).__name__}")
    loss, aux = result
    if jnp.shape(loss) != ():
        raise TypeError(f"{where} returned a loss of shape {jnp.shape(loss)}; it must be a "
                        "scalar (average over the batch, e.g. .mean())")
    return loss, aux
