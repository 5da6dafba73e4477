"""Loops over chunks of a batch, for the convolution formulations that would otherwise
hold a whole batch's copies at once: :func:`map_batch_chunks` for
:mod:`nnx_trainer.conv_forward`'s rows path, :func:`sum_batch_chunks` for
:mod:`nnx_trainer.conv_gradients`' kernel gradients.

A chunk takes every ``steps``-th image rather than a contiguous slice, so that on a batch
sharded over devices each chunk is a slice of every device's own images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["batch_chunks", "images_per_chunk", "map_batch_chunks", "sum_batch_chunks"]


def images_per_chunk(batch: int, wanted: int) -> int:
    """Images per chunk for a loop over a batch: about ``wanted``, a divisor of ``batch``,
    and a multiple of the device count where the batch is one.

    Chunk ``i`` of :func:`map_batch_chunks` holds images ``i, i + steps, ...``; with a
    multiple of the device count each chunk takes the same share of every device's part
    of a batch sharded over devices, so the loop runs on each device's own images (a
    loop over contiguous chunks made GSPMD gather the batch every step: 3.5-10x slower
    on 8 CPU devices).
    """
    devices = jax.device_count()
    unit = devices if batch % devices == 0 else 1
    per = -(-max(1, min(batch, wanted)) // unit) * unit
    while batch % per:
        per += unit
    return per


def batch_chunks(x: jax.Array, per: int) -> jax.Array:
    """``x`` grouped as ``(per, steps, ...)``: chunk ``i`` (``[:, i]``) holds images ``i, i +
    steps, ...``, the layout :func:`images_per_chunk` sizes chunks for."""
    return x.reshape(per, x.shape[0] // per, *x.shape[1:])


def map_batch_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array,
                     per: int) -> jax.Array:
    """``fn`` over chunks of ``per`` images of ``x`` (``per`` divides the batch, from
    :func:`images_per_chunk`), results in the images' order; a loop, not unrolled, so
    compile time stays flat in the batch size."""
    steps = x.shape[0] // per
    if steps == 1:
        return fn(x)
    grouped = batch_chunks(x, per)
    first = jax.eval_shape(fn, jax.ShapeDtypeStruct((per, *x.shape[1:]), x.dtype))

    def step(i: jax.Array, out: jax.Array) -> jax.Array:
        y = fn(lax.dynamic_index_in_dim(grouped, i, axis=1, keepdims=False))
        return lax.dynamic_update_index_in_dim(out, y, i, axis=1)

    out = lax.fori_loop(0, steps, step, jnp.zeros((per, steps, *first.shape[1:]), first.dtype))
    return out.reshape(x.shape[0], *first.shape[1:])


def sum_batch_chunks(fn: Callable[..., jax.Array], xs: Sequence[jax.Array],
                     per: int) -> jax.Array:
    """The sum of ``fn`` over chunks of ``per`` images of each of ``xs`` (arrays of one
    batch, chunked alike; ``per`` from :func:`images_per_chunk`); a loop, not an unrolled
    sum, so compile time stays flat in the batch size."""
    steps = xs[0].shape[0] // per
    if steps == 1:
        return fn(*xs)
    grouped = [batch_chunks(x, per) for x in xs]
    total = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((per, *x.shape[1:]), x.dtype) for x in xs))

    def step(i: jax.Array, acc: jax.Array) -> jax.Array:
        return acc + fn(*(lax.dynamic_index_in_dim(c, i, axis=1, keepdims=False) for c in grouped))

    return lax.fori_loop(0, steps, step, jnp.zeros(total.shape, total.dtype))
