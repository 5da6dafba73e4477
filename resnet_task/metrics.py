"""Top-k accuracy as an ``nnx.metrics`` metric (nnx ships top-1 ``Accuracy`` only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class TopKAccuracy(nnx.metrics.Average):
    """Fraction of examples whose label is among the ``k`` highest logits; honours ``mask``."""

    def __init__(self, k: int = 5, argname: str = "values") -> None:
        super().__init__(argname)
        self.k = k

    def update(  # type: ignore[override]
        self, *, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, **_
    ) -> None:
        """Add a batch: ``logits`` (batch, classes), integer ``labels`` (batch,)."""
        k = min(self.k, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        hits = (top == labels[:, None].astype(top.dtype)).any(axis=-1).astype(jnp.float32)
        super().update(**{self.argname: hits}, mask=mask)
