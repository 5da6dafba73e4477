"""EarlyStopping: the stop decision on scripted metrics and in a real fit, state, options."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_task import TinyModel, TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.early_stopping import EarlyStopping


def fake_trainer(**metrics) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=0, current_epoch=0, should_stop=False, stop_reason=None,
        callback_metrics=dict(metrics), is_main_process=True, has_val_data=True,
    )


def drive(es: EarlyStopping, values, trainer=None, monitor="val/loss") -> list[bool]:
    """Feed one value per validation (one epoch each); return should_stop after each."""
    trainer = trainer or fake_trainer()
    es.on_fit_start(trainer=trainer)
    stops = []
    for value in values:
        trainer.current_epoch += 1
        trainer.global_step += 10
        es.on_validation_end(trainer=trainer, stage="validate", metrics={monitor: value})
        stops.append(trainer.should_stop)
    return stops


def test_stops_when_patience_runs_out_on_a_scripted_sequence():
    es = EarlyStopping(monitor="val/loss", patience=3, verbose=False)
    trainer = fake_trainer()
    # best 1.0, 0.5; then 0.75, 0.625, 0.5 (equal is not better): 3 without improvement.
    stops = drive(es, [1.0, 0.5, 0.75, 0.625, 0.5], trainer)
    assert stops == [False, False, False, False, True]
    assert trainer.stop_reason == "early_stopping"
    assert es.best == 0.5 and es.stopped_epoch == 5 and es.stopped_step == 50


def test_an_improvement_resets_the_wait_count():
    es = EarlyStopping(monitor="val/loss", patience=2, verbose=False)
    assert drive(es, [1.0, 2.0, 0.9, 2.0, 2.0]) == [False, False, False, False, True]


def test_mode_max_and_min_delta():
    es = EarlyStopping(monitor="val/accuracy", mode="max", patience=2, min_delta=0.05,
                       verbose=False)
    # 0.5 best; 0.54 is within min_delta (wait 1); 0.6 improves; 0.62, 0.64 do not by > 0.05.
    stops = drive(es, [0.5, 0.54, 0.6, 0.62, 0.64], monitor="val/accuracy")
    assert stops == [False, False, False, False, True]
    assert es.best == 0.6


def test_patience_zero_stops_at_the_first_validation_without_improvement():
    es = EarlyStopping(monitor="val/loss", patience=0, verbose=False)
    assert drive(es, [1.0, 0.9, 0.95]) == [False, False, True]


def test_non_finite_metric_stops_at_once_unless_check_finite_is_off():
    assert drive(EarlyStopping(monitor="val/loss", verbose=False), [1.0, math.nan]) == [
        False, True
    ]
    lenient = EarlyStopping(monitor="val/loss", patience=2, check_finite=False, verbose=False)
    assert drive(lenient, [1.0, math.nan, math.inf]) == [False, False, True]
    assert lenient.best == 1.0  # a non-finite value never becomes the best


def test_unknown_monitor_lists_the_available_names():
    es = EarlyStopping(monitor="val/los")
    trainer = fake_trainer(**{"train/loss": 1.0, "epoch": 0})
    es.on_fit_start(trainer=trainer)
    with pytest.raises(ValueError, match=r"no metric of that name.*available: "
                       r"epoch, train/loss, val/accuracy, val/loss"):
        es.on_validation_end(trainer=trainer, stage="validate",
                             metrics={"val/loss": 1.0, "val/accuracy": 0.5})


def test_monitors_callback_metrics_too_and_ignores_test_and_standalone_runs():
    es = EarlyStopping(monitor="train/loss", patience=0, verbose=False)
    trainer = fake_trainer(**{"train/loss": 1.0})
    es.on_validation_end(trainer=trainer, stage="validate", metrics={})  # not fitting
    assert es.best is None
    es.on_fit_start(trainer=trainer)
    es.on_validation_end(trainer=trainer, stage="test", metrics={})  # test stage
    assert es.best is None
    es.on_validation_end(trainer=trainer, stage="validate", metrics={})
    assert es.best == 1.0
    es.on_run_end(trainer=trainer, stage="fit", outcome="completed")
    es.on_validation_end(trainer=trainer, stage="validate", metrics={})  # after fit
    assert es.wait == 0 and not trainer.should_stop


def test_state_round_trip_continues_the_count():
    values = [1.0, 0.5, 0.75, 0.625, 0.5]
    first = EarlyStopping(monitor="val/loss", patience=3, verbose=False)
    assert drive(first, values[:3]) == [False, False, False]
    saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    assert saved == {"early_stopping": {
        "monitor": "val/loss", "mode": "min", "best": 0.5, "wait": 1,
        "stopped_epoch": None, "stopped_step": None,
    }}

    resumed = EarlyStopping(monitor="val/loss", patience=3, verbose=False)
    resumed.load_state_dict(state=saved)
    assert drive(resumed, values[3:]) == [False, True]  # same step as an unbroken run

    other = EarlyStopping(monitor="val/accuracy", mode="max", verbose=False)
    other.load_state_dict(state=saved)  # a different monitor: start afresh
    other.on_fit_start(trainer=fake_trainer())
    assert other.best is None and other.wait == 0


@pytest.mark.parametrize("outcome", ["completed", "stopped", "preempted", "exception"])
def test_the_fit_is_over_at_run_end_whatever_the_outcome(outcome):
    es = EarlyStopping(monitor="val/loss", patience=0, verbose=False)
    trainer = fake_trainer()
    drive(es, [1.0])
    es.on_run_end(trainer=trainer, stage="fit", outcome=outcome)
    es.on_validation_end(trainer=trainer, stage="validate", metrics={"val/loss": 2.0})
    assert es.wait == 0 and not trainer.should_stop  # a later validate does not count


def test_opt_in_registered_only_when_configured(tmp_path, monkeypatch):
    from nnx_trainer.plugin_manager import PluginError

    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert EarlyStopping.from_environment() is None
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert trainer.plugin_manager.get_plugin("early_stopping") is None
    assert trainer.plugin_manager.inactive["early_stopping"] == EarlyStopping.activation
    assert "EarlyStopping(monitor=" in EarlyStopping.activation
    mine = EarlyStopping(monitor="val/accuracy", mode="max")
    configured = nnx_trainer.Trainer(run_dir=tmp_path, plugins=[mine])
    assert configured.plugin_manager.get_plugin("early_stopping") is mine
    # Asked for by name, it cannot guess what to monitor: the error says what is missing.
    with pytest.raises(PluginError, match="monitor"):
        nnx_trainer.Trainer(run_dir=tmp_path, plugin_autoload=False, plugins=["early_stopping"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "EarlyStopping needs monitor=, a metric name"),
        ({"monitor": None}, "EarlyStopping needs monitor=, a metric name"),
        ({"mode": "minimize"}, "mode must be 'auto'"),
        ({"patience": -1}, "patience must be an integer >= 0"),
        ({"patience": 2.5}, "patience must be an integer >= 0"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": math.inf}, "min_delta must be a finite number >= 0"),
    ],
)
def test_bad_options_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**{"monitor": "val/loss", **kwargs})
    with pytest.raises(TypeError, match="monitor"):
        EarlyStopping()  # required: there is no inert default instance


# ----------------------------------------------------------------- real fit


class StepCount(nnx.Variable):
    """Non-trainable count of training steps, read by the scripted validation step."""


class CountingModel(TinyModel):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = StepCount(jnp.zeros((), jnp.int32))


class ScriptedValLoss(TinyTask):
    """val/loss after epoch e is ``script[e]`` (exact in float32), computed on device."""

    def __init__(self, script, **kwargs) -> None:
        super().__init__(n_train=32, **kwargs)  # 2 steps per epoch at batch size 16
        self.script = jnp.asarray(script, jnp.float32)

    def configure_model(self, rngs):
        return CountingModel(self.dim, 3, rngs=rngs)

    def training_step(self, model, batch):
        model.steps[...] += 1
        return super().training_step(model, batch)

    def validation_step(self, model, batch):
        outputs = super().validation_step(model, batch)
        epoch = model.steps[...] // 2 - 1
        outputs["loss"] = jnp.full_like(outputs["loss"], self.script[epoch])
        return outputs


def test_stops_a_real_fit_at_the_right_epoch(tmp_path):
    seen = []

    class Watch:
        @nnx_trainer.hookimpl
        def on_validation_end(self, metrics):
            seen.append(float(metrics["val/loss"]))

    es = EarlyStopping(monitor="val/loss", patience=3)
    trainer = make_trainer(tmp_path, es, Watch(), max_epochs=10)
    trainer.fit(ScriptedValLoss([1.0, 0.5, 0.75, 0.625, 0.5, 0.25, 0.125, 0.0, 0.0, 0.0]))
    assert seen == [1.0, 0.5, 0.75, 0.625, 0.5]
    assert trainer.current_epoch == 5 and trainer.global_step == 10
    assert trainer.should_stop and trainer.stop_reason == "early_stopping"
    assert es.stopped_epoch == 5 and es.best == 0.5
    assert es.state_dict()["early_stopping"]["wait"] == 3


def test_auto_mode_reads_the_direction_from_the_metrics_name():
    # Was mode="min" by default: monitor="val/accuracy" without mode="max" stopped the fit
    # while the accuracy rose, and kept the least accurate checkpoints as the best.
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    higher = ["val/accuracy", "val/acc", "val/top5", "val/digits/accuracy", "val/f1",
              "val/mean_iou", "test/top_5_accuracy"]
    lower = ["val/loss", "val/mse", "val/mape", "val/error_rate", "val/digits/loss"]
    for name in higher + lower:
        expected = "max" if name in higher else "min"
        assert EarlyStopping(monitor=name).mode == expected, name
        assert OrbaxCheckpoint(monitor=name).mode == expected, name
    assert EarlyStopping(monitor="val/accuracy", mode="min").mode == "min"  # as given
    assert OrbaxCheckpoint(monitor="val/loss", mode="max").mode == "max"


def test_a_validation_monitor_without_validation_data_is_refused_at_fit_start(tmp_path):
    # Was: the fit ran to the end watching nothing; ckpt_path="best" failed only afterwards.
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    for plugin, owner in ((EarlyStopping(monitor="val/loss"), "EarlyStopping"),
                          (OrbaxCheckpoint(monitor="val/accuracy"), "OrbaxCheckpoint")):
        trainer = make_trainer(tmp_path / owner, plugin, max_epochs=1)
        with pytest.raises(ValueError, match=rf"{owner}\(monitor='val/.*'\) watches a "
                                             r"validation metric, but TinyTask.val_data\(\) "
                                             "returns None"):
            trainer.fit(TinyTask(n_val=0))
        assert trainer.global_step == 0
    # A train/ metric needs no validation.
    make_trainer(tmp_path / "train", EarlyStopping(monitor="train/loss"), max_epochs=1).fit(
        TinyTask(n_val=0))
