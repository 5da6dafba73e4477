"""Export for serving: StableHLO read back by a process with JAX only, ONNX by onnxruntime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_task import TinyModel, TinyTask, make_examples, make_trainer

from nnx_trainer.cli import main
from nnx_trainer.export import example_input, export_model, inference_model
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint
from resnet_task.models import create_model

# Runs in a fresh interpreter: JAX and NumPy only, and it says what else got imported.
READER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    inputs = np.load(sys.argv[2])
    np.savez(sys.argv[3], **{k: np.asarray(exported.call(inputs[k])) for k in inputs.files})
    loaded = [m for m in ("flax", "nnx_trainer", "resnet_task", "optax", "orbax", "torch")
              if m in sys.modules]
    print("imported:", loaded)
""")


@pytest.fixture(autouse=True)
def _only_configured_plugins(monkeypatch):
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _resnet() -> nnx.Module:
    """ResNet-50 layout at width 4 with the ImageNet stem (max-pool included) and
    batch statistics away from 0/1, so evaluation mode shows in the numbers."""
    with jax.threefry_partitionable(False):
        model = create_model("resnet50", num_classes=10, stem="imagenet", width=4,
                             rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            bn.mean.set_value(rng.uniform(-0.3, 0.3, bn.mean.shape).astype(np.float32))
            bn.var.set_value(rng.uniform(0.5, 2.0, bn.var.shape).astype(np.float32))
    return model


def _reference(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(inference_model(model), x))


def _read_in_fresh_process(path: Path, inputs: dict[str, np.ndarray], tmp: Path) -> dict:
    np.savez(tmp / "inputs.npz", **inputs)
    (tmp / "reader.py").write_text(READER)
    done = subprocess.run(
        [sys.executable, "-I", str(tmp / "reader.py"), str(path), str(tmp / "inputs.npz"),
         str(tmp / "outputs.npz")], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout  # no model code, no flax: the file is all it needs
    return dict(np.load(tmp / "outputs.npz"))


def test_stablehlo_runs_in_a_process_with_only_jax(tmp_path):
    model = _resnet()
    rng = np.random.default_rng(1)
    b3 = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    inputs = {"b3": b3, "b5": np.concatenate([b3, rng.normal(size=(2, 32, 32, 3))]).astype(
        np.float32)}
    path = export_model(model, inputs["b3"][0], tmp_path / "resnet.stablehlo")  # symbolic batch
    outputs = _read_in_fresh_process(path, inputs, tmp_path)
    for key, x in inputs.items():
        np.testing.assert_allclose(outputs[key], _reference(model, x), rtol=0, atol=1e-4)
    # Evaluation mode: running statistics, so one example's logits do not depend on the
    # rest of its batch (training mode would normalise with the batch's statistics).
    np.testing.assert_allclose(outputs["b5"][:3], outputs["b3"], rtol=0, atol=1e-4)


def test_stablehlo_fixed_batch_size(tmp_path):
    model = TinyModel(8, 3, rngs=nnx.Rngs(0))
    path = export_model(model, np.zeros(8, np.float32), tmp_path / "tiny.stablehlo",
                        batch_size=4)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    assert exported.in_avals[0].shape == (4, 8)
    x = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(x)), _reference(model, x), atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        export_model(model, np.zeros(8, np.float32), tmp_path / "x", batch_size=0)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, np.zeros(8, np.float32), tmp_path / "x", format="tflite")


def _onnx_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_onnx_resnet_matches_onnxruntime(tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model = _resnet()
    path = export_model(model, np.zeros((32, 32, 3), np.float32), tmp_path / "resnet.onnx",
                        format="onnx")
    rng = np.random.default_rng(3)
    for n in (1, 4):  # a symbolic batch: any size
        x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
        np.testing.assert_allclose(_onnx_run(path, x), _reference(model, x), rtol=0, atol=1e-4)


def test_onnx_user_model_and_an_unsupported_operation(tmp_path):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    model = TinyModel(8, 3, rngs=nnx.Rngs(1))
    path = export_model(model, np.zeros(8, np.float32), tmp_path / "tiny.onnx", format="onnx")
    x = np.random.default_rng(4).normal(size=(6, 8)).astype(np.float32)
    np.testing.assert_allclose(_onnx_run(path, x), _reference(model, x), rtol=0, atol=1e-4)

    class MinPool(nnx.Module):
        def __call__(self, x):
            return jax.lax.reduce_window(x, np.inf, jax.lax.min, (1, 2), (1, 2), "VALID")

    with pytest.raises(ValueError, match="cannot convert the JAX operation 'reduce_window_min'"):
        export_model(MinPool(), np.zeros(8, np.float32), tmp_path / "min.onnx", format="onnx")
    assert not (tmp_path / "min.onnx").exists()


def test_cli_exports_a_runs_best_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--task", "tiny_task:TinyTask", "--trainer.batch_size", "16",
                 "--trainer.max_epochs", "2", "--trainer.run_dir", str(run),
                 "--plugins.checkpoint.monitor", "val/loss",
                 "--plugins.checkpoint.min_seconds_between_saves", "0"]) == 0
    out = tmp_path / "tiny.stablehlo"
    assert main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", "best",
                 "--format", "stablehlo", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    # The same logits as predict from that checkpoint (TinyTask.predict_step is model(x)).
    trainer = make_trainer(run, OrbaxCheckpoint(monitor="val/loss"))
    expected = trainer.predict(TinyTask(), ckpt_path="best")
    examples = make_examples(20, seed=1)
    x = np.stack([examples[i]["image"] for i in range(20)])
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    np.testing.assert_allclose(np.asarray(exported.call(x)), expected, rtol=0, atol=1e-5)


def test_example_input_comes_from_the_tasks_evaluation_data():
    assert example_input(TinyTask()) == jax.ShapeDtypeStruct((8,), np.float32)
    with pytest.raises(ValueError, match="no 'pixels'; pass the key of the model's input"):
        example_input(TinyTask(), "pixels")


class FlagModel(nnx.Module):
    """The seed document's pattern: a ``training`` flag that defaults to training."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, training=True):
        average = None if training is None else not training
        return self.fc(self.bn(x, use_running_average=average))


class NoneFlagModel(FlagModel):
    def __call__(self, x, training=None):  # the fix: the engine's mode applies
        return super().__call__(x, training)


class FlagTask(TinyTask):
    model_class = FlagModel

    def configure_model(self, rngs):
        return self.model_class(rngs)


def test_a_training_flag_that_overrides_eval_mode_is_named_and_export_sets_it(tmp_path, caplog):
    model = FlagModel(nnx.Rngs(0))
    model.bn.mean.set_value(np.full(8, 0.5, np.float32))
    model.bn.var.set_value(np.full(8, 4.0, np.float32))
    path = export_model(model, np.zeros(8, np.float32), tmp_path / "flag.stablehlo")
    x = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    exported = np.asarray(jax.export.deserialize(bytearray(path.read_bytes())).call(x))
    model.eval()
    np.testing.assert_allclose(exported, model(x, training=False), atol=1e-5)  # running stats
    assert np.abs(exported - model(x)).max() > 0.1  # what model(x) would have given

    import logging

    with caplog.at_level(logging.WARNING, logger="nnx_trainer"):
        make_trainer(tmp_path / "a", max_steps=1).fit(FlagTask())
    assert "FlagModel.__call__ takes training=True" in caplog.text
    assert "call model(x, training=False) in validation_step and predict_step" in caplog.text
    caplog.clear()
    FlagTask.model_class = NoneFlagModel
    try:
        with caplog.at_level(logging.WARNING, logger="nnx_trainer"):
            make_trainer(tmp_path / "b", max_steps=1).fit(FlagTask())
    finally:
        FlagTask.model_class = FlagModel
    assert "__call__ takes" not in caplog.text


class TokenModel(nnx.Module):
    """Token ids -> embedding -> mean -> logits: it takes integers, not floats."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(50, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.out(self.embed(tokens).mean(1))


class TokenTask(TinyTask):
    def configure_model(self, rngs):
        return TokenModel(rngs)

    def val_data(self):
        rng = np.random.default_rng(1)
        return grain.MapDataset.source([{"tokens": rng.integers(0, 50, 6).astype(np.int32),
                                         "label": np.int32(i % 3)} for i in range(12)])

    train_data = val_data

    def training_step(self, model, batch):
        logits = model(batch["tokens"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

    def validation_step(self, model, batch):
        logits = model(batch["tokens"])
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
                "logits": logits, "labels": batch["label"]}

    def predict_step(self, model, batch):
        return model(batch["tokens"])


def test_a_model_of_token_ids_exports_with_integer_input_and_a_bad_dtype_is_named(
        tmp_path, capsys):
    # Integer examples default to float32 (uint8 images converted in the step); a model
    # that cannot take floats (nnx.Embed) gets the examples' own dtype instead.
    run = tmp_path / "run"
    assert main(["fit", "--task", f"{__name__}:TokenTask", "--trainer.batch_size", "4",
                 "--trainer.max_epochs", "1", "--trainer.run_dir", str(run),
                 "--plugins.checkpoint.min_seconds_between_saves", "0"]) == 0
    out = tmp_path / "tokens.stablehlo"
    assert main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                 "--input_key", "tokens", str(out)]) == 0
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    assert exported.in_avals[0].dtype == np.int32
    trainer = make_trainer(run, OrbaxCheckpoint(), batch_size=4)
    expected = trainer.predict(TokenTask(), ckpt_path="last")
    x = np.stack([e["tokens"] for e in TokenTask().val_data()])
    np.testing.assert_allclose(np.asarray(exported.call(x)), expected, rtol=0, atol=1e-6)
    capsys.readouterr()
    assert main(["export", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                 "--input_key", "tokens", "--input_dtype", "int3", str(out)]) == 2
    assert "input dtype 'int3' is not a NumPy dtype" in capsys.readouterr().err


class MaskedModel(nnx.Module):
    """Two inputs, as text models take them: values and a mask of the ones that count."""

    def __init__(self, rngs: nnx.Rngs, dtype=np.float32) -> None:
        self.fc = nnx.Linear(8, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x, mask):
        return self.fc(x * mask)


class MaskedTask(TinyTask):
    def configure_model(self, rngs):
        return MaskedModel(rngs, self.compute_dtype)

    def val_data(self):
        mask = (np.arange(8) < 6).astype(bool)
        return make_examples(20, seed=1).map(lambda e: {**e, "mask": mask})

    train_data = val_data

    def training_step(self, model, batch):
        logits = model(batch["image"], batch["mask"]).astype(np.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

    def validation_step(self, model, batch):
        logits = model(batch["image"], batch["mask"]).astype(np.float32)
        return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
                "logits": logits, "labels": batch["label"]}

    def predict_step(self, model, batch):
        return model(batch["image"], batch["mask"]).astype(np.float32)


def test_a_model_of_two_inputs_exports_them_in_order_and_a_bf16_run_exports_float32(
        tmp_path, capsys):
    # Was: export passed one input (a TypeError from the model's __call__), and a model
    # trained with precision bf16 exported bfloat16 products that onnxruntime refuses.
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert main(["fit", "--task", f"{__name__}:MaskedTask", "--trainer.batch_size", "4",
                 "--trainer.max_epochs", "1", "--trainer.run_dir", str(run),
                 "--trainer.precision", "bf16",
                 "--plugins.checkpoint.min_seconds_between_saves", "0"]) == 0
    config = ["export", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]
    capsys.readouterr()
    assert main([*config, "--input_key", "image", str(tmp_path / "one.stablehlo")]) == 2
    assert ("MaskedModel.__call__ takes x, mask (2 inputs), not 1 (image)"
            in capsys.readouterr().err)
    assert main([*config, "--input_key", "image,mask", "--input_dtype", "float32",
                 str(tmp_path / "x.stablehlo")]) == 2
    assert "1 input dtype(s) for 2 input keys (image, mask)" in capsys.readouterr().err

    shlo, onnx = tmp_path / "m.stablehlo", tmp_path / "m.onnx"
    assert main([*config, "--input_key", "image,mask", str(shlo)]) == 0
    assert main([*config, "--input_key", "image,mask", "--format", "onnx", "--batch_size",
                 "20", str(onnx)]) == 0
    examples = MaskedTask().val_data()
    x = np.stack([examples[i]["image"] for i in range(20)])
    mask = np.stack([examples[i]["mask"] for i in range(20)])
    exported = jax.export.deserialize(bytearray(shlo.read_bytes()))
    assert [a.dtype for a in exported.in_avals] == [np.float32, np.bool_]
    assert "xbf16>" not in exported.mlir_module()  # float32 products, whatever the run's
    trainer = make_trainer(tmp_path / "fp32", OrbaxCheckpoint(), batch_size=4)
    expected = trainer.predict(MaskedTask(), ckpt_path=str(run / "checkpoints"))
    np.testing.assert_allclose(np.asarray(exported.call(x, mask)), expected, atol=1e-5)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "mask"]
    np.testing.assert_allclose(session.run(None, {"image": x, "mask": mask})[0], expected,
                               atol=1e-5)
