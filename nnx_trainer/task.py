"""The class users subclass: it says WHAT is trained; the Trainer owns HOW."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from nnx_trainer.trainer import Trainer

Batch = Mapping[str, jax.Array]


class Task:
    """A training problem: model, optimizer, data, steps and metrics.

    Data methods return Grain ``MapDataset``s of single examples (dicts of NumPy
    arrays); the Trainer shuffles, shards, batches and prefetches them.
    ``training_step``, ``validation_step`` and ``predict_step`` are traced under
    ``jax.jit``: use ``jax.numpy`` and no Python side effects.

    ``self.trainer`` is set by the Trainer before any ``configure_*`` call.
    """

    trainer: Trainer | None = None
    #: What one example is, in throughput figures and summaries ("images/s" for an image task).
    example_name: str = "examples"

    # ---- what gets trained -------------------------------------------------

    def configure_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Build the model. ``self.compute_dtype`` is the dtype the Trainer's precision asks for."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_model(rngs)")

    def configure_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """Build the optimizer; ``total_steps`` is the number of optimizer updates of the fit."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement configure_optimizer(total_steps)"
        )

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
