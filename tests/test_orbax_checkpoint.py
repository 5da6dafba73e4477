"""The Orbax checkpoint plugin in one process: options, cadence (Orbax's save-decision
policies), retention, restore paths, weights-only, non-finite state, plugin state, the
and the data iterator position.

Crash/kill/SIGTERM tests with real processes are in test_resume.py.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fake_clock import FakeClock
from flax import nnx
from hook_recorder import HookRecorder
from tiny_task import CrashAfter, DropoutTask, TinyTask, make_trainer

import nnx_trainer
from nnx_trainer import data as data_lib
from nnx_trainer_plugins import checkpoint_cadence
from nnx_trainer_plugins.checkpoint_cadence import AllSavePolicy
from nnx_trainer_plugins.nonfinite_guard import NonFiniteStateError
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint as _OrbaxCheckpoint

CKPT_LOG = "nnx_trainer.checkpoint"


def OrbaxCheckpoint(**options):  # noqa: N802 - stands in for the class in these tests
    """The plugin with the default cadence unthrottled: these tests count saves."""
    return _OrbaxCheckpoint(**{"min_seconds_between_saves": 0, **options})


def record() -> HookRecorder:
    """Per-step losses, logged metrics by step, and the hook calls that show epoch handling."""
    return HookRecorder("on_fit_start", "on_train_epoch_start", "on_train_batch_end",
                        "log_metrics", name="record")


def committed(path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def read_meta(step_dir) -> dict[str, Any]:
    with ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ) as manager:
        return manager.restore(
            int(step_dir.name), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]


def arrays(trainer) -> list[np.ndarray]:
    """The checkpointed state's arrays (typed PRNG keys as their key data)."""
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(trainer.checkpoint_state().arrays())]


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer or None"),
        ({"every_n_epochs": 1.5}, r"every_n_epochs must be a positive integer, 0 \(no epoch"),
        ({"keep_last": 0}, "keep_last must be a positive integer"),
        ({"mode": "median"}, "mode must be 'auto' .*, 'min' .* or 'max'"),
        ({"keep_best": 3}, r"keep_best=3 ranks checkpoints by a metric: also pass monitor="),
        ({"monitor": ""}, "monitor must be a metric name such as 'val/loss'"),
        ({"monitor": "val/loss", "keep_best": 0}, "keep_best must be a positive integer"),
    ],
)
def test_bad_options_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OrbaxCheckpoint(**kwargs)


@pytest.mark.parametrize("monitor", ["val/acc", "val_loss"])
def test_a_monitor_that_names_no_metric_stops_at_the_first_validation(tmp_path, monitor):
    trainer = make_trainer(tmp_path / "run", OrbaxCheckpoint(monitor=monitor, every_n_steps=2),
                           max_steps=8, val_check_interval=4)
    with pytest.raises(ValueError, match=(
            rf"checkpoint monitor '{monitor}': no metric of that name after validation; "
            r"available: .*val/accuracy, val/loss")):
        trainer.fit(TinyTask())
    assert trainer.global_step == 4
    assert committed(tmp_path / "run" / "checkpoints") == [2]  # kept; step 4 not written


def test_default_instance_is_the_entry_point_and_monitor_implies_keep_best_one():
    from nnx_trainer.plugin_manager import create_plugin_manager

    pm = create_plugin_manager(plugins=["checkpoint"], autoload=False)
    default = pm.get_plugin("checkpoint")
    assert isinstance(default, _OrbaxCheckpoint) and default.min_seconds_between_saves == 60
    assert OrbaxCheckpoint(monitor="val/loss").keep_best == 1
    assert OrbaxCheckpoint().keep_best is None


@dataclass
class Info:
    step: int
    metrics: Any
    time: datetime.datetime = datetime.datetime.now(datetime.UTC)


def preserved(plugin, infos) -> list[int]:
    policy = plugin._options(4).preservation_policy  # what Orbax applies after each commit
    return [i.step for i, k in zip(infos, policy.should_preserve(infos, context=None),
                                   strict=True) if k]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_retention_is_orbax_latest_n_plus_best_n(mode):
    sign = 1 if mode == "min" else -1
    vals = {4: 0.9, 8: 0.3, 12: float("nan"), 16: 0.5, 20: 0.3, 24: 0.8}
    infos = [Info(s, {"val/loss": sign * v}) for s, v in vals.items()]
    infos[3:3] = [Info(14, {}), Info(15, None)]  # mid-epoch saves: no metric
    infos.append(Info(26, {}))
    two = OrbaxCheckpoint(keep_last=2, keep_best=2, monitor="val/loss", mode=mode)
    # Best two: 8 and 20 tie at 0.3 (both kept), NaN never counts; latest two: 24, 26.
    assert preserved(two, infos) == [8, 20, 24, 26]
    one = OrbaxCheckpoint(keep_last=1, keep_best=1, monitor="val/loss", mode=mode)
    assert preserved(one, infos) == [20, 26]  # Orbax's BestN: a tie goes to the later step
    assert preserved(OrbaxCheckpoint(keep_last=3), infos[:2]) == [4, 8]
    assert preserved(OrbaxCheckpoint(keep_last=1), infos) == [26]


# --------------------------------------------------------- cadence, resume


def test_epoch_end_checkpoint_starts_the_next_epoch_and_older_resume_drops_later_steps(
    tmp_path, caplog
):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    full = record()
    make_trainer(tmp_path / "run", full, OrbaxCheckpoint(keep_last=5), max_epochs=3).fit(
        TinyTask())
    assert committed(ckpt_dir) == [4, 8, 12]  # every epoch, after its validation
    meta = read_meta(ckpt_dir / "4")
    assert (meta["global_step"], meta["epoch"], meta["batch_in_epoch"]) == (4, 1, 0)
    assert "data_state" not in meta  # the counters are the data position
    assert meta["checkpoint"]["weights_only"] is False

    resumed = record()
    caplog.set_level(logging.WARNING, logger=CKPT_LOG)
    trainer = make_trainer(tmp_path / "run", resumed, OrbaxCheckpoint(keep_last=5), max_epochs=3)
    trainer.fit(TinyTask(), ckpt_path=str(ckpt_dir / "4"))
    fit_start, epoch_start = resumed.getcalls("on_fit_start", "on_train_epoch_start")[:2]
    assert (fit_start.hook_name, fit_start.global_step) == ("on_fit_start", 4)
    assert (epoch_start.hook_name, epoch_start.epoch) == ("on_train_epoch_start", 1)  # not 0
    assert resumed.losses() == {s: full.losses()[s] for s in range(4, 12)}
    assert "deleting its later steps 8, 12" in caplog.text
    assert committed(ckpt_dir) == [4, 8, 12]  # 8 and 12 written again by this run
    assert read_meta(ckpt_dir / "12")["global_step"] == 12


class Noise(grain.transforms.RandomMap):
    """Random augmentation: its draws depend on the example's position, so they resume too."""

    def random_map(self, element, rng):
        noise = rng.normal(size=element["image"].shape).astype(np.float32)
        return {**element, "image": element["image"] + noise}


class NoisyTask(TinyTask):
    def train_transforms(self):
        return (Noise(),)


def test_crash_mid_epoch_resumes_losses_train_metrics_and_validation_exactly(tmp_path):
    opts = {"max_steps": 14, "log_every_n_steps": 3, "val_check_interval": 5}
    full = record()
    full_trainer = make_trainer(tmp_path / "full", full, **opts)
    full_trainer.fit(NoisyTask())

    with pytest.raises(RuntimeError, match="simulated crash after step 8"):
        make_trainer(tmp_path / "run", CrashAfter(8), OrbaxCheckpoint(every_n_steps=3),
                     **opts).fit(NoisyTask())
    assert committed(tmp_path / "run" / "checkpoints") == [6]  # 3 dropped (keep_last=1)

    resumed = record()
    trainer = make_trainer(tmp_path / "run", resumed, OrbaxCheckpoint(every_n_steps=3), **opts)
    trainer.fit(NoisyTask(), ckpt_path="last")
    assert resumed.losses() == {s: full.losses()[s] for s in range(6, 14)}
    # The train-metrics accumulator came back too: the logged window means match, and
    # the val_check_interval validation at step 10 sees the same weights.
    assert resumed.logged(floats=True) == [(s, m) for s, m in full.logged(floats=True) if s > 6]
    for a, b in zip(arrays(trainer), arrays(full_trainer), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_holding_an_rng_stream_summarises_and_resumes_its_draws_exactly(tmp_path):
    # nnx.Dropout(rngs=...) keeps a typed PRNG key (dtype key<fry>) in the model's state:
    # the model summary sized it with NumPy and failed, and a resume compared Orbax's
    # stored key data (uint32 words) with the key and refused "a different model".
    opts = {"max_steps": 10}
    full = record()
    full_trainer = make_trainer(tmp_path / "full", full, **opts)
    full_trainer.fit(DropoutTask())
    summary = full_trainer.hyperparameters()["model"]
    assert summary["parameters"] == 8 * 16 + 16 + 16 * 3 + 3
    assert summary["other_state_bytes"] == 8 + 4  # the stream's key (2 words) and count

    with pytest.raises(RuntimeError, match="simulated crash after step 7"):
        make_trainer(tmp_path / "run", CrashAfter(7), OrbaxCheckpoint(every_n_steps=3),
                     **opts).fit(DropoutTask())
    resumed = record()
    trainer = make_trainer(tmp_path / "run", resumed, OrbaxCheckpoint(every_n_steps=3), **opts)
    trainer.fit(DropoutTask(), ckpt_path="last")
    assert resumed.losses() == {s: full.losses()[s] for s in range(6, 10)}
    assert len(set(full.losses().values())) == 10  # the draws differ from step to step
    for a, b in zip(arrays(trainer), arrays(full_trainer), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- restore


def test_last_with_nothing_saved_starts_fresh_with_a_notice(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=CKPT_LOG)
    trainer = make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=2)
    trainer.fit(TinyTask(), ckpt_path="last")
    assert "ckpt_path='last': no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    assert trainer.global_step == 2
    assert committed(tmp_path / "run" / "checkpoints") == [2]


def test_restore_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"ckpt_path='best' needs a metric.*monitor="):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=1).fit(
            TinyTask(), ckpt_path="best")
    with pytest.raises(ValueError, match=r"'nope/120' is not 'last', 'best' or an existing"):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=1).fit(
            TinyTask(), ckpt_path="nope/120"
        )
    with pytest.raises(ValueError, match="no checkpoint plugin is active"):
        make_trainer(tmp_path / "run", max_steps=1).fit(TinyTask(), ckpt_path="last")

    make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=2).fit(TinyTask())  # saves step 2
    ckpt_dir = tmp_path / "run" / "checkpoints"
    partial = ckpt_dir / "7.orbax-checkpoint-tmp"
    partial.mkdir()
    with pytest.raises(ValueError, match="is an uncommitted checkpoint"):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=9).fit(
            TinyTask(), ckpt_path=str(partial)
        )
    with pytest.raises(ValueError, match="no checkpoint in .* has a 'val/loss' value"):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(monitor="val/loss"), max_steps=4).test(
            TinyTask(), ckpt_path="best"
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no committed checkpoint in"):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=4).validate(
            TinyTask(), ckpt_path=str(empty)
        )


def test_a_fresh_fit_moves_an_earlier_runs_checkpoints_aside(tmp_path, caplog):
    make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=6).fit(TinyTask())
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert committed(ckpt_dir) == [6]
    caplog.set_level(logging.WARNING, logger=CKPT_LOG)
    make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=2).fit(TinyTask())  # not resumed
    assert "holds checkpoints (steps 6) of an earlier run" in caplog.text
    assert committed(ckpt_dir) == [2]  # "last" is this run's, not the earlier step 6
    (aside,) = ckpt_dir.glob("_earlier-*")
    assert committed(aside) == [6] and read_meta(aside / "6")["global_step"] == 6


def test_restore_from_another_run_reads_it_and_leaves_it_as_it_was(tmp_path, caplog):
    make_trainer(tmp_path / "a", OrbaxCheckpoint(keep_last=3), max_epochs=2).fit(TinyTask())
    source = tmp_path / "a" / "checkpoints"
    partial = source / "11.orbax-checkpoint-tmp"
    partial.mkdir()
    before = sorted(p.name for p in source.iterdir())

    caplog.set_level(logging.WARNING, logger=CKPT_LOG)
    trainer = make_trainer(tmp_path / "b", OrbaxCheckpoint(), max_epochs=3)
    trainer.fit(TinyTask(), ckpt_path=str(source))  # a checkpoints directory: its latest
    assert str(partial) in caplog.text  # named, skipped, and not removed (not ours)
    assert sorted(p.name for p in source.iterdir()) == before
    assert committed(tmp_path / "b" / "checkpoints") == [12]

    probe = make_trainer(tmp_path / "c", OrbaxCheckpoint(), max_steps=1)
    metrics = probe.validate(TinyTask(), ckpt_path=str(source / "4"))
    assert probe.global_step == 4 and metrics["val/loss"] > 0


def test_test_with_best_evaluates_the_best_checkpoint(tmp_path):
    recorder = record()
    ckpt = OrbaxCheckpoint(monitor="val/loss", keep_best=1)
    trainer = make_trainer(tmp_path / "run", recorder, ckpt, max_epochs=4)

    class HardTask(TinyTask):  # noisy validation loss, so the best epoch is not the last
        def configure_optimizer(self, total_steps):
            import optax

            return optax.sgd(0.8, momentum=0.9)

    task = HardTask()
    trainer.fit(task)
    vals = {s: m["val/loss"] for s, m in recorder.logged(floats=True) if "val/loss" in m}
    best = min(vals, key=lambda s: (vals[s], s))
    assert committed(tmp_path / "run" / "checkpoints") == sorted({best, 16})
    metrics = trainer.test(task, ckpt_path="best")
    assert trainer.global_step == best
    assert metrics["test/loss"] == pytest.approx(vals[best], rel=1e-6)


def test_weights_only_loads_for_evaluation_and_refuses_to_resume(tmp_path):
    task = TinyTask()
    ckpt = OrbaxCheckpoint(weights_only=True, async_save=False)
    trainer = make_trainer(tmp_path / "run", ckpt, max_steps=6)
    trainer.fit(task)
    expected = trainer.test(task)
    step_dir = tmp_path / "run" / "checkpoints" / "6"
    with ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    ) as manager:
        saved = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert set(saved["state"]) == {"model"}  # no optimizer, no metrics

    fresh = make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=6)
    assert fresh.test(task, ckpt_path=str(step_dir)) == expected
    with pytest.raises(ValueError, match="weights_only=True.*fit cannot resume from it"):
        make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=8).fit(task, ckpt_path="last")


class NaNAfter(TinyTask):
    """The loss (so the gradients and then the parameters) turns NaN at global step ``bad``."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def configure_model(self, rngs):
        model = super().configure_model(rngs)
        model.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))  # not trained, but saved
        return model

    def training_step(self, model, batch):
        loss, aux = super().training_step(model, batch)
        step = model.calls[...]
        model.calls[...] = step + 1
        return jnp.where(step == self.bad, jnp.nan, 1.0) * loss, aux


def test_non_finite_state_is_never_committed_and_the_last_good_one_restores(tmp_path):
    ckpt = OrbaxCheckpoint(every_n_steps=1, keep_last=10)
    # Step index 4 is the fifth step: the state after 5 steps holds NaN. Without the
    # non-finite guard the refused save itself fails the run (no "successful" exit).
    with pytest.raises(NonFiniteStateError, match=r"between step 4 \(last found finite\) and "
                       r"step 5: .*the checkpoint of step 5 was refused; the latest "
                       r"checkpoint saved is step 4"):
        make_trainer(tmp_path / "run", ckpt, max_steps=7).fit(NaNAfter(bad=4))
    assert committed(tmp_path / "run" / "checkpoints") == [1, 2, 3, 4]
    assert ckpt.saved_steps == [1, 2, 3, 4]
    trainer = make_trainer(tmp_path / "run", OrbaxCheckpoint(), max_steps=7)
    trainer.validate(NaNAfter(bad=4), ckpt_path="last")
    assert trainer.global_step == 4
    assert all(np.isfinite(a).all() for a in arrays(trainer) if a.dtype.kind == "f")


class Stateful:
    """A plugin whose state_dict holds NumPy numbers (converted to JSON by the plugin)."""

    name = "stateful"

    def __init__(self, bad: bool = False) -> None:
        self.seen = 0
        self.bad = bad

    @nnx_trainer.hookimpl
    def on_train_batch_end(self):
        self.seen += 1

    @nnx_trainer.hookimpl
    def state_dict(self):
        return {"stateful": {"seen": np.int64(self.seen), "mean": np.float32(0.5),
                             "obj": object() if self.bad else None}}

    @nnx_trainer.hookimpl
    def load_state_dict(self, state):
        self.seen = state["stateful"]["seen"]


def test_plugin_state_rides_along_and_bad_state_fails_clearly(tmp_path):
    make_trainer(tmp_path / "run", Stateful(), OrbaxCheckpoint(), max_steps=3).fit(TinyTask())
    plugin = Stateful()
    make_trainer(tmp_path / "run", plugin, OrbaxCheckpoint(), max_steps=5).fit(
        TinyTask(), ckpt_path="last"
    )
    assert plugin.seen == 5
    with pytest.raises(TypeError, match="state_dict of plugin key 'stateful' cannot be written"):
        make_trainer(tmp_path / "bad", Stateful(bad=True), OrbaxCheckpoint(), max_steps=1).fit(
            TinyTask()
        )


# ------------------------------------------------------------ data position


@pytest.mark.parametrize("workers", [0, 2])
def test_data_state_of_a_consumed_batch_resumes_a_fresh_loader_exactly(workers):
    examples = grain.MapDataset.source([{"x": np.int32(i)} for i in range(48)])

    def pipeline(workers=workers):
        config = data_lib.PipelineConfig(4, worker_count=workers)
        return iter(data_lib.train_pipeline(examples, (), config, seed=5, epoch=1))

    expected = [b["x"].tolist() for b in pipeline(workers=0)]  # workers keep the order
    assert len(expected) == 12
    # Consume 5 batches through the prefetcher (it reads 2 ahead): the state recorded
    # with the 5th is the resume point, not the look-ahead position.
    with data_lib.DevicePrefetcher(
        pipeline(), lambda b: b, size=2, record_state=True
    ) as prefetcher:
        for _ in range(5):
            _, state = next(prefetcher)
            prefetcher.refill()
    fresh = pipeline()
    fresh.set_state(state)
    rest = [b["x"].tolist() for b in fresh]
    if hasattr(fresh, "close"):
        fresh.close()
    assert rest == expected[5:]


# ------------------------------------------------- save decisions (Orbax policies)


class Clocked:
    """Advances a fake clock by ``seconds_per_step`` after every step."""

    name = "clocked"

    def __init__(self, clock: FakeClock, seconds_per_step: float) -> None:
        self.clock, self.per_step = clock, seconds_per_step

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer):
        self.clock.seconds = trainer.global_step * self.per_step


def decisions(plugin, steps_per_epoch: int):
    return checkpoint_cadence.save_decision(plugin.every_n_steps, plugin.every_n_epochs,
                                            plugin.min_seconds_between_saves, steps_per_epoch)


def test_the_policies_are_orbaxs_and_only_the_default_cadence_is_throttled():
    policies = ocp.checkpoint_managers
    default = decisions(_OrbaxCheckpoint(), 4)
    assert isinstance(default, AllSavePolicy)
    fixed, throttle = default.policies  # the deterministic one first (asked on every process)
    assert isinstance(fixed, policies.FixedIntervalPolicy) and fixed.interval == 4
    assert isinstance(throttle, policies.ContinuousCheckpointingPolicy)
    assert throttle.minimum_interval_secs == 60
    explicit = decisions(_OrbaxCheckpoint(every_n_steps=10, every_n_epochs=2), 4)
    assert isinstance(explicit, policies.AnySavePolicy)
    assert [(type(p), p.interval) for p in explicit.policies] == [
        (policies.FixedIntervalPolicy, 10), (policies.FixedIntervalPolicy, 8)
    ]
    unthrottled = decisions(_OrbaxCheckpoint(min_seconds_between_saves=0), 4)
    assert isinstance(unthrottled, policies.FixedIntervalPolicy)


def test_explicit_every_n_steps_saves_every_10th_step_mid_epoch_despite_the_throttle(
    tmp_path, monkeypatch
):
    FakeClock(0.0).install(monkeypatch.setattr)  # frozen: every save within the same second
    plugin = _OrbaxCheckpoint(every_n_steps=10, keep_last=10)  # min_seconds 60 (default)
    trainer = make_trainer(tmp_path / "run", plugin, batch_size=4, max_epochs=3)  # 16 steps/epoch
    trainer.fit(TinyTask())
    assert trainer.steps_per_epoch == 16
    assert plugin.saved_steps == [10, 20, 30, 40, 48]  # 48: the end of fit
    assert committed(tmp_path / "run" / "checkpoints") == [10, 20, 30, 40, 48]


def test_default_cadence_is_throttled_by_the_clock_but_the_end_always_saves(
    tmp_path, monkeypatch
):
    clock = FakeClock(0.0).install(monkeypatch.setattr)
    plugin = _OrbaxCheckpoint(keep_last=10)  # the defaults: every epoch, >= 60 s apart
    make_trainer(tmp_path / "run", plugin, Clocked(clock, 10.0), max_epochs=5).fit(TinyTask())
    # Epoch ends at steps 4, 8, 12, 16 (t = 40, 80, 120, 160 s): 4 is the first save,
    # 8 is 40 s after it, 12 is 80 s after 4, 16 is 40 s after 12; 20 is the end.
    assert plugin.saved_steps == [4, 12, 20]

    frozen = _OrbaxCheckpoint(keep_last=10)
    clock.seconds = 0.0
    make_trainer(tmp_path / "frozen", frozen, max_epochs=3).fit(TinyTask())
    assert frozen.saved_steps == [4, 12]  # the first epoch, then only the end


def test_a_step_already_saved_is_not_saved_again_and_amending_a_metric_is_atomic(tmp_path):
    from nnx_trainer_plugins import checkpoint_layout

    plugin = OrbaxCheckpoint(monitor="val/loss", every_n_epochs=1)
    make_trainer(tmp_path / "run", plugin, max_epochs=1).fit(TinyTask())
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    assert plugin.saved_steps == [4]  # the epoch save; the end of fit found it saved
    assert not checkpoint_layout.amend_metrics(step_dir, "val/loss", 1.0)  # has its value
    metrics = step_dir / "metrics" / "metrics"
    metrics.write_text("{}")
    assert checkpoint_layout.amend_metrics(step_dir, "val/loss", 0.5)
    assert metrics.read_text() == '{"val/loss": 0.5}'
    assert not list(metrics.parent.glob("*.tmp"))


def test_bad_throttle_value_says_what_to_change():
    for bad in (-1, "60", True, float("nan")):
        with pytest.raises(ValueError, match="min_seconds_between_saves must be a number"):
            _OrbaxCheckpoint(min_seconds_between_saves=bad)



class ValLossSeries:
    """Replaces each validation's val/loss with the next of ``values`` (before any plugin
    reads it), so which validations rank among the best is known in advance."""

    name = "val_loss_series"

    def __init__(self, values) -> None:
        self.values = list(values)

    @nnx_trainer.hookimpl(tryfirst=True)
    def log_metrics(self, trainer, metrics):
        if "val/loss" in metrics:
            metrics["val/loss"] = self.values.pop(0)


def test_a_throttled_default_cadence_still_saves_every_validation_that_ranks_among_the_best(
    tmp_path, monkeypatch
):
    # Was: with epochs shorter than the 60 s throttle only the first epoch and the end were
    # saved, so ckpt_path="best" was whichever of them scored better, not the best validated.
    FakeClock(0.0).install(monkeypatch.setattr)  # frozen: every epoch within the throttle
    plugin = _OrbaxCheckpoint(monitor="val/loss", keep_best=2)  # min_seconds 60 (default)
    losses = [0.9, 0.5, 0.7, 0.6, 0.8, 0.4, 0.55]  # epochs 1-7: steps 4, 8, ..., 28
    trainer = make_trainer(tmp_path / "run", plugin, ValLossSeries(losses), max_epochs=7)
    trainer.fit(TinyTask())
    # Ranks among the best two: 0.9 and 0.5 (fewer than two yet), 0.7 (< 0.9), 0.6 (< 0.7),
    # 0.4; not 0.8 (> 0.6) nor 0.55 (> 0.5): it is the end of fit, saved for that.
    assert plugin.saved_steps == [4, 8, 12, 16, 24, 28]
    assert committed(tmp_path / "run" / "checkpoints") == [8, 24, 28]  # best two + last
    trainer.test(TinyTask(), ckpt_path="best")
    assert trainer.global_step == 24
    # Resumed after a crash in epoch 5, the values kept on disk rank the rest alike.
    FakeClock(0.0).install(monkeypatch.setattr)
    crashed = _OrbaxCheckpoint(monitor="val/loss", keep_best=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path / "again", crashed, ValLossSeries(losses), CrashAfter(18),
                     max_epochs=7).fit(TinyTask())
    assert committed(tmp_path / "again" / "checkpoints") == [8, 16]  # 0.5, 0.6 (also last)
    resumed = _OrbaxCheckpoint(monitor="val/loss", keep_best=2)
    make_trainer(tmp_path / "again", resumed, ValLossSeries(losses[4:]),
                 max_epochs=7).fit(TinyTask(), ckpt_path="last")
    assert resumed.saved_steps == [24, 28]
    assert committed(tmp_path / "again" / "checkpoints") == [8, 24, 28]
