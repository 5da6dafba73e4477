"""The fit's parts on their own: the cadence's answers, the progress and its checkpoint meta."""

import dataclasses
from pathlib import Path

import nnx_trainer
from nnx_trainer.fit_plan import Cadence, FitPlan
from nnx_trainer.progress import FitProgress
from nnx_trainer.state import CheckpointMeta


def cadence(**overrides) -> Cadence:
    options = dict(log_every_n_steps=5, val_every_n_epochs=2, val_every_n_steps=None,
                   max_epochs=4, max_steps=None)
    return Cadence(**{**options, **overrides})


def test_logs_every_n_steps():
    assert [step for step in range(1, 16) if cadence().logs(step)] == [5, 10, 15]


def test_epoch_end_validation_every_n_epochs_and_never_at_zero():
    assert [e for e in range(1, 7) if cadence().validates_epoch_end(e)] == [2, 4, 6]
    assert not any(cadence(val_every_n_epochs=0).validates_epoch_end(e) for e in range(1, 7))


def test_step_validation_yields_to_a_validating_epoch_end():
    every3 = cadence(val_every_n_steps=3)
    assert every3.validates_step(3, closes_epoch=None)
    assert not every3.validates_step(4, closes_epoch=None)
    # Step 6 closes epoch 2, which validates at its end: validated once, there.
    assert not every3.validates_step(6, closes_epoch=2)
    # Step 9 closes epoch 3, which does not: the step cadence validates it.
    assert every3.validates_step(9, closes_epoch=3)
    assert not cadence().validates_step(3, closes_epoch=None)


def test_stops_at_epochs_steps_plugin_request_or_preemption():
    c = cadence(max_steps=10)
    assert not c.stops(FitProgress(global_step=9, epoch=3))
    assert c.stops(FitProgress(global_step=10))
    assert c.stops(FitProgress(epoch=4))
    assert c.stops(FitProgress(should_stop=True))
    assert c.stops(FitProgress(preempted=True))


def test_saves_unless_preempted_or_fast_dev_run():
    assert cadence().may_save(FitProgress())
    assert not cadence().may_save(FitProgress(preempted=True))
    assert not cadence(saves=False).may_save(FitProgress())


def test_plan_counts_the_remaining_steps_from_a_resumed_position():
    plan = FitPlan(train_data=None, streaming=False, steps_per_epoch=10, total_steps=35,
                   cadence=cadence(max_steps=35))
    assert plan.remaining_steps(FitProgress()) == 35
    assert plan.remaining_steps(FitProgress(global_step=13, epoch=1, batch_in_epoch=3)) == 22
    assert plan.epochs_to_run() == 4


def test_progress_meta_round_trip():
    progress = FitProgress(global_step=17, epoch=2, batch_in_epoch=3,
                           validation_pending=True, data_state={"pos": 17})
    meta = progress.to_meta(seed=7, plugins={"early_stopping": {"wait": 1}})
    assert meta == CheckpointMeta(global_step=17, epoch=2, batch_in_epoch=3, seed=7,
                                  validation_pending=True,
                                  plugins={"early_stopping": {"wait": 1}},
                                  data_state={"pos": 17})
    # Through JSON, as a checkpoint stores it.
    restored = FitProgress.from_meta(CheckpointMeta.from_json(meta.to_json()), "ckpt/17")
    assert (restored.global_step, restored.epoch, restored.batch_in_epoch) == (17, 2, 3)
    assert restored.validation_pending and restored.data_state == {"pos": 17}
    assert restored.resumed_from == "ckpt/17"
    assert not restored.should_stop and restored.compile_seconds == {}


def test_progress_advances_and_closes_epochs():
    progress = FitProgress()
    for _ in range(3):
        progress.advance()
    progress.close_epoch()
    progress.advance()
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (4, 1, 1)
    progress.stop("early_stopping")
    assert progress.should_stop and not progress.preempted
    progress.stop("SIGTERM", preempted=True)
    assert progress.preempted and progress.stop_reason == "SIGTERM"


def test_trainer_run_state_attributes_read_and_set_the_progress(tmp_path):
    trainer = nnx_trainer.Trainer(plugin_autoload=False, run_dir=tmp_path)
    trainer.global_step, trainer.current_epoch, trainer.should_stop = 5, 1, True
    assert dataclasses.astuple(trainer.progress)[:2] == (5, 1)
    assert trainer.progress.should_stop
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.data_wait_seconds) == (0, 0, 0)


def test_parts_do_not_import_the_trainer():
    engine = Path(nnx_trainer.__file__).parent
    parts = ["progress", "fit_plan", "model_state", "steps", "fit_loop", "evaluation",
             "checkpoint_content", "preemption", "run_context", "run_call", "option_checks"]
    for name in parts:
        source = (engine / f"{name}.py").read_text()
        assert "nnx_trainer.trainer" not in source, name

