"""EMA: the average's math, evaluation on the average, and training left bit-for-bit unchanged."""

from __future__ import annotations

import logging

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.ema import EMA
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint as _OrbaxCheckpoint


def OrbaxCheckpoint(**options):  # noqa: N802 - stands in for the class in these tests
    """The plugin saving at every cadence point: these tests count and time saves."""
    return _OrbaxCheckpoint(**{"min_seconds_between_saves": 0, **options})


def params_of(state) -> list[np.ndarray]:
    """Host copies of the Param arrays of a model state."""
    return [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(state, nnx.Param))]


class Snapshots:
    """Host copies of the parameters at fit start and after every step."""

    name = "snapshots"

    def __init__(self) -> None:
        self.params: list[list[np.ndarray]] = []
        self.losses: list[float] = []
        self.val_loss: list[float] = []
        self.val_at: dict[int, float] = {}  # global step -> val/loss

    @nnx_trainer.hookimpl
    def on_fit_start(self, trainer):
        self.params.append(params_of(trainer.state.model))

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer, loss):
        self.params.append(params_of(trainer.state.model))
        self.losses.append(float(loss))

    @nnx_trainer.hookimpl
    def on_validation_end(self, trainer, stage, metrics):
        if stage == "validate":
            self.val_loss.append(float(metrics["val/loss"]))
            self.val_at[trainer.global_step] = self.val_loss[-1]


def test_average_over_three_steps_matches_a_hand_computation_and_apply_at_end(tmp_path):
    class EveryTwo(EMA):
        name = "ema_every_two"

    class SGD(TinyTask):
        def configure_optimizer(self, total_steps):
            return optax.sgd(0.5)

    d = 0.9
    every_step = EMA(decay=d, apply_at_end=True)
    every_two = EveryTwo(decay=0.75, update_every=2)
    snaps = Snapshots()
    trainer = make_trainer(tmp_path, every_step, every_two, snaps, max_steps=3)
    trainer.fit(SGD(n_val=0))

    # ema_3 = d^3 p0 + d^2 (1-d) p1 + d (1-d) p2 + (1-d) p3, for every Param (BatchNorm
    # scale/bias, kernels, biases); apply_at_end left it in the model.
    model_params = params_of(nnx.state(trainer.model))
    for i, averaged in enumerate(model_params):
        p0, p1, p2, p3 = (s[i] for s in snaps.params)
        expected = d**3 * p0 + d**2 * (1 - d) * p1 + d * (1 - d) * p2 + (1 - d) * p3
        np.testing.assert_allclose(averaged, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(model_params[3], snaps.params[3][3])  # fc1 kernel: not the last step

    # update_every=2: only the parameters after step 2 were folded in.
    for i, averaged in enumerate(params_of(every_two.averaged_model_state(trainer))):
        expected = 0.75 * snaps.params[0][i] + 0.25 * snaps.params[2][i]
        np.testing.assert_allclose(averaged, expected, rtol=1e-6, atol=1e-7)


def evaluate_by_hand(trainer, task, model_state):
    """Mean val loss of ``model_state`` in eval mode (the live model, then re-synced)."""
    model = trainer.model
    nnx.update(model, model_state)
    model.eval()
    examples = [task.val_data()[i] for i in range(task.n_val)]
    x = np.stack([e["image"] for e in examples])
    y = np.stack([e["label"] for e in examples])
    loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    model.train()
    return float(np.mean(np.asarray(loss)))


def test_evaluation_uses_the_average_and_training_is_unchanged(tmp_path):
    task = TinyTask(n_val=20)
    common = dict(max_epochs=2, val_check_interval=3, eval_batch_size=8)

    plain = Snapshots()
    plain_trainer = make_trainer(tmp_path / "plain", plain, **common)
    plain_trainer.fit(task)

    ema, snaps = EMA(decay=0.8), Snapshots()
    trainer = make_trainer(tmp_path / "ema", ema, snaps, **common)
    trainer.fit(task)

    # Training: same losses and parameters, bit for bit, despite 4 swaps in and out
    # (mid-epoch at steps 3 and 6, and at both epoch ends).
    assert snaps.losses == plain.losses
    for a, b in zip(snaps.params, plain.params, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(plain_trainer.state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Evaluation: the last validation (after the last step) ran on the average.
    assert len(snaps.val_loss) == 4
    averaged = evaluate_by_hand(trainer, task, ema.averaged_model_state(trainer))
    raw = evaluate_by_hand(trainer, task, trainer.state.model)
    assert snaps.val_loss[-1] == pytest.approx(averaged, rel=1e-5)
    assert plain.val_loss[-1] == pytest.approx(raw, rel=1e-5)
    assert abs(averaged - raw) > 1e-4  # the check can tell them apart

    # After the fit, standalone evaluation still uses the average...
    assert trainer.validate(task)["val/loss"] == pytest.approx(averaged, rel=1e-5)
    assert trainer.validate(task)["val/loss"] == pytest.approx(averaged, rel=1e-5)
    # ...until the training state is replaced (e.g. restored): then the average is stale.
    trainer.state = jax.tree.map(lambda x: x.copy(), trainer.state)
    assert trainer.validate(task)["val/loss"] == pytest.approx(raw, rel=1e-5)


def test_opt_in_registered_only_when_configured_or_requested(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert EMA.from_environment() is None
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert trainer.plugin_manager.get_plugin("ema") is None  # no inert instance
    assert trainer.plugin_manager.inactive["ema"] == EMA.activation
    by_name = nnx_trainer.Trainer(run_dir=tmp_path, plugin_autoload=False, plugins=["ema"])
    assert by_name.plugin_manager.get_plugin("ema").decay == 0.999
    mine = EMA(decay=0.9)
    assert nnx_trainer.Trainer(run_dir=tmp_path, plugins=[mine]).plugin_manager.get_plugin(
        "ema") is mine


def test_a_failed_evaluation_puts_the_training_weights_back_at_run_end(tmp_path):
    class FailAfterFirstBatch:
        active = False

        @nnx_trainer.hookimpl
        def on_validation_batch_end(self, stage):
            if self.active:
                raise RuntimeError("eval failed")

    fail = FailAfterFirstBatch()
    trainer = make_trainer(tmp_path, EMA(decay=0.5), fail, max_steps=4)
    trainer.fit(TinyTask(n_val=20))
    trained = [np.asarray(x).copy() for x in jax.tree.leaves(trainer.state)]
    fail.active = True
    with pytest.raises(RuntimeError, match="eval failed"):
        trainer.validate(TinyTask(n_val=20))
    for a, b in zip(jax.tree.leaves(trainer.state), trained, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


# ------------------------------------------------------------ checkpoints


def averages(ema) -> list[np.ndarray]:
    return [np.asarray(x).copy() for x in ema._ema]


def saved_plugin_arrays(step_dir) -> list[str]:
    """The plugin keys under ``state["plugins"]`` of a committed checkpoint (its metadata)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return sorted(handler.metadata(step_dir / "state").tree.get("plugins", {}))
    finally:
        handler.close()


def test_a_resumed_fit_continues_the_average_bit_for_bit(tmp_path):
    task = TinyTask(n_val=20)
    # 4 steps per epoch; validations at 3, 4, 6, 8, 9 (val_check_interval and epoch ends).
    common = dict(val_check_interval=3, eval_batch_size=8)

    full_ema, full = EMA(decay=0.8), Snapshots()
    full_trainer = make_trainer(tmp_path / "full", full_ema, full, max_steps=10, **common)
    full_trainer.fit(task)

    run = tmp_path / "run"
    first_ema = EMA(decay=0.8)
    make_trainer(run, first_ema, Snapshots(), OrbaxCheckpoint(), max_steps=6, **common).fit(
        task
    )
    assert saved_plugin_arrays(run / "checkpoints" / "6") == ["ema"]

    ema, resumed = EMA(decay=0.8), Snapshots()
    trainer = make_trainer(run, ema, resumed, OrbaxCheckpoint(), max_steps=10, **common)
    trainer.fit(task, ckpt_path="last")

    assert resumed.losses == full.losses[6:]  # training: unchanged
    for a, b in zip(averages(ema), averages(full_ema), strict=True):
        np.testing.assert_array_equal(a, b)  # the average: bit for bit
    # The validations after the resume ran on that average and match exactly.
    assert sorted(resumed.val_at) == [8, 9]
    assert resumed.val_at == {s: full.val_at[s] for s in (8, 9)}

    # Evaluating the checkpoint later uses the average saved with it, as the fit did;
    # a trainer without EMA evaluates the same checkpoint on the training weights.
    expected = full_trainer.validate(task)["val/loss"]  # still the fit's average
    last = str(run / "checkpoints" / "10")
    with_ema = make_trainer(tmp_path / "probe", EMA(decay=0.8), OrbaxCheckpoint())
    assert with_ema.validate(task, ckpt_path=last)["val/loss"] == pytest.approx(expected, rel=1e-6)
    plain = make_trainer(tmp_path / "plain", OrbaxCheckpoint())
    raw = plain.validate(task, ckpt_path=last)["val/loss"]
    assert plain.global_step == 10 and abs(raw - expected) > 1e-4


class EveryTwo(EMA):
    name = "ema_every_two"


def test_a_checkpoint_without_an_average_warns_and_starts_it_from_the_restored_weights(
    tmp_path, caplog
):
    task = TinyTask(n_val=0)
    # Saved with another averaging plugin only: "plugins" holds "ema_every_two", no "ema".
    first_two = EveryTwo(decay=0.75, update_every=2)
    first = make_trainer(tmp_path, first_two, OrbaxCheckpoint(), max_steps=6)
    first.fit(task)
    saved_params, saved_two = params_of(first.state.model), averages(first_two)
    assert saved_plugin_arrays(tmp_path / "checkpoints" / "6") == ["ema_every_two"]

    caplog.set_level(logging.WARNING, logger="nnx_trainer.checkpoint")
    ema, two, snaps = EMA(decay=0.8), EveryTwo(decay=0.75, update_every=2), Snapshots()
    trainer = make_trainer(tmp_path, ema, two, snaps, OrbaxCheckpoint(), max_steps=8)
    trainer.fit(task, ckpt_path="last")
    assert "holds no plugin arrays for 'ema' (saved without that plugin" in caplog.text
    assert "'ema_every_two'" not in caplog.text

    # The new average started from the restored weights: after two more steps it is
    # d^2 p6 + d (1 - d) p7 + (1 - d) p8.
    for i, restored in enumerate(snaps.params[0]):
        np.testing.assert_array_equal(restored, saved_params[i])
    d = 0.8
    for i, averaged in enumerate(params_of(ema.averaged_model_state(trainer))):
        p6, p7, p8 = (s[i] for s in snaps.params)
        expected = d**2 * p6 + d * (1 - d) * p7 + (1 - d) * p8
        np.testing.assert_allclose(averaged, expected, rtol=1e-6, atol=1e-7)
    # The other one continued its checkpointed average (one update, after step 8).
    for i, averaged in enumerate(params_of(two.averaged_model_state(trainer))):
        expected = 0.75 * saved_two[i] + 0.25 * snaps.params[2][i]
        np.testing.assert_allclose(averaged, expected, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_with_an_average_resumes_without_the_plugin(tmp_path, caplog):
    task = TinyTask(n_val=0)
    first = make_trainer(tmp_path, EMA(decay=0.8), OrbaxCheckpoint(), max_steps=6)
    first.fit(task)
    saved = [np.asarray(x).copy() for x in jax.tree.leaves(first.state)]
    assert saved_plugin_arrays(tmp_path / "checkpoints" / "6") == ["ema"]

    # No averaging plugin: the average stays on disk.
    caplog.set_level(logging.INFO, logger="nnx_trainer.checkpoint")
    snaps = Snapshots()
    trainer = make_trainer(tmp_path, snaps, OrbaxCheckpoint(keep_last=2), max_steps=8)
    trainer.fit(task, ckpt_path="last")
    assert "not restoring plugin arrays 'ema'" in caplog.text
    assert trainer.global_step == 8 and len(snaps.losses) == 2
    # It restored the training state exactly; its own checkpoint has no plugin arrays.
    for a, b in zip(snaps.params[0], params_of(first.state.model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert saved_plugin_arrays(tmp_path / "checkpoints" / "8") == []
    restored = make_trainer(tmp_path / "probe", OrbaxCheckpoint())
    restored.validate(TinyTask(), ckpt_path=str(tmp_path / "checkpoints" / "6"))
    for a, b in zip(jax.tree.leaves(restored.state), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.0}, r"decay must be a number in \(0, 1\)"),
        ({"decay": 0}, r"decay must be a number in \(0, 1\)"),
        ({"decay": "0.9"}, r"decay must be a number in \(0, 1\)"),
        ({"decay": 0.9, "update_every": 0}, "update_every must be a positive integer"),
        ({"decay": 0.9, "update_every": 1.5}, "update_every must be a positive integer"),
    ],
)
def test_bad_options_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)
