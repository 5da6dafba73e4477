"""A non-finite training state stops the run like a non-finite loss: step range, non-zero
exit, the refused save in the fit summary; never an exit 0 with nothing saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.nonfinite_guard import (
    NonFiniteError,
    NonFiniteGuard,
    NonFiniteLossError,
    NonFiniteStateError,
)
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLI = Path(sys.executable).with_name("nnx-trainer")


class InfStatsTask(TinyTask):
    """TinyTask whose step writes Inf into a statistic from zero-based step ``bad`` on
    (as batch-norm statistics overflow at a huge learning rate): the loss, which never
    reads it, stays finite; only the state shows it."""

    def __init__(self, bad: int = 6, n_train: int = 64, n_val: int = 0) -> None:
        super().__init__(n_train=n_train, n_val=n_val)
        self.bad = bad

    def configure_model(self, rngs):
        model = super().configure_model(rngs)
        model.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))
        model.stat = nnx.BatchStat(jnp.zeros((4,), jnp.float32))
        return model

    def training_step(self, model, batch):
        loss, aux = super().training_step(model, batch)
        step = model.calls[...]
        model.calls[...] = step + 1
        model.stat[...] = jnp.where(step >= self.bad, jnp.inf, 0.0) * jnp.ones(4)
        return loss, aux


class Saves:
    """Records the saves the loop asks for (registered after the guard)."""

    name = "saves"

    def __init__(self) -> None:
        self.asked: list[int] = []

    @nnx_trainer.hookimpl
    def on_save_checkpoint(self, step):
        self.asked.append(step)


# ------------------------------------------------------------------ in process


def test_the_trainer_names_the_first_nonfinite_state_array(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(InfStatsTask(bad=10))
    assert trainer.first_nonfinite_state() is None
    trainer.fit(InfStatsTask(bad=2))  # no guard: the run goes on, the check still answers
    assert trainer.first_nonfinite_state() == "model/stat"
    assert trainer.first_nonfinite_loss() is None  # the loss never showed it


def test_the_guard_stops_at_its_cadence_with_the_step_range(tmp_path):
    saves = Saves()
    trainer = make_trainer(tmp_path, NonFiniteGuard(check_every_n_steps=3), saves,
                       max_epochs=5, batch_size=8)  # 8 steps per epoch
    with pytest.raises(NonFiniteStateError) as info:
        trainer.fit(InfStatsTask(bad=4))  # the state after 5 steps has Inf
    error = info.value
    assert "the training state became non-finite between step 3 (last found finite) and " \
           "step 6: NaN or Inf in the training state (first in model/stat), while the loss " \
           "stayed finite; nothing was saved in this fit" in str(error)
    assert (error.last_finite, error.step, error.array, error.refused_save) == (
        3, 6, "model/stat", None)
    assert isinstance(error, NonFiniteError) and isinstance(error, FloatingPointError)
    assert trainer.global_step == 6 and trainer.stop_reason == "non_finite_state"
    assert saves.asked == []


def test_the_guard_refuses_the_save_and_names_the_latest_checkpoint(tmp_path):
    saves, ckpt = Saves(), OrbaxCheckpoint(every_n_steps=2, keep_last=5, async_save=False)
    trainer = make_trainer(tmp_path, NonFiniteGuard(check_every_n_steps=50), saves, ckpt,
                       max_epochs=3)
    with pytest.raises(NonFiniteStateError, match=r"between step 4 \(last found finite\) and "
                       r"step 6: .*the checkpoint of step 6 was refused; the latest "
                       r"checkpoint saved is step 4") as info:
        trainer.fit(InfStatsTask(bad=4))
    assert info.value.refused_save == 6
    assert ckpt.saved_steps == [2, 4] and saves.asked == [2, 4]  # the guard ran first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_a_state_that_starts_nonfinite_is_refused_before_the_first_step(tmp_path):
    class InfInit(InfStatsTask):
        def configure_model(self, rngs):
            model = super().configure_model(rngs)
            model.stat[...] = jnp.full((4,), jnp.nan)
            return model

    saves = Saves()
    trainer = make_trainer(tmp_path, NonFiniteGuard(), saves, max_epochs=1)
    with pytest.raises(NonFiniteStateError, match=r"the training state is not finite at the "
                       r"start of the fit \(step 0\): NaN or Inf in model/stat; check the "
                       r"model's initialisation"):
        trainer.fit(InfInit(bad=100))
    assert trainer.global_step == 0 and saves.asked == []


def test_a_nonfinite_loss_is_still_reported_as_the_loss(tmp_path):
    class NaNLoss(InfStatsTask):
        def training_step(self, model, batch):
            loss, aux = super().training_step(model, batch)
            return loss * jnp.where(model.calls[...] > self.bad, jnp.nan, 1.0), aux

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4"):
        make_trainer(tmp_path, NonFiniteGuard(check_every_n_steps=5), max_epochs=3).fit(
            NaNLoss(bad=4))


# --------------------------------------------------------------- subprocesses


def _env(autoload: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
           "WANDB_MODE": "disabled", "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD": "1"}
    if autoload:  # the default plugins, the non-finite guard among them
        del env["NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD"]
    return env


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "checkpoint_plugin_alone"])
def test_the_command_exits_non_zero_naming_the_steps_and_the_refused_save(tmp_path, guard):
    """``nnx-trainer fit``: saves every 3 steps; the state has Inf from the 7th step on,
    so the save of step 9 is refused (by the guard, or by the checkpoint plugin itself
    when the guard is off) and the run fails; step 6 stays the latest checkpoint."""
    run_dir = tmp_path / "run"
    plugins = ["--plugins.checkpoint", '{"every_n_steps": 3, "keep_last": 5}',
               "--plugins.progress", "{}"]
    if guard:
        plugins += ["--plugins.nonfinite_guard", "{}"]
    proc = subprocess.run(
        [str(CLI), "fit", "--task", "test_nonfinite_state:InfStatsTask", "--task.bad", "6",
         "--trainer.batch_size", "4", "--trainer.max_epochs", "1",  # 16 steps
         "--trainer.log_every_n_steps", "5", "--trainer.run_dir", str(run_dir), *plugins],
        capture_output=True, text=True, timeout=600, env=_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # The last check that found it finite: the guard's at the save of step 6; without
    # the guard, the checkpoint plugin's at that save too.
    assert ("the training state became non-finite between step 6 (last found finite) and "
            "step 9") in proc.stderr
    assert "the checkpoint of step 9 was refused; the latest checkpoint saved is step 6" in (
        proc.stderr)
    assert "Traceback" not in proc.stderr
    summary = proc.stdout[proc.stdout.index("fit summary"):]
    assert re.search(r"\n  saves refused\s+1 \(step 9: NaN/Inf in the training state\)",
                     summary)
    assert re.search(r"\n  stop reason\s+non_finite_state", summary)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]


def test_the_example_at_a_huge_learning_rate_fails_instead_of_saving_nothing(tmp_path):
    """The issue's command: the loss stays finite, the weights do not."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_resnet.py"), "--epochs", "1",
         "--lr", "1000", "--ckpt-every-steps", "10", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=600, env=_env(autoload=True),
        stdin=subprocess.DEVNULL)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    found = re.search(r"the training state became non-finite between step (\d+) \(last found "
                      r"finite\) and step (\d+)", proc.stderr)
    assert found, proc.stderr
    refused = int(found.group(2))
    assert refused % 10 == 0 and int(found.group(1)) < refused
    assert f"the checkpoint of step {refused} was refused" in proc.stderr
    assert re.search(rf"\n  saves refused\s+1 \(step {refused}: ", proc.stdout)
    assert "held-out top-1 accuracy" not in proc.stdout  # no "successful" ending
