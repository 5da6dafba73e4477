"""The Trainer's loop: learning, exact evaluation, parity with a hand loop, hook order, options."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hook_recorder import HookRecorder, RecordedCall
from tiny_task import TinyModel, TinyTask, make_examples, make_trainer

import nnx_trainer
from nnx_trainer.data import epoch_order

# The hooks whose calls show the loop's order, each call as the tuple the tests compare:
# the event and the arguments that identify it.
ORDER_HOOKS = {
    "on_fit_start": lambda c: ("fit_start", c.global_step),
    "on_fit_end": lambda c: ("fit_end",),
    "on_train_epoch_start": lambda c: ("epoch_start", c.epoch),
    "on_train_epoch_end": lambda c: ("epoch_end", c.epoch),
    "on_train_batch_start": lambda c: ("batch_start", c.step),
    "on_train_batch_end": lambda c: ("batch_end", c.step),
    "on_validation_start": lambda c: ("validation_start", c.stage),
    "on_validation_end": lambda c: ("validation_end", c.stage),
    "log_hyperparams": lambda c: ("log_hyperparams",),
    "on_save_checkpoint": lambda c: ("save_checkpoint", c.step, c.reason),
    "on_exception": lambda c: ("exception", type(c.exception).__name__),
    "on_run_end": lambda c: ("run_end", c.stage, str(c.outcome), type(c.exception).__name__),
}


def recorder() -> HookRecorder:
    """Records the order hooks and the logged metrics."""
    return HookRecorder(*ORDER_HOOKS, "log_metrics", name="recorder")


def _batch_ends(rec: HookRecorder) -> list[RecordedCall]:
    ends = rec.getcalls("on_train_batch_end")
    for call in ends:  # the hook's step is the batch's index: global_step already counts it
        assert call.global_step == call.step + 1
    return ends


def hook_calls(rec: HookRecorder) -> list[tuple]:
    """Every order hook's call, in call order, as ``(event, identifying arguments...)``."""
    _batch_ends(rec)
    return [ORDER_HOOKS[call.hook_name](call) for call in rec.getcalls(*ORDER_HOOKS)]


def step_losses(rec: HookRecorder) -> list[float]:
    """The loss of each train step, in order."""
    return [float(call.loss) for call in _batch_ends(rec)]


def logged_metrics(rec: HookRecorder) -> list[tuple[int, dict[str, float]]]:
    """The logged metrics as ``(step, {name: float})``."""
    _batch_ends(rec)
    return rec.logged(floats=True)


def test_training_lowers_the_loss(tmp_path):
    rec = recorder()
    make_trainer(tmp_path, rec, max_epochs=6, log_every_n_steps=4).fit(TinyTask())
    train_losses = [m["train/loss"] for _, m in logged_metrics(rec) if "train/loss" in m]
    assert len(step_losses(rec)) == 6 * 4
    assert train_losses[-1] < 0.6 * train_losses[0]
    val_acc = [m["val/accuracy"] for _, m in logged_metrics(rec) if "val/accuracy" in m]
    assert val_acc[-1] > 0.8


def test_validation_metrics_equal_a_hand_computation_with_a_partial_last_batch(tmp_path):
    task = TinyTask(n_val=21)  # 21 = 2 * 8 + 5: the last batch is padded with 3 masked rows
    trainer = make_trainer(tmp_path, max_epochs=1, eval_batch_size=8)
    trainer.fit(task)
    metrics = trainer.validate(task)

    model = trainer.model
    model.eval()
    examples = [task.val_data()[i] for i in range(21)]
    x = np.stack([e["image"] for e in examples])
    y = np.stack([e["label"] for e in examples])
    logits = np.asarray(model(x))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    assert metrics["val/loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert metrics["val/accuracy"] == pytest.approx((logits.argmax(-1) == y).mean())


def test_loss_trajectory_equals_a_hand_written_nnx_loop(tmp_path):
    epochs, batch, seed = 3, 16, 7
    rec = recorder()
    task = TinyTask(n_val=0)
    make_trainer(tmp_path, rec, max_epochs=epochs, batch_size=batch, seed=seed).fit(task)

    with jax.threefry_partitionable(False):  # as the Trainer initialises (documented)
        model = TinyModel(8, 3, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    examples = make_examples(64, seed=0)
    hand = []
    for epoch in range(epochs):
        order = epoch_order(seed, epoch, len(examples))
        for b in range(64 // batch):
            items = [examples[int(i)] for i in order[b * batch : (b + 1) * batch]]
            x = np.stack([e["image"] for e in items])
            y = np.stack([e["label"] for e in items])
            hand.append(float(step(model, optimizer, x, y)))
    np.testing.assert_allclose(step_losses(rec), hand, rtol=1e-5, atol=1e-6)


def test_hooks_fire_in_the_documented_order(tmp_path):
    rec = recorder()
    make_trainer(tmp_path, rec, max_epochs=2, batch_size=32).fit(TinyTask())
    assert hook_calls(rec) == [
        ("log_hyperparams",),
        ("fit_start", 0),
        ("epoch_start", 0),
        ("batch_start", 0), ("batch_end", 0), ("batch_start", 1), ("batch_end", 1),
        ("epoch_end", 0),
        ("validation_start", "validate"), ("validation_end", "validate"),
        ("epoch_start", 1),
        ("batch_start", 2), ("batch_end", 2), ("batch_start", 3), ("batch_end", 3),
        ("epoch_end", 1),
        ("validation_start", "validate"), ("validation_end", "validate"),
        ("save_checkpoint", 4, "end"),
        ("fit_end",),
        ("run_end", "fit", "completed", "NoneType"),
    ]


def test_exception_hook_sees_the_error_and_it_propagates(tmp_path):
    class Broken(TinyTask):
        def training_step(self, model, batch):
            raise RuntimeError("boom in the step")

    rec = recorder()
    with pytest.raises(RuntimeError, match="boom in the step"):
        make_trainer(tmp_path, rec).fit(Broken())
    assert hook_calls(rec)[-2:] == [
        ("exception", "RuntimeError"), ("run_end", "fit", "exception", "RuntimeError")
    ]


def test_steps_compile_once_including_the_padded_last_eval_batch(tmp_path):
    traces = {"train": 0, "val": 0}

    class Counting(TinyTask):
        def training_step(self, model, batch):
            traces["train"] += 1  # runs at trace time only
            return super().training_step(model, batch)

        def validation_step(self, model, batch):
            traces["val"] += 1
            return super().validation_step(model, batch)

    make_trainer(tmp_path, max_epochs=3, eval_batch_size=8, log_every_n_steps=1).fit(
        Counting(n_val=21)
    )
    assert traces == {"train": 1, "val": 1}


def test_max_steps_limit_batches_and_fast_dev_run(tmp_path):
    rec = recorder()
    trainer = make_trainer(tmp_path, rec, max_steps=5)  # max_epochs unlimited when max_steps set
    trainer.fit(TinyTask())
    assert trainer.global_step == 5 and trainer.current_epoch == 1 and trainer.batch_in_epoch == 1

    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=2)
    trainer.fit(TinyTask())
    assert trainer.global_step == 4

    rec = recorder()
    make_trainer(tmp_path, rec, max_epochs=5, fast_dev_run=True).fit(TinyTask())
    assert [c for c in hook_calls(rec) if c[0] == "batch_end"] == [("batch_end", 0)]


def test_gradient_accumulation_updates_every_k_batches(tmp_path):
    params_after = []

    class Watch:
        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer):
            params_after.append(np.asarray(trainer.model.fc1.kernel[...]).copy())

    trainer = make_trainer(tmp_path, Watch(), max_steps=4, accumulate_grad_batches=2)
    with jax.threefry_partitionable(False):
        initial = np.asarray(TinyModel(8, 3, rngs=nnx.Rngs(0)).fc1.kernel[...])
    trainer.fit(TinyTask(n_val=0))
    np.testing.assert_array_equal(params_after[0], initial)  # accumulating: no update yet
    assert not np.array_equal(params_after[1], initial)  # update after the 2nd batch
    np.testing.assert_array_equal(params_after[2], params_after[1])
    assert not np.array_equal(params_after[3], params_after[2])


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    class PlainSGD(TinyTask):
        def configure_optimizer(self, total_steps):
            return optax.sgd(1.0)

    trainer = make_trainer(tmp_path, max_steps=1, gradient_clip_norm=1e-3)
    trainer.fit(PlainSGD(n_val=0))
    with jax.threefry_partitionable(False):
        before = nnx.state(TinyModel(8, 3, rngs=nnx.Rngs(0)), nnx.Param)
    after = nnx.state(trainer.model, nnx.Param)
    delta = jax.tree.map(lambda a, b: a - b, after, before)
    assert float(optax.tree.norm(delta)) == pytest.approx(1e-3, rel=1e-3)


def test_predict_returns_one_row_per_example_without_padding(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, eval_batch_size=8)
    task = TinyTask(n_val=21)
    trainer.fit(task)
    out = trainer.predict(task)
    assert out.shape == (21, 3)


def test_bf16_precision_keeps_float32_params(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, precision="bf16")
    trainer.fit(TinyTask())
    assert trainer.model.fc1.dtype == np.dtype("bfloat16")
    for leaf in jax.tree.leaves(nnx.state(trainer.model, nnx.Param)):
        assert leaf.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp8"}, "unknown precision 'fp8'; choose one of"),
        ({"strategy": "tpu_pod"}, "unknown strategy 'tpu_pod'; choose one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"worker_count": -1}, "worker_count must be >= 0"),
    ],
)
def test_bad_trainer_options_fail_with_the_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **kwargs)


def test_batch_larger_than_the_dataset_fails_before_building(tmp_path):
    built = []

    class Watching(TinyTask):
        def configure_model(self, rngs):
            built.append(True)
            return super().configure_model(rngs)

    with pytest.raises(ValueError, match="batch size 128 is larger than the training set"):
        make_trainer(tmp_path, batch_size=128).fit(Watching())
    assert built == []


def test_train_data_must_be_a_grain_map_dataset(tmp_path):
    class ListData(TinyTask):
        def train_data(self):
            return [1, 2, 3]

    with pytest.raises(TypeError, match="must return a grain.MapDataset"):
        make_trainer(tmp_path).fit(ListData())


def _count_host_reads(monkeypatch, record: list) -> None:
    """Every float()/int()/tolist()/device_get of a jax array goes through ``_value``."""
    array_type = type(jax.numpy.zeros(()))
    original = array_type._value

    def counting_value(self):
        record.append(True)
        return original.fget(self)

    monkeypatch.setattr(array_type, "_value", property(counting_value))


def test_the_loop_reads_nothing_from_the_device_between_log_steps(tmp_path, monkeypatch):
    reads_per_step: list[int] = []
    reads: list = []

    class StepReads:
        @nnx_trainer.hookimpl
        def on_fit_start(self):
            # From the first step on, implicit host->device copies are refused too:
            # batches go up by explicit device_put, nothing else crosses.
            jax.config.update("jax_transfer_guard_host_to_device", "disallow")

        @nnx_trainer.hookimpl(trylast=True)
        def on_train_batch_end(self):
            reads_per_step.append(len(reads))

        @nnx_trainer.hookimpl
        def log_metrics(self, metrics):  # a logger: reads the values it is given
            for value in metrics.values():
                float(value)

    _count_host_reads(monkeypatch, reads)
    trainer = make_trainer(tmp_path, max_epochs=2, log_every_n_steps=3,
                           check_val_every_n_epoch=0)
    trainer.plugin_manager.register(StepReads())
    try:
        trainer.fit(TinyTask(n_val=0))
    finally:
        jax.config.update("jax_transfer_guard_host_to_device", "allow")
    monkeypatch.undo()
    assert len(reads_per_step) == 8
    # One read (train/loss) each time the train metrics are logged, after steps 3 and 6
    # (so counted with steps 4 and 7), and none anywhere else in the loop.
    deltas = np.diff([0, *reads_per_step])
    assert deltas.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]


# ---- evaluation after fit uses the trained state (issue 9, item 1) -----------------


def _val_loss_by_hand(trainer, task) -> float:
    model = trainer.model
    model.eval()
    examples = [task.val_data()[i] for i in range(len(task.val_data()))]
    x = np.stack([e["image"] for e in examples])
    y = np.stack([e["label"] for e in examples])
    return float(optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean())


def test_evaluating_a_new_instance_after_fit_uses_the_trained_weights(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=4)
    fitted = TinyTask()
    trainer.fit(fitted)
    trained = trainer.validate(fitted)
    assert trained["val/loss"] == pytest.approx(_val_loss_by_hand(trainer, fitted), rel=1e-5)
    fresh_instance = trainer.validate(TinyTask())
    assert fresh_instance == pytest.approx(trained)
    assert trainer.test(TinyTask()) == pytest.approx(
        {k.replace("val/", "test/"): v for k, v in trained.items()}
    )
    assert trainer.validate(fitted) == pytest.approx(trained)  # not replaced either
    untrained = make_trainer(tmp_path / "u").validate(TinyTask(), untrained=True)
    assert untrained["val/loss"] > trained["val/loss"] + 0.1  # the check can fail
    predictions = trainer.predict(TinyTask())
    assert np.allclose(predictions, trainer.predict(fitted))


def test_a_structurally_different_model_fails_naming_the_mismatch(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(TinyTask())
    with pytest.raises(ValueError, match=r"does not have the structure.*\(8, 16\).*\(5, 16\)"):
        trainer.validate(TinyTask(dim=5))


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_an_unfitted_trainer_refuses_to_evaluate_random_weights(tmp_path, stage):
    trainer = make_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="untrained .*fit first.*ckpt_path.*untrained=True"):
        getattr(trainer, stage)(TinyTask())
    getattr(trainer, stage)(TinyTask(), untrained=True)  # on purpose: allowed


def test_run_end_reports_a_stopped_fit_and_each_evaluation(tmp_path):
    class StopAtTwo:
        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer, step):
            if step == 1:
                trainer.should_stop = True

    rec = recorder()
    trainer = make_trainer(tmp_path, rec, StopAtTwo(), max_epochs=3)
    task = TinyTask()
    trainer.fit(task)
    trainer.validate(task)
    ends = [c for c in hook_calls(rec) if c[0] == "run_end"]
    assert ends == [("run_end", "fit", "stopped", "NoneType"),
                    ("run_end", "validate", "completed", "NoneType")]


def test_trainer_state_has_named_parts(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(TinyTask())
    state = trainer.state
    assert isinstance(state, nnx_trainer.TrainState)
    assert "fc1" in state.model and "opt_state" in state.optimizer
    content = trainer.checkpoint_state()
    assert content.meta.global_step == 1 and content.meta.batch_in_epoch == 1
    assert set(content.arrays()) == {"model", "optimizer", "train_metrics"}



class _StateReader:
    """Reads trainer.state after some steps and assigns it back (as EMA-style plugins do)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer, step):
        if step % 2 == 0:
            state = trainer.state
            self.seen.append(float(np.asarray(state.model["fc2"]["bias"][...]).sum()))
            trainer.state = state  # the same structure: allowed between steps


def test_reading_and_assigning_the_state_between_steps_changes_no_step(tmp_path):
    # Between steps the loop holds the state as its flat leaves and rebuilds the
    # TrainState only when read; a read (and an assignment) must not alter the run.
    plain = make_trainer(tmp_path / "plain", max_steps=6)
    plain.fit(TinyTask())
    reader = _StateReader()
    read = make_trainer(tmp_path / "read", max_steps=6, plugins=[reader])
    read.fit(TinyTask())
    assert len(reader.seen) == 3
    for a, b in zip(jax.tree.leaves(plain.state), jax.tree.leaves(read.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _GrowingTask(TinyTask):
    """A custom update that adds a Variable to the model inside the step."""

    def training_update(self, model, optimizers, batch):
        loss, aux = super().training_update(model, optimizers, batch)
        model.extra = nnx.Param(jax.numpy.zeros(()))
        return loss, aux


def test_a_step_that_changes_the_state_structure_fails_naming_it(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="changed the training state's structure"):
        trainer.fit(_GrowingTask())

# ---- options a user mistypes (issue 9, item 7) --------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit_train_batches": 1.5}, r"a float is a fraction and must be in \(0, 1\]"),
        ({"limit_val_batches": 0}, "must be a positive count"),
        ({"val_check_interval": True}, "must be an int"),
        ({"eval_batch_size": -8}, "eval_batch_size must be positive"),
    ],
)
def test_bad_counts_and_fractions_fail_with_the_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **kwargs)


def test_fractions_are_shares_of_the_epoch_as_in_lightning(tmp_path):
    rec = recorder()
    # 64 examples / 16 = 4 batches: 0.5 -> 2 batches an epoch; validation every 0.5 epoch.
    trainer = make_trainer(tmp_path, rec, max_epochs=2, limit_train_batches=0.5,
                           val_check_interval=0.5, limit_val_batches=0.5, eval_batch_size=4)
    trainer.fit(TinyTask())
    assert trainer.steps_per_epoch == 2 and trainer.global_step == 4
    validations = [c for c in hook_calls(rec) if c == ("validation_start", "validate")]
    assert len(validations) == 4  # steps 1 and 3 mid-epoch, plus the two epoch ends
    assert trainer.callback_metrics["val/loss"] is not None


def test_an_eval_batch_not_divisible_by_the_devices_fails_before_training(tmp_path):
    class FourDevices(nnx_trainer.SingleDeviceStrategy):
        num_devices = 4

    built = []

    class Watching(TinyTask):
        def configure_model(self, rngs):
            built.append(True)
            return super().configure_model(rngs)

    trainer = make_trainer(tmp_path, strategy=FourDevices(), batch_size=16, eval_batch_size=10)
    with pytest.raises(ValueError, match="eval_batch_size 10 is not divisible by the 4 devices"
                                         ".*eval_batch_size=8"):
        trainer.fit(Watching())
    assert built == []


def test_the_engine_names_no_modality():
    class Tabular(nnx_trainer.Task):
        pass

    assert Tabular.example_name == "examples"
    with pytest.raises(NotImplementedError, match="predict_step"):
        Tabular().predict_step(None, {"x": np.zeros(2)})


def test_processes_of_one_run_agree_on_the_default_run_dir(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "scripts" / "default_run_dir.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), "--index", str(i),
             "--skew", str(7.0 * i)],  # seven seconds apart: different stamps if unagreed
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    dirs = [next(x for x in o.splitlines() if x.startswith("RUN_DIR")) for o in outs]
    assert dirs[0] == dirs[1], dirs


class TwoValSets(TinyTask):
    """Validation on two named sets: the usual one and a shifted copy of it."""

    def val_data(self):
        usual = make_examples(self.n_val, seed=1, dim=self.dim)
        other = make_examples(12, seed=5, dim=self.dim)
        return {"usual": usual, "other": other}


def test_several_validation_sets_log_each_under_its_name_and_any_can_be_monitored(tmp_path):
    from nnx_trainer_plugins.early_stopping import EarlyStopping
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    rec = recorder()
    checkpoint = OrbaxCheckpoint(monitor="val/other/loss", keep_best=1, keep_last=1)
    stopper = EarlyStopping(monitor="val/other/accuracy", mode="max", patience=50)
    trainer = make_trainer(tmp_path, max_epochs=3, plugins=[rec, checkpoint, stopper])
    task = TwoValSets()
    trainer.fit(task)
    logged = [m for _, m in logged_metrics(rec) if any(k.startswith("val/") for k in m)]
    assert len(logged) == 3  # one evaluation per epoch, both sets in it
    assert {k for k in logged[-1] if k.startswith("val/")} >= {
        "val/usual/accuracy", "val/usual/loss", "val/other/accuracy", "val/other/loss"}
    # Each set's numbers are that set's alone: the same as a one-set evaluation of it.
    both = trainer.validate(task)
    alone = trainer.validate(TinyTask())  # val_data() = the "usual" set
    assert float(both["val/usual/loss"]) == pytest.approx(float(alone["val/loss"]), rel=1e-6)
    assert float(both["val/other/loss"]) != pytest.approx(float(alone["val/loss"]), rel=1e-3)
    # The best checkpoint by val/other/loss restores; test_data() = both sets as well.
    best = trainer.test(task, ckpt_path="best")
    assert {"test/usual/accuracy", "test/other/accuracy"} <= set(best)
    assert stopper.monitor in trainer.callback_metrics  # early stopping read it each epoch


def test_a_bad_validation_set_name_or_type_fails_naming_it(tmp_path):
    class BadName(TinyTask):
        def val_data(self):
            return {"a/b": make_examples(8, seed=1, dim=self.dim)}

    class BadType(TinyTask):
        def val_data(self):
            return {"a": [1, 2, 3]}

    with pytest.raises(ValueError, match="'a/b' must be a non-empty string without '/'"):
        make_trainer(tmp_path / "1", max_epochs=1).fit(BadName())
    with pytest.raises(TypeError, match=r"val_data\(\)\['a'\] must be a grain.MapDataset"):
        make_trainer(tmp_path / "2", max_epochs=1).fit(BadType())


def test_a_loss_that_is_not_a_scalar_and_a_metric_without_its_input_are_named(tmp_path):
    class PerExampleLoss(TinyTask):
        def training_step(self, model, batch):
            loss, aux = super().training_step(model, batch)
            return loss * np.ones(4, np.float32), aux

    class NoTuple(TinyTask):
        def training_step(self, model, batch):
            return super().training_step(model, batch)[0]

    class MetricWithoutInput(TinyTask):
        def configure_metrics(self):
            return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                                   error=nnx.metrics.Average("error"))

    with pytest.raises(TypeError, match=r"PerExampleLoss.training_step returned a loss of shape "
                                        r"\(4,\); it must be a scalar"):
        make_trainer(tmp_path / "1", max_epochs=1).fit(PerExampleLoss())
    with pytest.raises(TypeError, match=r"NoTuple.training_step must return \(scalar loss, dict"):
        make_trainer(tmp_path / "2", max_epochs=1).fit(NoTuple())
    with pytest.raises(TypeError, match=(
            r"MetricWithoutInput.configure_metrics\(\) with validation_step's outputs: "
            r"Expected keyword argument 'error'; the step gave labels, logits, loss")):
        make_trainer(tmp_path / "3", max_epochs=1).fit(MetricWithoutInput())


def test_bf16_with_a_model_that_ignores_compute_dtype_warns_with_the_fix(tmp_path, caplog):
    class Float32Only(TinyTask):
        def configure_model(self, rngs):
            return TinyModel(self.dim, 3, rngs=rngs)  # no dtype=self.compute_dtype

    caplog.set_level(logging.WARNING, logger="nnx_trainer")
    make_trainer(tmp_path / "1", max_steps=1, precision="bf16").fit(TinyTask())
    assert "precision asks for" not in caplog.text  # TinyTask builds with compute_dtype
    make_trainer(tmp_path / "2", max_steps=1).fit(Float32Only())
    assert "precision asks for" not in caplog.text  # float32 asked, float32 built
    make_trainer(tmp_path / "3", max_steps=1, precision="bf16").fit(Float32Only())
    assert ("precision asks for bfloat16, but no layer of Float32Only's model computes in it"
            in caplog.text and "dtype=self.compute_dtype in configure_model" in caplog.text)


def test_a_streamed_training_set_needs_max_steps_and_says_when_it_runs_out(tmp_path):
    from tiny_task import StreamingTinyTask

    with pytest.raises(ValueError, match=r"returned a grain.IterDataset, which has no length.*"
                                         r"set Trainer\(max_steps=N\)"):
        make_trainer(tmp_path).fit(StreamingTinyTask())
    with pytest.raises(ValueError, match=r"worker_count=2 with a streamed training set"):
        make_trainer(tmp_path, max_steps=3, worker_count=2).fit(StreamingTinyTask())
    with pytest.raises(RuntimeError, match=r"the training stream ended after 24 steps, before "
                                           r"max_steps=30"):
        make_trainer(tmp_path, max_steps=30).fit(StreamingTinyTask())
    trainer = make_trainer(tmp_path, max_steps=6, val_check_interval=3)
    trainer.fit(StreamingTinyTask())
    assert trainer.global_step == 6 and "val/accuracy" in trainer.callback_metrics
    assert trainer.checkpoint_state().meta.data_state["parent"]["parent"] == {
        "shard": 4, "offset": 0}  # 6 batches of 16 = 96 examples = 4 shards of 24


# ---- the train step runs the model after model.train(), as Flax's examples train -----


class ModeProbe(nnx.Module):
    """Layers a Flax user builds in evaluation mode, or with the mode left unset."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs) -> None:
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)  # built for evaluation
        # dropout_rate > 0 and deterministic=None: a call with no mode set raises.
        self.attn = nnx.MultiHeadAttention(num_heads=1, in_features=dim, dropout_rate=0.5,
                                           decode=False, rngs=rngs)
        self.fc = nnx.Linear(dim, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.attn(x[:, None, :])[:, 0]), jnp.mean(self.drop(jnp.ones_like(x)) == 0)


class ModeProbeTask(TinyTask):
    def configure_model(self, rngs):
        return ModeProbe(self.dim, rngs=rngs)

    def training_step(self, model, batch):
        logits, dropped = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"dropped": dropped}

    def validation_step(self, model, batch):
        logits, dropped = model(batch["image"])
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
                "dropped": jnp.broadcast_to(dropped, batch["label"].shape)}

    def configure_train_metrics(self):
        return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                               dropped=nnx.metrics.Average("dropped"))

    def configure_metrics(self):
        return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                               dropped=nnx.metrics.Average("dropped"))


def test_layers_built_in_evaluation_mode_train_in_training_mode(tmp_path):
    # Was: nnx.MultiHeadAttention's dropout raised "No `deterministic` argument was
    # provided" in the first step, and a Dropout built with deterministic=True never dropped.
    trainer = make_trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    trainer.fit(ModeProbeTask())
    assert 0.3 < float(trainer.callback_metrics["train/dropped"]) < 0.7
    assert trainer.callback_metrics["val/dropped"] == 0.0  # evaluation: model.eval()
    assert trainer.validate(ModeProbeTask())["val/dropped"] == 0.0
