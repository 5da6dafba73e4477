"""Tests for resnet_task.models.

CPU-time notes (these tests must stay fast on 2 cores):
* XLA compiles of threefry random ops dominate model construction on CPU, so models here are
  seeded with "rbg" keys and inputs come from numpy; both are several times cheaper to compile.
* Real models are built and run under ``nnx.jit`` (one compile each rather than one per op).
* The deep variants are only checked abstractly with ``nnx.eval_shape``, in eval mode, because
  tracing BatchNorm's running-stat updates is quadratic in graph size in flax 0.12.8.
"""

from __future__ import annotations

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_task.models import (
    MODEL_NAMES,
    BasicBlock,
    BottleneckBlock,
    ResNet,
    SimpleResNet,
    create_model,
    resnet18,
)


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


_forward = nnx.jit(lambda model, x: model(x))

# Module-level so each init program compiles once and every call returns a fresh model.
_init_resnet18 = nnx.jit(lambda: resnet18(num_classes=10, stem="cifar", rngs=_rngs()))
_init_tiny = nnx.jit(lambda: SimpleResNet(1, initial_features=4, num_classes=3, rngs=_rngs()))


@functools.cache
def _abstract(name: str, stem: str, num_classes: int) -> nnx.Module:
    model = nnx.eval_shape(
        lambda: create_model(name, num_classes=num_classes, stem=stem, rngs=_rngs())
    )
    model.eval()
    return model


def _abstract_logits(model: nnx.Module, size: int) -> jax.ShapeDtypeStruct:
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return nnx.eval_shape(lambda m, x: m(x), model, x)


def _count(model: nnx.Module, kind: type[nnx.Variable]) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, kind)))


def _images(seed: int, batch: int = 2, size: int = 32, channels: int = 3) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, size, size, channels), dtype=np.float32))


def _batch_norms(model: nnx.Module) -> list[nnx.BatchNorm]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]


# --- shapes and parameter counts ------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_torchvision(name: str, expected: int) -> None:
    model = _abstract(name, "imagenet", 1000)
    assert _count(model, nnx.Param) == expected
    # Running statistics exist but are not parameters.
    assert _count(model, nnx.BatchStat) > 0


# 1000 classes for resnet18/50 so the abstract models are shared with the parameter-count test.
@pytest.mark.parametrize(
    ("name", "stem", "size", "num_classes"),
    [
        ("resnet18", "imagenet", 64, 1000),
        ("resnet34", "imagenet", 64, 7),
        ("resnet50", "imagenet", 64, 1000),
        ("resnet101", "imagenet", 64, 7),
        ("resnet152", "imagenet", 64, 7),
        ("resnet34", "cifar", 32, 7),
        ("resnet20", "cifar", 32, 7),
        ("resnet32", "cifar", 32, 7),
        ("resnet44", "cifar", 32, 7),
        ("resnet56", "cifar", 32, 7),
        ("resnet110", "cifar", 32, 7),
    ],
)
def test_every_variant_gives_float32_logits(
    name: str, stem: str, size: int, num_classes: int
) -> None:
    logits = _abstract_logits(_abstract(name, stem, num_classes), size)
    assert logits.shape == (2, num_classes)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize(("name", "depth"), [("resnet20", 20), ("resnet56", 56)])
def test_cifar_family_has_6n_plus_2_weighted_layers(name: str, depth: int) -> None:
    model = _abstract(name, "cifar", 7)
    main_path = [
        m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.Conv | nnx.Linear) and "shortcut" not in path
    ]
    assert len(main_path) == depth


def test_stems() -> None:
    imagenet = _abstract("resnet18", "imagenet", 1000)
    cifar = _abstract("resnet34", "cifar", 7)
    assert (imagenet.conv1.kernel_size, imagenet.conv1.strides) == ((7, 7), (2, 2))
    assert (cifar.conv1.kernel_size, cifar.conv1.strides) == ((3, 3), (1, 1))


def test_resnet18_runs_in_train_and_eval_mode() -> None:
    model = _init_resnet18()
    x = _images(0)
    for mode in (model.train, model.eval):
        mode()
        logits = _forward(model, x)
        assert logits.shape == (2, 10)
        assert logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))


def test_create_model_builds_simple_resnet() -> None:
    model = nnx.eval_shape(
        lambda: create_model(
            "simple", num_blocks=2, initial_features=8, num_classes=3, rngs=_rngs()
        )
    )
    assert isinstance(model, SimpleResNet)
    assert [len(stage.layers) for stage in model.stages] == [2, 2, 2]
    assert [stage.layers[0].conv1.out_features for stage in model.stages] == [8, 16, 32]
    assert model.head.in_features == 32


def test_simple_resnet_runs_and_trains() -> None:
    model = _init_tiny()
    x, labels = _images(1, size=16), jnp.array([0, 2])

    @nnx.jit
    def loss_and_grads(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, nnx.State]:
        def loss_fn(model: nnx.Module) -> jax.Array:
            logits = model(x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = loss_and_grads(model, x)
    assert np.isfinite(loss)
    assert _count(grads, nnx.Param) == _count(model, nnx.Param)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
    model.eval()
    logits = _forward(model, x)
    assert logits.shape == (2, 3)
    assert logits.dtype == jnp.float32


# --- residual blocks --------------------------------------------------------------------------


def _last_bn(block: BasicBlock | BottleneckBlock) -> nnx.BatchNorm:
    return block.bn2 if isinstance(block, BasicBlock) else block.bn3


@pytest.mark.parametrize(("block_type", "in_features"), [(BasicBlock, 4), (BottleneckBlock, 16)])
def test_residual_is_added_before_the_activation(block_type: type, in_features: int) -> None:
    block = block_type(in_features, 4, 1, rngs=_rngs())
    assert block.shortcut is None
    bn = _last_bn(block)
    # A zero BN scale makes the residual branch output exactly its BN bias, whatever the input.
    bn.scale[...] = jnp.zeros_like(bn.scale[...])

    bn.bias[...] = jnp.zeros_like(bn.bias[...])
    x = _images(2, size=6, channels=in_features)
    assert np.any(x < 0)
    # Adding after the activation would give relu(0) + x = x, negatives included.
    np.testing.assert_allclose(_forward(block, x), jax.nn.relu(x), atol=1e-6)

    bn.bias[...] = -jnp.ones_like(bn.bias[...])
    x = jnp.abs(x)
    # relu(branch) + x would give x; branch + relu(x) would give x - 1 with negatives.
    np.testing.assert_allclose(_forward(block, x), jax.nn.relu(x - 1.0), atol=1e-6)


@pytest.mark.parametrize(
    ("block_type", "in_features", "features", "strides", "projects"),
    [
        (BasicBlock, 8, 8, 1, False),
        (BasicBlock, 8, 8, 2, True),
        (BasicBlock, 4, 8, 1, True),
        (BottleneckBlock, 16, 4, 1, False),
        (BottleneckBlock, 8, 4, 1, True),
        (BottleneckBlock, 16, 4, 2, True),
    ],
)
def test_projection_shortcut_only_when_shape_changes(
    block_type: type, in_features: int, features: int, strides: int, projects: bool
) -> None:
    block = nnx.eval_shape(lambda: block_type(in_features, features, strides, rngs=_rngs()))
    out_features = features * block_type.expansion
    assert (block.shortcut is not None) == projects
    if projects:
        conv, bn = block.shortcut.layers
        assert conv.kernel.shape == (1, 1, in_features, out_features)
        assert conv.strides == (strides, strides)
        assert isinstance(bn, nnx.BatchNorm)
    block.eval()
    x = jax.ShapeDtypeStruct((2, 8, 8, in_features), jnp.float32)
    y = nnx.eval_shape(lambda b, x: b(x), block, x)
    assert y.shape == (2, 8 // strides, 8 // strides, out_features)


@pytest.mark.parametrize(
    ("name", "first_block_projects"), [("resnet18", False), ("resnet50", True)]
)
def test_stage_structure(name: str, first_block_projects: bool) -> None:
    model = _abstract(name, "imagenet", 1000)
    for i, stage in enumerate(model.stages):
        blocks = stage.layers
        # Stage 0 of a bottleneck net still projects: 64 -> 256 channels.
        assert (blocks[0].shortcut is not None) == (first_block_projects or i > 0)
        assert all(b.shortcut is None for b in blocks[1:])
        stride = blocks[0].conv1.strides if name == "resnet18" else blocks[0].conv2.strides
        assert stride == ((1, 1) if i == 0 else (2, 2))


@pytest.mark.parametrize(("block_type", "in_features"), [(BasicBlock, 4), (BottleneckBlock, 16)])
def test_zero_init_residual_zeroes_only_the_last_bn_scale(
    block_type: type, in_features: int
) -> None:
    block = block_type(in_features, 4, zero_init_residual=True, rngs=_rngs())
    last = _last_bn(block)
    for bn in _batch_norms(block):
        np.testing.assert_array_equal(bn.scale[...], 0.0 if bn is last else 1.0)


# --- train / eval -----------------------------------------------------------------------------


def _bn_reference(h: jax.Array, bn: nnx.BatchNorm) -> jax.Array:
    inv = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    return (h - bn.mean[...]) * inv * bn.scale[...] + bn.bias[...]


def test_eval_mode_uses_running_statistics() -> None:
    block = BasicBlock(4, 4, rngs=_rngs())
    rng = np.random.default_rng(3)
    for bn in (block.bn1, block.bn2):
        bn.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)
        bn.scale[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
        bn.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
    stats_before = jax.tree.map(np.asarray, nnx.state(block, nnx.BatchStat))

    block.eval()
    assert all(bn.use_running_average for bn in _batch_norms(block))
    x = _images(4, batch=3, size=6, channels=4)
    out = _forward(block, x)

    h = jax.nn.relu(_bn_reference(block.conv1(x), block.bn1))
    expected = jax.nn.relu(_bn_reference(block.conv2(h), block.bn2) + x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Each example is normalised on its own, so it can be evaluated alone.
    np.testing.assert_allclose(_forward(block, x[:1]), out[:1], rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(block, nnx.BatchStat), stats_before)


def test_batch_dependence_in_train_but_not_eval_mode() -> None:
    model = _init_tiny()
    a, b, c = _images(5, batch=3, size=16)
    first_with_b = jnp.stack([a, b])
    first_with_c = jnp.stack([a, c])
    initial = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

    model.train()
    assert not any(bn.use_running_average for bn in _batch_norms(model))
    train_b = _forward(model, first_with_b)
    train_c = _forward(model, first_with_c)
    assert not np.allclose(train_b[0], train_c[0], atol=1e-4)
    updated = nnx.state(model, nnx.BatchStat)
    changed = jax.tree.map(lambda new, old: not np.allclose(new, old), updated, initial)
    assert all(jax.tree.leaves(changed)), "every running mean/var should move in train mode"

    model.eval()
    trained_stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    eval_b = _forward(model, first_with_b)
    eval_c = _forward(model, first_with_c)
    np.testing.assert_allclose(eval_b[0], eval_c[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), trained_stats)


# --- mixed precision --------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_parameters_and_statistics() -> None:
    abstract16 = nnx.eval_shape(
        lambda: resnet18(num_classes=10, stem="cifar", dtype=jnp.bfloat16, rngs=_rngs())
    )
    for kind in (nnx.Param, nnx.BatchStat):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(abstract16, kind))}
        assert dtypes == {jnp.dtype(jnp.float32)}, kind
    layers = [
        m
        for _, m in nnx.iter_modules(abstract16)
        if isinstance(m, nnx.Conv | nnx.Linear | nnx.BatchNorm)
    ]
    assert len(layers) == 1 + 1 + 8 * 4 + 3 * 2 + 1  # stem conv+bn, blocks, projections, head
    assert all(m.dtype == jnp.bfloat16 for m in layers)

    model32 = _init_resnet18()
    model16 = abstract16
    nnx.update(model16, nnx.state(model32))
    x = _images(6)
    logits32 = _forward(model32, x)
    logits16 = _forward(model16, x)
    assert logits16.dtype == jnp.float32
    assert not np.array_equal(logits16, logits32), "bfloat16 compute should round differently"
    np.testing.assert_allclose(logits16, logits32, rtol=0.05, atol=0.1)


# --- bad arguments ----------------------------------------------------------------------------


def test_model_names() -> None:
    assert MODEL_NAMES == (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "simple",
    )


@pytest.mark.parametrize("name", MODEL_NAMES[:-1])
def test_each_named_model_is_a_keyword_only_factory_building_create_models_tree(
    name: str,
) -> None:
    from resnet_task import models

    factory = getattr(models, name)
    assert factory.__name__ == name and factory.__doc__
    params = inspect.signature(factory).parameters
    assert {"num_classes", "in_channels", "dtype", "rngs"} <= set(params)
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params.values())

    if name not in ("resnet18", "resnet50", "resnet20"):  # one of each kind: tracing is slow
        return
    small = {} if name == "resnet20" else {"width": 4}
    stem = "cifar" if name == "resnet20" else "imagenet"

    def tree(build) -> list:
        model = nnx.eval_shape(lambda: build(num_classes=10, rngs=_rngs(), **small))
        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
        return [(jax.tree_util.keystr(path), v.shape, v.dtype) for path, v in leaves]

    assert tree(factory) == tree(functools.partial(create_model, name, stem=stem))


def test_unknown_model_name_lists_choices() -> None:
    expected = "unknown model 'resnt18'; choose one of: " + ", ".join(MODEL_NAMES)
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        create_model("resnt18", num_classes=10, rngs=nnx.Rngs(0))


def test_unknown_stem_lists_choices() -> None:
    message = re.escape("unknown stem 'tiny'; choose one of: imagenet, cifar")
    with pytest.raises(ValueError, match=message):
        create_model("resnet18", num_classes=10, stem="tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        ResNet([1], BasicBlock, num_classes=10, stem="tiny", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "simple"])
def test_too_few_classes(name: str) -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 2, got 1"):
        create_model(name, num_classes=1, num_blocks=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_blocks=0), "num_blocks must be at least 1, got 0"),
        (dict(num_blocks=1, initial_features=0), "initial_features must be at least 1, got 0"),
    ],
)
def test_simple_resnet_validates_its_size(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimpleResNet(**kwargs, num_classes=10, rngs=nnx.Rngs(0))


def test_cifar_family_rejects_other_stems_and_simple_needs_num_blocks() -> None:
    with pytest.raises(ValueError, match="only supports stem 'cifar'"):
        create_model("resnet20", num_classes=10, stem="imagenet", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs num_blocks"):
        create_model("simple", num_classes=10, rngs=nnx.Rngs(0))


# --- convolution implementation -------------------------------------------------------------


def _conv_fns(model: nnx.Module) -> set:
    return {m.conv_general_dilated for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)}


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_conv_impl_selects_every_convolution(name: str) -> None:
    from nnx_trainer.conv import auto_conv_general_dilated, conv_general_dilated

    def build(**kw):
        return nnx.eval_shape(lambda: create_model(name, num_classes=10, rngs=_rngs(), **kw))

    # "auto" (the default): the engine's convolution on CPU, XLA's on GPU and TPU,
    # chosen when traced (tests/test_conv.py), so building leaves the backend alone.
    assert _conv_fns(build()) == {auto_conv_general_dilated}
    assert _conv_fns(build(conv_impl="custom")) == {conv_general_dilated}
    # The opt-out: XLA's own convolution and autodiff everywhere.
    assert _conv_fns(build(conv_impl="xla")) == {jax.lax.conv_general_dilated}


def test_unknown_conv_impl_lists_choices() -> None:
    message = re.escape("unknown conv_impl 'fast'; choose one of: auto, xla, custom")
    with pytest.raises(ValueError, match=message):
        create_model("resnet18", num_classes=10, conv_impl="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        SimpleResNet(1, num_classes=10, conv_impl="fast", rngs=nnx.Rngs(0))


def test_xla_conv_impl_supports_forward_mode_differentiation() -> None:
    # A custom_vjp has no forward-mode rule; the opt-out is what jax.jvp needs.
    model = _init_tiny_with("xla")
    model.eval()
    x = _images(0, batch=2, size=8)
    graphdef, state = nnx.split(model)

    def logits(x):
        return nnx.merge(graphdef, state)(x)

    _, tangent = jax.jvp(logits, (x,), (jnp.ones_like(x),))
    assert tangent.shape == (2, 3)


def _init_tiny_with(conv_impl: str) -> SimpleResNet:
    return SimpleResNet(1, initial_features=4, num_classes=3, conv_impl=conv_impl, rngs=_rngs())
