"""torchvision/timm ResNet weights in and out of resnet_task's ResNets.

The fixture (tests/scripts/make_torchvision_fixture.py, written with torch) lets the main
tests run without torch; the tests at the end build PyTorch models themselves where torch
is installed (the ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from resnet_task.models import create_model
from resnet_task.torchvision_weights import (
    infer_architecture,
    load_torchvision_weights,
    read_state_dict,
    save_torchvision_weights,
)

pytest.importorskip("safetensors")

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "torchvision_resnet50_w4.safetensors"


def _fixture() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    tensors = read_state_dict(FIXTURE)
    x, logits = tensors.pop("input"), tensors.pop("logits")
    return tensors, x, logits


def _model(name: str, width: int, num_classes: int = 10, seed: int = 0) -> nnx.Module:
    with jax.threefry_partitionable(False):  # as the Trainer builds: initialises faster
        return create_model(name, num_classes=num_classes, stem="imagenet", width=width,
                            conv_impl="xla", rngs=nnx.Rngs(seed))


def _logits(model: nnx.Module, x_nchw: np.ndarray) -> np.ndarray:
    model.eval()  # one compiled forward pass: much faster than ~300 eager operations
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, np.transpose(x_nchw, (0, 2, 3, 1))))


def _randomize_batch_stats(model: nnx.Module, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _, bn in nnx.iter_graph(model):
        if isinstance(bn, nnx.BatchNorm):
            n = bn.mean.shape
            bn.mean.set_value(rng.uniform(-0.2, 0.2, n).astype(np.float32))
            bn.var.set_value(rng.uniform(0.5, 2.0, n).astype(np.float32))
            bn.scale.set_value(rng.uniform(0.5, 1.5, n).astype(np.float32))


def test_fixture_logits_equal_pytorch_without_torch():
    tensors, x, torch_logits = _fixture()
    assert infer_architecture(tensors) == {
        "model": "resnet50", "stage_sizes": (3, 4, 6, 3), "bottleneck": True, "width": 4,
        "num_classes": 10, "in_channels": 3, "stem": "imagenet"}
    model = load_torchvision_weights(_model("resnet50", 4), tensors)
    ours = _logits(model, x)
    assert np.abs(torch_logits).max() > 1.0  # a comparison of real numbers, not ~0
    np.testing.assert_allclose(ours, torch_logits, rtol=0, atol=1e-4)


def test_loads_from_the_file_path(tmp_path):
    tensors, x, torch_logits = _fixture()
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    model = load_torchvision_weights(_model("resnet50", 4, seed=3), path)
    np.testing.assert_allclose(_logits(model, x), torch_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_round_trip_ours_torchvision_ours_is_bit_identical(tmp_path, name):
    source = _model(name, 4, seed=1)
    _randomize_batch_stats(source)
    path = save_torchvision_weights(source, tmp_path / f"{name}.safetensors")
    written = read_state_dict(path)
    assert written["fc.weight"].shape == (10, source.head.kernel.shape[0])
    assert written["conv1.weight"].shape == (4, 3, 7, 7)  # OIHW
    assert written["bn1.num_batches_tracked"].dtype == np.int64
    target = load_torchvision_weights(_model(name, 4, seed=2), path)
    for a, b in zip(jax.tree.leaves(nnx.state(source)), jax.tree.leaves(nnx.state(target)),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _error(model: nnx.Module, tensors: dict[str, np.ndarray]) -> str:
    with pytest.raises(ValueError) as info:
        load_torchvision_weights(model, tensors)
    return str(info.value)


def test_mismatches_name_the_tensor_and_the_expected_shape():
    tensors, _, _ = _fixture()
    # Another depth: a ResNet-18 has no conv3 and fewer blocks.
    message = _error(_model("resnet18", 4), tensors)
    assert "the weights have layer1.0.bn3.bias (shape (16,))" in message
    assert "the weights are resnet50 layout" in message
    assert "the model (ResNet) resnet18 layout" in message
    # A missing tensor.
    damaged = dict(tensors)
    del damaged["layer2.0.downsample.1.running_var"]
    message = _error(_model("resnet50", 4), damaged)
    assert "lack layer2.0.downsample.1.running_var (expected shape (32,))" in message
    # Another number of classes: the head's shape, and the way out.
    message = _error(_model("resnet50", 4, num_classes=5), tensors)
    assert "fc.weight has shape (10, 128), the model expects (5, 128)" in message
    assert "init_from" in message
    # Another width.
    assert "conv1.weight has shape (4, 3, 7, 7), the model expects (8, 3, 7, 7)" in _error(
        _model("resnet50", 8), tensors)
    # A deeper file than the model: the extra tensor is named.
    deeper = {**tensors, "layer3.6.conv1.weight": np.zeros((16, 64, 1, 1), np.float32)}
    assert "layer3.6.conv1.weight (shape (16, 64, 1, 1))" in _error(_model("resnet50", 4),
                                                                    deeper)


def test_a_failed_load_changes_nothing():
    tensors, _, _ = _fixture()
    model = _model("resnet50", 4, num_classes=5)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
    with pytest.raises(ValueError):
        load_torchvision_weights(model, tensors)
    after = jax.tree.leaves(nnx.state(model))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, after, strict=True))


def test_unknown_files_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight file"):
        read_state_dict(tmp_path / "none.safetensors")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected .safetensors"):
        read_state_dict(tmp_path / "w.h5")
    with pytest.raises(TypeError, match="not a resnet_task ResNet"):
        load_torchvision_weights(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {})


# ------------------------------------------------------------------ with torch installed


def _torch_models():
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location(
        "make_torchvision_fixture", HERE / "scripts" / "make_torchvision_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["resnet18", "resnet50"])
def test_random_pytorch_model_loads_with_equal_logits(tmp_path, layout):
    torch_models = _torch_models()
    import torch
    from safetensors.torch import save_file

    torch_model = torch_models.randomized(layout, num_classes=7, width=8, seed=4)
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    state = torch_model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "wrapped.pth")
    assert infer_architecture(tmp_path / "w.pth")["model"] == layout
    for name in ("w.safetensors", "w.pth", "wrapped.pth"):
        model = load_torchvision_weights(_model(layout, 8, num_classes=7), tmp_path / name)
        np.testing.assert_allclose(_logits(model, x.numpy()), expected, rtol=0, atol=1e-4)


def test_weights_out_load_into_pytorch_with_equal_logits(tmp_path):
    torch_models = _torch_models()
    import torch
    from safetensors.torch import load_file

    ours = _model("resnet50", 8, num_classes=7, seed=6)
    _randomize_batch_stats(ours, seed=6)
    path = save_torchvision_weights(ours, tmp_path / "ours.safetensors")
    torch_model = torch_models.TorchResNet("resnet50", num_classes=7, width=8).eval()
    torch_model.load_state_dict(load_file(str(path)), strict=True)
    x = np.random.default_rng(7).normal(size=(2, 3, 40, 40)).astype(np.float32)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, _logits(ours, x), rtol=0, atol=1e-4)
