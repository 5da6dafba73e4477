"""An exponential moving average (EMA) of the model's parameters, used for evaluation.

``Trainer(plugins=[EMA(decay=0.999)])`` keeps, on device, ``ema = decay * ema + (1 -
decay) * params`` for every ``nnx.Param`` of the model, starting from the weights at
fit start and updated after every ``update_every``-th training step by one jitted
function (asynchronous: the host never waits for it). Batch statistics and other
non-parameter state are not averaged: evaluation uses the live model's.

With ``use_for_eval`` (the default), validation, test and predict run on the EMA
parameters: the plugin swaps them into ``trainer.state`` when an evaluation starts and
puts the exact training arrays back when it ends (before any other plugin's
``on_validation_end``, so a checkpoint saved there holds the training weights).
Training itself is unchanged, bit for bit. After a fit, standalone
``trainer.validate()`` / ``test()`` / ``predict()`` use the EMA too, as long as the
training state is still the one the fit ended with (not restored from a checkpoint
or rebuilt). With ``apply_at_end`` the EMA parameters replace the model's when the
fit ends (after its last checkpoint, which holds the training weights).

Limitations:

- **Not checkpointed.** Plugin state in checkpoints is JSON only, so the averaged
  arrays are not saved: a resumed run restarts the average from the restored
  (training) weights.
- One EMA plugin with ``use_for_eval`` per trainer (two would swap over each other).
- With ``accumulate_grad_batches = A`` the parameters change every ``A`` steps; set
  ``update_every=A`` to average each update once.

The default instance (``decay=None``), loaded whenever the package is installed,
does nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import Trainer


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_head(path: Sequence[Any]) -> Any:
    entry = path[0] if path else None
    return getattr(entry, "key", getattr(entry, "idx", entry))


def param_positions(tree: Any, model_key: Any = None) -> list[int]:
    """Indices, among ``jax.tree.leaves(tree)``, of the arrays inside ``nnx.Param`` variables.

    :param model_key: only under this top-level key (``0``: the model of a
        ``(model, optimizer)`` state); None: anywhere.
    """
    positions, offset = [], 0
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        count = len(jax.tree.leaves(node))
        if isinstance(node, nnx.Param) and (model_key is None or _path_head(path) == model_key):
            positions.extend(range(offset, offset + count))
        offset += count
    return positions


@functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
def _ema_update(ema: tuple, params: tuple, decay: float) -> tuple:
    # Donating the old average: its buffers are reused, no second copy in memory.
    return tuple(
        (decay * e + (1.0 - decay) * p).astype(e.dtype) for e, p in zip(ema, params, strict=True)
    )


def _replace_leaves(tree: Any, positions: Sequence[int], values: Sequence[Any]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    for position, value in zip(positions, values, strict=True):
        leaves[position] = value
    return jax.tree.unflatten(treedef, leaves)


class EMA:
    """Exponential moving average of the parameters; evaluate with it.

    :param decay: weight of the old average per update, in (0, 1) (e.g. 0.999); None
        disables the plugin.
    :param update_every: update the average every N training steps.
    :param use_for_eval: validate, test and predict with the averaged parameters.
    :param apply_at_end: leave the averaged parameters in the model when the fit ends.
    """

    name = "ema"

    def __init__(
        self,
        decay: float | None = None,
        update_every: int = 1,
        use_for_eval: bool = True,
        apply_at_end: bool = False,
    ) -> None:
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1
        ):
            raise ValueError(
                f"decay must be a number in (0, 1), e.g. 0.999 (or None to disable), got {decay!r}"
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive integer, got {update_every!r}")
        self.decay = None if decay is None else float(decay)
        self.update_every = update_every
        self.use_for_eval = use_for_eval
        self.apply_at_end = apply_at_end
        self._ema: tuple[jax.Array, ...] | None = None
        self._model_positions: list[int] = []  # Param arrays among leaves(state[0])
        self._state_positions: list[int] = []  # the same arrays among leaves(state)
        self._fitting = False
        self._final_state: Any = None  # the state a fit ended with (EMA still matches it)
        self._raw: Any = None  # the training state while an evaluation runs on the EMA

    # ---------------------------------------------------------------- access

    def averaged_model_state(self, trainer: Trainer) -> nnx.State:
        """The model state (``trainer.state[0]``) with the averaged parameters, as copies.

        ``nnx.update(model, ema.averaged_model_state(trainer))`` loads it into a model.
        """
        if self._ema is None:
            raise RuntimeError("no average yet: configure EMA(decay=...) and run fit first")
        copies = [jnp.copy(x) for x in self._ema]
        return _replace_leaves(trainer.state[0], self._model_positions, copies)

    def _swapped(self, state: Any, copy: bool = False) -> Any:
        values = [jnp.copy(x) for x in self._ema] if copy else self._ema
        return _replace_leaves(state, self._state_positions, values)

    # ----------------------------------------------------------------- train

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Start the average from the current (initial or restored) parameters."""
        if self.decay is None:
            return
        state = trainer.state
        self._state_positions = param_positions(state, model_key=0)
        self._model_positions = param_positions(state[0])
        leaves = jax.tree.leaves(state[0])
        # Copies (new buffers): the state's arrays are donated to the next step.
        self._ema = tuple(jnp.copy(leaves[i]) for i in self._model_positions)
        self._fitting = True
        self._final_state = None

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """Fold the new parameters in (one async device op; read before the next step donates)."""
        if self._ema is None or not self._fitting:
            return
        if trainer.global_step % self.update_every == 0:
            leaves = jax.tree.leaves(trainer.state[0])
            params = tuple(leaves[i] for i in self._model_positions)
            self._ema = _ema_update(self._ema, params, self.decay)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        """Optionally leave the average in the model; remember the final state."""
        if self._ema is None:
            return
        self._fitting = False
        if self.apply_at_end:
            trainer.state = self._swapped(trainer.state, copy=True)
            self._final_state = None  # the model already holds the average
        else:
            self._final_state = trainer.state

    @hookimpl
    def on_exception(self, trainer: Trainer) -> None:
        """Put the training weights back if the failure came during an evaluation."""
        self._restore(trainer)
        self._fitting = False

    @hookimpl
    def on_save_checkpoint(self, reason: str) -> None:
        """A preempted fit ends here (no ``on_fit_end``); its EMA is not used afterwards."""
        if reason == "preemption":
            self._fitting = False

    # ------------------------------------------------------------------ eval

    def _swap_in(self, trainer: Trainer) -> None:
        if not self.use_for_eval or self._ema is None or self._raw is not None:
            return
        if not self._fitting and trainer.state is not self._final_state:
            return  # the state changed since the fit: the average no longer belongs to it
        self._raw = trainer.state
        # The eval steps do not donate the state, so the training arrays stay valid.
        trainer.state = self._swapped(self._raw)

    def _restore(self, trainer: Trainer) -> None:
        if self._raw is None:
            return
        after_fit = not self._fitting
        trainer.state = self._raw  # the very same training arrays: bit-exact
        self._raw = None
        if after_fit:
            self._final_state = trainer.state  # the setter made a new container

    @hookimpl
    def on_validation_start(self, trainer: Trainer) -> None:
        """Evaluate with the averaged parameters."""
        self._swap_in(trainer)

    @hookimpl(tryfirst=True)
    def on_validation_end(self, trainer: Trainer) -> None:
        """Training weights back first, so other plugins (checkpoints) see them."""
        self._restore(trainer)

    @hookimpl
    def on_predict_start(self, trainer: Trainer) -> None:
        """Predict with the averaged parameters."""
        self._swap_in(trainer)

    @hookimpl(tryfirst=True)
    def on_predict_end(self, trainer: Trainer) -> None:
        """Training weights back."""
        self._restore(trainer)
