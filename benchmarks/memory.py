"""Peak resident memory: the example run versus a hand-written loop, same model, same data.

Each run is a child process; its peak RSS is the kernel's ``ru_maxrss`` for exactly that
child (``wait4``). The example runs as users run it (``examples/train_resnet.py
--epochs 2``, all default plugins). The hand loop trains the same network (the example's
ResNet-8 from ``resnet_task.models``) on the same digits with the same optimizer,
augmentation (pad-4 random crop, normalisation) and per-epoch evaluation, written
with NumPy batching and one ``jax.jit`` step: no Grain, no plugins, no engine.

To show where the difference comes from, it also measures each side before it compiles
anything: its imports and its loaded data (the example: its modules, the digits and
every plugin the Trainer loads; the hand loop: JAX, Flax, optax, scikit-learn, Pillow
and the digits).

    python benchmarks/memory.py                     # about 1 minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import harness

SCRIPT = Path(__file__).resolve()
EXAMPLE = harness.REPO_ROOT / "examples" / "train_resnet.py"
TARGET = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs of both runs")
    harness.add_common_arguments(p)
    p.add_argument("--_hand", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--_before", choices=["example", "hand"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_example():
    spec = importlib.util.spec_from_file_location("train_resnet_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- hand loop


def digits_arrays(image_size: int, val_fraction: float, seed: int):
    """scikit-learn digits as uint8 (N, S, S, 1), resized and split as resnet_task does."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize(
        (image_size, image_size), Image.Resampling.BILINEAR)) for im in raw])[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):  # the same stratified split as resnet_task.data
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(int(round(len(idx) * val_fraction)), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return images[train], labels[train], images[val], labels[val]


def hand_loop(cfg: dict) -> dict:
    """Train the example's model on digits with a plain loop; returns accuracy and RSS marks."""
    marks = {}
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from resnet_task.models import create_model

    marks["after imports"] = harness.rss_mib_self()
    x_train, y_train, x_val, y_val = digits_arrays(cfg["image_size"], 0.2, cfg["seed"])
    mean = x_train.astype(np.float64).mean() / 255.0
    std = x_train.astype(np.float64).std() / 255.0
    marks["after data"] = harness.rss_mib_self()

    b, pad = cfg["batch_size"], 4
    steps_per_epoch = len(y_train) // b
    if cfg["limit"]:
        steps_per_epoch = min(steps_per_epoch, cfg["limit"])
    total = steps_per_epoch * cfg["epochs"]
    with jax.threefry_partitionable(False):  # as the Trainer initialises (faster on CPU)
        model = create_model(
            "simple", num_classes=10, in_channels=1, rngs=nnx.Rngs(cfg["seed"]),
            num_blocks=cfg["num_blocks"], initial_features=cfg["initial_features"])
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg["lr"], int(cfg["warmup_fraction"] * total), max(total, 1), 0.0)
    tx = optax.chain(
        optax.add_decayed_weights(cfg["weight_decay"],
                                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.sgd(schedule, momentum=0.9, nesterov=True))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model, x, y):
        logits = model(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    train_step = jax.jit(train_step, donate_argnums=0)

    @jax.jit
    def eval_step(state, x, y):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return (model(x).argmax(-1) == y).sum()

    def normalize(u8):
        return ((u8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

    rng = np.random.default_rng(cfg["seed"])
    x_val_n = normalize(x_val)
    for epoch in range(cfg["epochs"]):
        order = rng.permutation(len(y_train))
        for i in range(steps_per_epoch):
            idx = order[i * b:(i + 1) * b]
            padded = np.pad(x_train[idx], ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            dy, dx = rng.integers(0, 2 * pad + 1, size=2)
            crop = padded[:, dy:dy + cfg["image_size"], dx:dx + cfg["image_size"]]
            state, loss = train_step(state, jnp.asarray(normalize(crop)), jnp.asarray(y_train[idx]))
            if epoch == 0 and i == 0:
                jax.block_until_ready(loss)
                marks["after first step (compiled)"] = harness.rss_mib_self()
        correct = 0
        for i in range(0, len(y_val), b):  # last batch smaller: compiles once more, as a user would
            correct += int(eval_step(state, x_val_n[i:i + b], y_val[i:i + b]))
    marks["end"] = harness.rss_mib_self()
    return {"accuracy": correct / len(y_val), "final_loss": float(loss), "rss_marks": marks,
            "steps": total}


# ---------------------------------------------------------------------------- parent


def before_training(side: str) -> dict:
    """Each side's imports plus its data, loaded: the memory a run holds before it compiles."""
    if side == "example":
        example = load_example()
        import nnx_trainer
        from resnet_task.task import ResNetTask

        ResNetTask()  # loads the digits, as the example does
        trainer = nnx_trainer.Trainer(run_dir=tempfile.mkdtemp(prefix="nnx-bench-"))
        loaded = [name for name, _ in trainer.plugin_manager.list_name_plugin()]
        return {"example_module": example.__name__, "plugins": loaded}
    import jax  # noqa: F401
    import optax  # noqa: F401
    from flax import nnx  # noqa: F401

    import resnet_task.models  # noqa: F401
    digits_arrays(16, 0.2, 0)
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    if args._hand:
        harness.emit_result(hand_loop(json.loads(args._hand)))
        return 0
    if args._before:
        harness.emit_result(before_training(args._before))
        return 0

    harness.print_header("peak memory: example run vs hand-written loop", args)
    defaults = load_example().parse_args([])
    limit = 3 if args.quick else None
    epochs = 1 if args.quick else args.epochs
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory(prefix="nnx-bench-") as run_dir:
        example_argv = [sys.executable, str(EXAMPLE), "--epochs", str(epochs), "--run-dir",
                        run_dir, *(["--limit-train-batches", str(limit)] if limit else [])]
        print(f"example: {' '.join(example_argv[1:])}", flush=True)
        example = harness.run_child(example_argv, env=env)
    if example["returncode"] != 0:
        print(example["stdout"][-2000:], example["stderr"][-3000:], file=sys.stderr)
        return 1
    accuracy = [ln for ln in example["stdout"].splitlines() if "held-out" in ln]
    cfg = dict(image_size=defaults.image_size or 16, seed=defaults.seed,
               batch_size=defaults.batch_size, epochs=epochs, limit=limit, lr=defaults.lr,
               weight_decay=defaults.weight_decay, warmup_fraction=defaults.warmup_fraction,
               num_blocks=defaults.num_blocks, initial_features=defaults.initial_features)
    hand = harness.child_result([sys.executable, str(SCRIPT), "--_hand", json.dumps(cfg),
                                 *(["--quick"] if args.quick else [])], env=env)
    before = {} if args.quick else {side: harness.child_result(
        [sys.executable, str(SCRIPT), "--_before", side], env=env) for side in ("example", "hand")}

    ratio = example["peak_rss_mib"] / hand["peak_rss_mib"]
    print(f"  example run (Trainer.fit, all default plugins)  peak RSS "
          f"{example['peak_rss_mib']:7.0f} MiB   {accuracy[-1].strip() if accuracy else ''}")
    print(f"  hand-written loop (NumPy batches, jax.jit)     peak RSS "
          f"{hand['peak_rss_mib']:7.0f} MiB   held-out accuracy {hand['accuracy']:.4f} after "
          f"{hand['steps']} steps")
    marks = ", ".join(f"{k} {v:.0f}" for k, v in hand["rss_marks"].items())
    print(f"    hand loop RSS (MiB) {marks}")
    if before:
        print(f"  imports + data, before any compilation: example with its plugins "
              f"{before['example']['peak_rss_mib']:.0f} MiB (plugins: "
              f"{', '.join(before['example']['plugins'])}); hand loop "
              f"{before['hand']['peak_rss_mib']:.0f} MiB")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"  ratio peak RSS example/hand: {ratio:.2f} (target <= {TARGET}: {verdict}); "
          f"difference {example['peak_rss_mib'] - hand['peak_rss_mib']:.0f} MiB")
    if before:
        print(f"    of which before any compilation (imports + data): "
              f"{before['example']['peak_rss_mib'] - before['hand']['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
