"""A small GAN on the bundled 8x8 digits: two named optimizers and a custom train update.

    python examples/train_gan.py                      # about a minute on a 2-core CPU
    python examples/train_gan.py --max-steps 400 --run-dir runs/gan
    python examples/train_gan.py --max-steps 800 --run-dir runs/gan --resume last

The Task takes over the update (``training_update``): a discriminator step on real
and generated digits, then a generator step, each with its own Adam. The Trainer
still jits, donates, logs both losses, checkpoints both optimizers and resumes
exactly. At the end a logistic-regression digit classifier, fitted on the real
digits, scores the samples: its mean confidence and how many of the ten digits the
generator draws (a miniature Inception Score), and ``samples.png`` shows 64 of them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nnx_trainer
from nnx_trainer.task import OptimizerSpec
from nnx_trainer.transforms import BatchTransform, uniform
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

PIXELS = 64  # 8x8 digits


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as flat float32 images in [-1, 1], and their labels."""
    digits = load_digits()
    return (digits.data / 8.0 - 1.0).astype(np.float32), digits.target


class LatentNoise(BatchTransform):
    """Adds ``z``: standard normal noise per example, from the pipeline's example keys,
    so a resumed run draws exactly the noise the uninterrupted run would have."""

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim

    def map_batch(self, batch: Mapping[str, Any], keys: np.ndarray) -> dict[str, Any]:
        """Box-Muller: two uniform draws per pair of latent coordinates."""
        pairs = (self.latent_dim + 1) // 2
        u1 = np.stack([uniform(keys, 2 * i) for i in range(pairs)], axis=1)
        u2 = np.stack([uniform(keys, 2 * i + 1) for i in range(pairs)], axis=1)
        radius = np.sqrt(-2.0 * np.log1p(-u1))  # 1 - u1 is in (0, 1]: no log(0)
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], 1)
        return {**batch, "z": z[:, : self.latent_dim].astype(np.float32)}


class MLP(nnx.Module):
    """Dense layers with leaky ReLU between them."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:], strict=False)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.leaky_relu(layer(x), 0.2)
        return self.layers[-1](x)


class GAN(nnx.Module):
    """``generator``: latent -> image in [-1, 1]; ``discriminator``: image -> logit."""

    def __init__(self, latent_dim: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.generator = MLP([latent_dim, hidden, hidden, PIXELS], rngs=rngs)
        self.discriminator = MLP([PIXELS, hidden, hidden, 1], rngs=rngs)

    def generate(self, z: jax.Array) -> jax.Array:
        return jnp.tanh(self.generator(z))


def _bce(logits: jax.Array, target: float) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)).mean()


class DigitsGAN(nnx_trainer.Task):
    """A GAN whose update the task writes itself (Lightning's manual optimisation)."""

    example_name = "images"

    def __init__(self, latent_dim: int = 16, hidden: int = 128, learning_rate: float = 1e-3,
                 beta1: float = 0.5) -> None:
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.latent_dim, self.hidden = latent_dim, hidden
        self.learning_rate, self.beta1 = learning_rate, beta1

    def configure_model(self, rngs: nnx.Rngs) -> GAN:
        return GAN(self.latent_dim, self.hidden, rngs=rngs)

    def configure_optimizer(self, total_steps: int) -> dict[str, OptimizerSpec]:
        def adam() -> optax.GradientTransformation:
            return optax.adam(self.learning_rate, b1=self.beta1)

        return {
            "discriminator": OptimizerSpec(adam(), wrt=nnx.PathContains("discriminator")),
            "generator": OptimizerSpec(adam(), wrt=nnx.PathContains("generator")),
        }

    def configure_train_metrics(self) -> nnx.MultiMetric:
        names = ("loss", "d_loss", "g_loss", "d_real", "d_fake")
        return nnx.MultiMetric(**{n: nnx.metrics.Average(n) for n in names})

    def train_data(self) -> grain.MapDataset:
        images, _ = real_digits()
        return grain.MapDataset.source([{"image": image} for image in images])

    def train_transforms(self) -> list[BatchTransform]:
        return [LatentNoise(self.latent_dim)]

    def training_update(self, model: GAN, optimizers: Mapping[str, nnx.Optimizer],
                        batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
        real, z = batch["image"], batch["z"]

        def d_loss_fn(model: GAN):
            real_logits = model.discriminator(real)
            fake_logits = model.discriminator(jax.lax.stop_gradient(model.generate(z)))
            loss = _bce(real_logits, 1.0) + _bce(fake_logits, 0.0)
            return loss, (jax.nn.sigmoid(real_logits).mean(), jax.nn.sigmoid(fake_logits).mean())

        def g_loss_fn(model: GAN):  # the non-saturating generator loss
            return _bce(model.discriminator(model.generate(z)), 1.0)

        d_opt, g_opt = optimizers["discriminator"], optimizers["generator"]
        (d_loss, (d_real, d_fake)), grads = nnx.value_and_grad(
            d_loss_fn, argnums=nnx.DiffState(0, d_opt.wrt), has_aux=True
        )(model)
        d_opt.update(model, grads)
        g_loss, grads = nnx.value_and_grad(g_loss_fn, argnums=nnx.DiffState(0, g_opt.wrt))(model)
        g_opt.update(model, grads)
        return d_loss + g_loss, {"d_loss": d_loss, "g_loss": g_loss, "d_real": d_real,
                                 "d_fake": d_fake}

    def hparams(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "hidden": self.hidden,
                "learning_rate": self.learning_rate, "beta1": self.beta1}


def sample_quality(samples: np.ndarray) -> tuple[float, int]:
    """A real-digit classifier's mean confidence on the samples, and the digits it sees
    in at least 2% of them."""
    from sklearn.linear_model import LogisticRegression

    images, labels = real_digits()
    classifier = LogisticRegression(max_iter=2000).fit(images, labels)
    probabilities = classifier.predict_proba(samples)
    counts = np.bincount(probabilities.argmax(1), minlength=10)
    return float(probabilities.max(1).mean()), int((counts >= 0.02 * len(samples)).sum())


def save_grid(samples: np.ndarray, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = samples[:64].reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
    grid = np.kron(grid, np.ones((4, 4)))  # 4x larger pixels: 256x256
    plt.imsave(path, (grid + 1) / 2, cmap="gray_r", vmin=0, vmax=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=int, default=1500, help="training steps")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="both Adams' learning rate")
    p.add_argument("--latent-dim", type=int, default=16, help="generator input size")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and noise")
    p.add_argument("--run-dir", default=None, help="where logs go (default runs/<time>)")
    p.add_argument("--log-every", type=int, default=50, help="log every N steps")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="last|PATH",
                   help="continue from a checkpoint in the run dir")
    p.add_argument("--ckpt-every-steps", type=int, default=None, metavar="N",
                   help="also checkpoint every N steps (always at the end)")
    p.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                   help="an entry-point plugin not to load (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        task = DigitsGAN(latent_dim=args.latent_dim, learning_rate=args.lr)
        trainer = nnx_trainer.Trainer(
            max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed,
            run_dir=args.run_dir, log_every_n_steps=args.log_every,
            # Asked-for step saves all happen; otherwise the default throttle applies.
            plugins=[OrbaxCheckpoint(every_n_steps=args.ckpt_every_steps,
                                     min_seconds_between_saves=0 if args.ckpt_every_steps
                                     else 60.0)],
            disable_plugins=args.disable_plugin,
        )
        trainer.fit(task, ckpt_path=args.resume)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.preempted:
        print(f"stopped by {trainer.stop_reason} at step {trainer.global_step}")
        return 0
    z = LatentNoise(args.latent_dim).map_batch(
        {}, np.arange(1000, dtype=np.uint64) + np.uint64(args.seed) * np.uint64(10**6))["z"]
    samples = np.asarray(trainer.model.generate(jnp.asarray(z)))
    confidence, digits = sample_quality(samples)
    if trainer.is_main_process:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        save_grid(samples, trainer.run_dir / "samples.png")
    metrics = trainer.callback_metrics
    print(f"after {trainer.global_step} steps in {time.perf_counter() - start:.1f} s: "
          f"d_loss {float(metrics['train/d_loss']):.3f}, g_loss "
          f"{float(metrics['train/g_loss']):.3f}; a digit classifier is {confidence:.1%} "
          f"confident on 1000 samples and sees {digits} of 10 digits; "
          f"{trainer.run_dir / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
