"""ResNetTask: loss, metrics, optimizer presets, early failures, and a real short training."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from hook_recorder import HookRecorder
from processes import script_env
from tiny_task import make_trainer

from resnet_task.data import DataError
from resnet_task.metrics import TopKAccuracy
from resnet_task.task import ResNetConfig, ResNetTask, classification_loss

TINY = dict(
    dataset="synthetic", image_size=8, model="simple",
    model_kwargs=(("num_blocks", 1), ("initial_features", 4)),
    dataset_kwargs=(("num_examples", 160), ("num_classes", 4)),
)


def test_label_smoothing_loss_matches_a_hand_computation():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    eps = 0.1
    targets = np.eye(3)[[0, 2]] * (1 - eps) + eps / 3
    logp = np.asarray(jax.nn.log_softmax(logits))
    expected = -(targets * logp).sum(-1)
    np.testing.assert_allclose(classification_loss(logits, labels, eps), expected, rtol=1e-6)
    plain = classification_loss(logits, labels)
    np.testing.assert_allclose(plain, -logp[[0, 1], [0, 2]], rtol=1e-6)


def test_loss_is_float32_for_bfloat16_logits():
    logits = jnp.ones((2, 5), jnp.bfloat16)
    assert classification_loss(logits, jnp.array([0, 1])).dtype == jnp.float32


def test_top5_accuracy_honours_the_mask():
    metric = TopKAccuracy(k=2)
    logits = jnp.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = jnp.array([1, 2, 2])
    metric.update(logits=logits, labels=labels, mask=jnp.array([True, True, False]))
    assert float(metric.compute()) == pytest.approx(0.5)  # hit, miss; third masked


def test_weight_decay_skips_batch_norm_and_biases():
    task = ResNetTask(**TINY, weight_decay=0.1, learning_rate=1.0, warmup_fraction=0.0,
                      momentum=0.0, nesterov=False)
    model = task.configure_model(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = task.configure_optimizer(total_steps=100)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    flat_updates = dict(nnx.to_flat_state(updates))
    flat_params = dict(nnx.to_flat_state(params))
    decayed = {path for path, u in flat_updates.items() if np.any(np.asarray(u[...]) != 0)}
    for path, p in flat_params.items():
        is_kernel = path[-1] == "kernel"
        assert (path in decayed) == is_kernel, path
        if is_kernel:  # lr 1.0 at step 0 of a cosine schedule with no warmup
            np.testing.assert_allclose(flat_updates[path][...], -0.1 * p[...], rtol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    task = ResNetTask(**TINY, learning_rate=0.4, warmup_fraction=0.1)
    task.configure_optimizer(total_steps=100)
    lr = task.learning_rate_schedule
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(0.4)
    assert float(lr(55)) == pytest.approx(0.2, rel=1e-3)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_adamw_preset_builds_and_masks():
    task = ResNetTask(**TINY, optimizer="adamw", learning_rate=1e-3)
    tx = task.configure_optimizer(total_steps=10)
    params = nnx.state(task.configure_model(nnx.Rngs(0)), nnx.Param)
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"model": "resnt18"}, ValueError, "unknown model 'resnt18'; choose one of"),
        ({"dataset": "imagenet"}, DataError, "unknown dataset 'imagenet'"),
        ({"dataset": "cifar10", "image_size": None}, DataError, "pass --data-dir"),
        ({"optimizer": "lion"}, ValueError, "unknown optimizer 'lion'"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"model_kwargs": (("num_blocks", 0),)}, ValueError, "num_blocks"),
    ],
)
def test_bad_configuration_fails_when_the_task_is_built(overrides, error, message):
    with pytest.raises(error, match=message):
        ResNetTask(**{**TINY, **overrides})


def test_short_training_lowers_the_loss_and_reports_top5(tmp_path):
    recorder = HookRecorder("log_metrics")
    task = ResNetTask(**TINY, learning_rate=0.05)
    trainer = make_trainer(tmp_path, recorder, max_epochs=4, log_every_n_steps=4)
    trainer.fit(task)
    metrics = trainer.validate(task)
    losses = [float(m["train/loss"]) for _, m in recorder.logged() if "train/loss" in m]
    assert losses[-1] < losses[0]
    assert set(metrics) == {"val/loss", "val/accuracy", "val/top5_accuracy"}
    assert metrics["val/top5_accuracy"] == 1.0  # 4 classes: top-5 always hits
    predictions = trainer.predict(task)
    assert predictions["probabilities"].shape == (32, 4)
    np.testing.assert_allclose(predictions["probabilities"].sum(-1), 1.0, rtol=1e-5)


def test_digits_transforms_skip_the_flip():
    task = ResNetTask()
    names = [type(t).__name__ for t in task.train_transforms()]
    assert names == ["CheckLabels", "RandomCrop", "Normalize"]
    assert task.dataset_info.image_shape == (16, 16, 1)
    assert optax  # imported for the schedule API used above


def test_the_package_names_the_task_for_python_and_the_command_line(tmp_path, monkeypatch,
                                                                    capsys):
    import resnet_task
    from nnx_trainer.cli import main

    assert (resnet_task.ResNetTask, resnet_task.ResNetConfig) == (ResNetTask, ResNetConfig)
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main([
        "fit", "--task", "resnet_task.ResNetTask", "--task.dataset", "synthetic",
        "--task.image_size", "8", "--task.model", "simple",
        "--task.model_kwargs", json.dumps(TINY["model_kwargs"]),
        "--task.dataset_kwargs", json.dumps(TINY["dataset_kwargs"]),
        "--trainer.batch_size", "16", "--trainer.max_steps", "2",
        "--trainer.log_every_n_steps", "1", "--plugins.metrics_jsonl", "{}",
        "--trainer.run_dir", str(tmp_path),
    ]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["task"]["class_path"] == "resnet_task.ResNetTask"
    capsys.readouterr()
    assert main(["fit", "--task", "resnet_task.ResnetTask"]) == 2
    assert "has no 'ResnetTask'; did you mean 'ResNetTask'?" in capsys.readouterr().err


def test_without_pillow_and_scikit_learn_only_what_needs_them_fails(tmp_path):
    # A None entry in sys.modules makes an import fail as if the library were not installed.
    (tmp_path / "image.png").write_bytes(b"not decoded: Pillow is missing")
    code = 'import sys\nsys.modules["PIL"] = sys.modules["sklearn"] = None\n' + textwrap.dedent(f"""
        from resnet_task import ResNetTask
        from resnet_task.image_folder import decode_image

        task = ResNetTask(dataset="synthetic", image_size=8,
                          dataset_kwargs=(("num_examples", 32), ("num_classes", 4)))
        print("built", task.train_data()[0]["image"].shape)
        for build in (ResNetTask, lambda: decode_image({str(tmp_path / "image.png")!r}, 8)):
            try:
                build()
            except ImportError as e:
                print("ImportError:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=script_env(), timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built (8, 8, 3)" in proc.stdout
    assert ("ImportError: the bundled digits dataset needs scikit-learn, which is not "
            'installed: pip install "nnx-trainer[examples]"') in proc.stdout
    assert ('ImportError: decoding images needs Pillow, which is not installed: '
            'pip install "nnx-trainer[images]"') in proc.stdout
