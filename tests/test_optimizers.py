"""Several named optimizers, frozen parameters and custom train updates (manual optimisation)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from hook_recorder import HookRecorder
from tiny_task import CrashAfter, TinyModel, TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.task import OptimizerSpec
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

BODY = nnx.PathContains("fc1")
HEAD = nnx.Any(nnx.PathContains("bn"), nnx.PathContains("fc2"))


class TwoOptimizerTask(TinyTask):
    """fc1 by SGD with momentum, the rest by Adam: two named optimizers."""

    def configure_optimizer(self, total_steps):
        return {
            "body": OptimizerSpec(optax.sgd(0.1, momentum=0.9), wrt=BODY),
            "head": OptimizerSpec(optax.adam(1e-2), wrt=HEAD),
        }


class MultiTransformTask(TinyTask):
    """The same update as one optax.multi_transform over every parameter."""

    def configure_optimizer(self, total_steps):
        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "body" if "fc1" in jax.tree_util.keystr(path) else "head", params
            )

        return optax.multi_transform(
            {"body": optax.sgd(0.1, momentum=0.9), "head": optax.adam(1e-2)}, labels
        )


def params(trainer) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.filter_state(trainer.state.model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def optimizer_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_named_optimizers_equal_one_multi_transform_and_each_holds_its_own_state(tmp_path):
    two, one = HookRecorder("on_train_batch_end"), HookRecorder("on_train_batch_end")
    two_trainer = make_trainer(tmp_path / "two", two, max_steps=8)
    two_trainer.fit(TwoOptimizerTask())
    one_trainer = make_trainer(tmp_path / "one", one, max_steps=8)
    one_trainer.fit(MultiTransformTask())

    assert list(two.losses()) == list(range(8))
    np.testing.assert_allclose(list(two.losses().values()), list(one.losses().values()),
                               rtol=1e-6)
    for name, value in params(one_trainer).items():
        np.testing.assert_allclose(params(two_trainer)[name], value, rtol=1e-5, atol=1e-6)
    assert sorted(two_trainer.optimizers) == ["body", "head"]
    state = two_trainer.state.optimizer
    assert sorted(state) == ["body", "head"]
    body, head = optimizer_paths(state["body"]), optimizer_paths(state["head"])
    assert any("fc1" in p for p in body) and not any("fc2" in p or "bn" in p for p in body)
    assert any("fc2" in p for p in head) and not any("fc1" in p for p in head)
    assert int(two_trainer.optimizers["head"].step[...]) == 8
    with pytest.raises(AttributeError, match=r"several optimizers \(body, head\).*optimizers\["):
        _ = two_trainer.optimizer


def test_several_optimizers_resume_exactly_after_a_crash(tmp_path):
    full = HookRecorder("on_train_batch_end")
    full_trainer = make_trainer(tmp_path / "full", full, max_steps=10)
    full_trainer.fit(TwoOptimizerTask())
    every_3 = {"every_n_steps": 3, "min_seconds_between_saves": 0}
    with pytest.raises(RuntimeError, match="simulated crash after step 7"):
        make_trainer(tmp_path / "run", CrashAfter(7), OrbaxCheckpoint(**every_3),
                     max_steps=10).fit(TwoOptimizerTask())
    resumed = HookRecorder("on_train_batch_end")
    trainer = make_trainer(tmp_path / "run", resumed, OrbaxCheckpoint(**every_3), max_steps=10)
    trainer.fit(TwoOptimizerTask(), ckpt_path="last")
    assert resumed.losses() == {s: full.losses()[s] for s in range(6, 10)}
    for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(full_trainer.state),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class FrozenBodyTask(TinyTask):
    def frozen_parameters(self):
        return BODY


def test_frozen_parameters_get_no_update_and_no_optimizer_state(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=6)
    with jax.threefry_partitionable(False):  # as the Trainer initialises, same seed
        initial = TinyModel(8, 3, rngs=nnx.Rngs(0))
    before = {".".join(map(str, path)): np.asarray(v.get_value())
              for path, v in nnx.to_flat_state(nnx.state(initial, nnx.Param))}
    trainer.fit(FrozenBodyTask())
    after = params(trainer)
    for name in before:
        if name.startswith("fc1"):
            np.testing.assert_array_equal(after[name], before[name])
        else:
            assert not np.array_equal(after[name], before[name]), name
    paths = optimizer_paths(trainer.state.optimizer)
    assert paths and not any("fc1" in p for p in paths)
    assert any("fc2" in p for p in paths)


class OverlapTask(TinyTask):
    def configure_optimizer(self, total_steps):
        return {"all": OptimizerSpec(optax.sgd(0.1)),
                "head": OptimizerSpec(optax.adam(1e-3), wrt=nnx.PathContains("fc2"))}


class EmptyTask(TinyTask):
    def configure_optimizer(self, total_steps):
        return {"head": OptimizerSpec(optax.sgd(0.1), wrt=nnx.PathContains("decoder"))}


class BadReturnTask(TinyTask):
    def configure_optimizer(self, total_steps):
        return [optax.sgd(0.1)]


class FrozenEverythingTask(TinyTask):
    def frozen_parameters(self):
        return nnx.Param


@pytest.mark.parametrize(
    ("task", "error", "message"),
    [
        (OverlapTask(), ValueError, r"parameter fc2\.(bias|kernel) is selected by optimizers "
                                    r"'all' and 'head'.*give each parameter to one optimizer"),
        (EmptyTask(), ValueError, r"optimizer 'head' of EmptyTask.configure_optimizer selects "
                                  r"no trainable parameter.*parameters are e\.g\. bn\."),
        (FrozenEverythingTask(), ValueError, r"optimizer 'default' .* selects no trainable"),
        (BadReturnTask(), TypeError, r"must return an optax.GradientTransformation or a "
                                     r"non-empty \{name: OptimizerSpec"),
    ],
)
def test_bad_optimizer_configurations_fail_before_training(tmp_path, task, error, message):
    record = HookRecorder("on_train_batch_end")
    with pytest.raises(error, match=message):
        make_trainer(tmp_path / "run", record, max_steps=2).fit(task)
    assert record.losses() == {}


class ManualTask(TwoOptimizerTask):
    """Manual optimisation: the body steps on the loss, then the head on a fresh forward."""

    def configure_train_metrics(self):
        return nnx.MultiMetric(loss=nnx.metrics.Average("loss"),
                               head_loss=nnx.metrics.Average("head_loss"))

    def training_update(self, model, optimizers, batch):
        def loss_fn(model):
            return self.training_step(model, batch)[0]

        body = optimizers["body"]
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, body.wrt))(model)
        body.update(model, grads)
        head = optimizers["head"]
        head_loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, head.wrt))(model)
        head.update(model, grads)
        return loss, {"head_loss": head_loss}


def test_a_custom_update_steps_each_optimizer_logs_its_outputs_and_resumes(tmp_path):
    full = HookRecorder("on_train_batch_end", "log_metrics")
    full_trainer = make_trainer(tmp_path / "full", full, max_steps=8, log_every_n_steps=1)
    full_trainer.fit(ManualTask())
    default = HookRecorder("on_train_batch_end")
    make_trainer(tmp_path / "default", default, max_steps=8).fit(TwoOptimizerTask())
    # The first step's loss is the same forward; the updates then differ (sequential).
    assert full.losses()[0] == pytest.approx(default.losses()[0], rel=1e-6)
    assert full.losses()[7] != pytest.approx(default.losses()[7], rel=1e-6)
    step1 = dict(full.logged(floats=True))[1]
    assert step1["train/head_loss"] < step1["train/loss"]  # the body's step already helped
    assert int(full_trainer.optimizers["body"].step[...]) == 8

    every_4 = {"every_n_steps": 4, "min_seconds_between_saves": 0}
    with pytest.raises(RuntimeError, match="simulated crash after step 5"):
        make_trainer(tmp_path / "run", CrashAfter(5), OrbaxCheckpoint(**every_4),
                     max_steps=8).fit(ManualTask())
    resumed = HookRecorder("on_train_batch_end")
    make_trainer(tmp_path / "run", resumed, OrbaxCheckpoint(**every_4), max_steps=8).fit(
        ManualTask(), ckpt_path="last"
    )
    assert resumed.losses() == {s: full.losses()[s] for s in range(4, 8)}


class WrongUpdateTask(TinyTask):
    def training_update(self, model, optimizers, batch):
        return self.training_step(model, batch)[0]


def test_a_custom_update_returning_the_wrong_thing_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"WrongUpdateTask.training_update must return "
                                        r"\(scalar loss, dict"):
        make_trainer(tmp_path / "run", max_steps=1).fit(WrongUpdateTask())


def test_the_default_update_is_the_documented_task_method():
    assert nnx_trainer.Task.training_update.__doc__
    assert "manual optimisation" in nnx_trainer.Task.training_update.__doc__
