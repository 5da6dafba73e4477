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
training state is still the one the fit ended with (or one restored from a checkpoint
that holds an average, see below; not one rebuilt or assigned). With ``apply_at_end``
the EMA parameters replace the model's when the fit ends (after its last checkpoint,
which holds the training weights).

**Checkpointed.** The average is saved with the checkpoint's arrays (the
``array_state_dict`` hook: ``state["plugins"]["ema"]``, or the plugin's ``name``), so a
resumed fit continues it exactly: the same averaged arrays, bit for bit, as a run
never stopped. A checkpoint without it (saved with the EMA off, or before averages
were saved) restores with a warning from the checkpoint plugin, and the average
starts from the restored weights. Evaluating a checkpoint (``ckpt_path=`` of
``validate``/``test``/``predict``) uses the average saved with it.

Limitations:

- One EMA plugin with ``use_for_eval`` per trainer (two would swap over each other).
- With ``accumulate_grad_batches = A`` the parameters change every ``A`` steps; set
  ``update_every=A`` to average each update once.

Opt-in: installing the package registers nothing (``from_environment`` returns None;
``nnx-trainer-plugins`` lists it as inactive with its ``activation`` sentence). Pass a
configured instance, or request it by name (``plugins=["ema"]``: ``decay=0.999``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import RunView


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_head(path: Sequence[Any]) -> Any:
    entry = path[0] if path else None
    for attr in ("name", "key", "idx"):  # GetAttrKey (NamedTuple field), DictKey, SequenceKey
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def param_positions(tree: Any, model_key: Any = None) -> list[int]:
    """Indices, among ``jax.tree.leaves(tree)``, of the arrays inside ``nnx.Param`` variables.

    :param model_key: only under this top-level key or field (``"model"``: the model of a
        ``TrainState``); None: anywhere.
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

    :param decay: weight of the old average per update, in (0, 1).
    :param update_every: update the average every N training steps.
    :param use_for_eval: validate, test and predict with the averaged parameters.
    :param apply_at_end: leave the averaged parameters in the model when the fit ends.
    """

    name = "ema"
    activation = (
        "opt-in: pass a configured instance, e.g. Trainer(plugins=[EMA(decay=0.999)]), "
        "or request it by name: plugins=['ema']"
    )

    @classmethod
    def from_environment(cls) -> EMA | None:
        """Never on by itself (it changes what evaluations measure): see :attr:`activation`."""
        return None

    def __init__(
        self,
        decay: float = 0.999,
        update_every: int = 1,
        use_for_eval: bool = True,
        apply_at_end: bool = False,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"decay must be a number in (0, 1), e.g. 0.999, got {decay!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive integer, got {update_every!r}")
        self.decay = float(decay)
        self.update_every = update_every
        self.use_for_eval = use_for_eval
        self.apply_at_end = apply_at_end
        self._ema: tuple[jax.Array, ...] | None = None
        self._model_positions: list[int] = []  # Param arrays among leaves(state.model)
        self._state_positions: list[int] = []  # the same arrays among leaves(state)
        self._fitting = False
        self._restored = False  # a checkpoint brought the average back: the fit continues it
        self._final_state: Any = None  # the state a fit ended with (EMA still matches it)
        self._raw: Any = None  # the training state while an evaluation runs on the EMA

    # ---------------------------------------------------------------- access

    def averaged_model_state(self, trainer: RunView) -> nnx.State:
        """The model state (``trainer.state.model``) with the averaged parameters, as copies.

        ``nnx.update(model, ema.averaged_model_state(trainer))`` loads it into a model.
        """
        if self._ema is None:
            raise RuntimeError("no average yet: run fit first")
        copies = [jnp.copy(x) for x in self._ema]
        return _replace_leaves(trainer.state.model, self._model_positions, copies)

    def _swapped(self, state: Any, copy: bool = False) -> Any:
        values = [jnp.copy(x) for x in self._ema] if copy else self._ema
        return _replace_leaves(state, self._state_positions, values)

    def _locate(self, trainer: RunView) -> list[jax.Array]:
        """Find the Param arrays in ``trainer.state``; returns them (the model's, in order)."""
        state = trainer.state
        self._state_positions = param_positions(state, model_key="model")
        self._model_positions = param_positions(state.model)
        leaves = jax.tree.leaves(state.model)
        return [leaves[i] for i in self._model_positions]

    def _start(self, trainer: RunView) -> None:
        """A fresh average: the current parameters."""
        # Copies (new buffers): the state's arrays are donated to the next step.
        self._ema = tuple(jnp.copy(x) for x in self._locate(trainer))

    def _fits(self, trainer: RunView) -> bool:
        """Whether the average has the shapes and dtypes of the current parameters."""
        if self._ema is None:
            return False
        params = self._locate(trainer)
        return len(params) == len(self._ema) and all(
            p.shape == e.shape and p.dtype == e.dtype
            for p, e in zip(params, self._ema, strict=True)
        )

    # ------------------------------------------------------------ checkpoint

    @hookimpl
    def array_state_dict(self, trainer: RunView) -> dict[str, Any] | None:
        """The average, saved with the checkpoint's arrays (allocated first if need be).

        Before a restore the average must exist (it is the restore target), so a first
        one is made from the current parameters; ``on_fit_start`` starts it afresh
        anyway unless a checkpoint restored it.
        """
        if not (self._fitting and self._ema is not None) and not self._fits(trainer):
            self._start(trainer)
        return {self.name: self._ema}

    @hookimpl
    def load_array_state_dict(self, trainer: RunView, state: Mapping[str, Any]) -> None:
        """Take the checkpoint's average (the checkpoint plugin warns when it has none)."""
        saved = state.get(self.name)
        if saved is None:
            self._restored = False
            return
        self._locate(trainer)
        self._ema = tuple(saved)
        if trainer.stage == "fit":
            self._restored = True  # on_fit_start continues it
        else:
            # Evaluating a checkpoint: its average belongs to its (restored) weights.
            self._restored = False
            self._fitting = False
            self._final_state = trainer.state

    # ----------------------------------------------------------------- train

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Continue a restored average, else start one from the current parameters."""
        if not (self._restored and self._fits(trainer)):
            self._start(trainer)
        self._restored = False
        self._fitting = True
        self._final_state = None

    @hookimpl
    def on_train_batch_end(self, trainer: RunView) -> None:
        """Fold the new parameters in (one async device op; read before the next step donates)."""
        if self._ema is None or not self._fitting:
            return
        if trainer.global_step % self.update_every == 0:
            leaves = jax.tree.leaves(trainer.state.model)
            params = tuple(leaves[i] for i in self._model_positions)
            self._ema = _ema_update(self._ema, params, self.decay)

    @hookimpl
    def on_fit_end(self, trainer: RunView) -> None:
        """Optionally leave the average in the model (after the fit's last checkpoint)."""
        if self.apply_at_end and self._ema is not None:
            trainer.state = self._swapped(trainer.state, copy=True)

    @hookimpl
    def on_run_end(self, trainer: RunView, stage: str, outcome: str) -> None:
        """Training weights back if an evaluation failed; after a fit, what evaluates next.

        A fit that completed or stopped leaves an average that belongs to its final state
        (unless ``apply_at_end`` already put it into the model); after a preempted or
        failed fit the average is not used by later evaluations.
        """
        self._restore(trainer)
        if stage != "fit":
            return
        self._fitting = False
        self._restored = False
        if outcome in ("completed", "stopped") and not self.apply_at_end:
            self._final_state = trainer.state
        else:
            self._final_state = None

    # ------------------------------------------------------------------ eval

    def _swap_in(self, trainer: RunView) -> None:
        if not self.use_for_eval or self._ema is None or self._raw is not None:
            return
        if not self._fitting and trainer.state is not self._final_state:
            return  # the state changed since the fit: the average no longer belongs to it
        self._raw = trainer.state
        # The eval steps do not donate the state, so the training arrays stay valid.
        trainer.state = self._swapped(self._raw)

    def _restore(self, trainer: RunView) -> None:
        if self._raw is None:
            return
        after_fit = not self._fitting
        trainer.state = self._raw  # the very same training arrays: bit-exact
        self._raw = None
        if after_fit:
            self._final_state = trainer.state  # the setter made a new container

    @hookimpl
    def on_validation_start(self, trainer: RunView) -> None:
        """Evaluate with the averaged parameters."""
        self._swap_in(trainer)

    @hookimpl(tryfirst=True)
    def on_validation_end(self, trainer: RunView) -> None:
        """Training weights back first, so other plugins (checkpoints) see them."""
        self._restore(trainer)

    @hookimpl
    def on_predict_start(self, trainer: RunView) -> None:
        """Predict with the averaged parameters."""
        self._swap_in(trainer)

    @hookimpl(tryfirst=True)
    def on_predict_end(self, trainer: RunView) -> None:
        """Training weights back."""
        self._restore(trainer)
