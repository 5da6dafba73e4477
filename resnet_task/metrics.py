"""The task's ``nnx.metrics`` metrics: top-k accuracy (nnx ships top-1 ``Accuracy``
only) and the running count of replaced examples (``bad_images="skip"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_task.image_folder import REPLACED_KEY


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


class ReplacedExamples(nnx.metrics.Metric):
    """How many examples training has seen replaced, as a running total over the fit.

    Sums the per-example ``replaced`` flags (True where ``bad_images="skip"`` swapped a
    bad file for the next good one, see :mod:`resnet_task.image_folder`); honours
    ``mask``. Computed on device over the global batch, so every process gets the same
    count, whichever Grain worker found the file bad. An example is counted each time
    training draws it: a bad file once per epoch it is drawn in (an epoch leaves out
    the examples that would only fill part of a last batch).

    :meth:`reset` keeps the total: the Trainer resets its train metrics at every log
    interval, and a count that restarted there would show only the latest interval's
    replacements. The total is part of the train metrics' state, which checkpoints
    hold, so a resumed fit continues it.
    """

    def __init__(self, argname: str = REPLACED_KEY) -> None:
        self.argname = argname
        self.total = nnx.metrics.MetricState(jnp.array(0, dtype=jnp.int32))

    def reset(self) -> None:
        """Keep the total (see the class docstring): a running count is never reset."""

    def update(self, *, mask: jax.Array | None = None, **kwargs) -> None:  # type: ignore[override]
        """Add a batch's flags, ``kwargs[argname]`` (batch,) bool."""
        if self.argname not in kwargs:
            raise TypeError(f"{type(self).__name__} expects the keyword argument "
                            f"{self.argname!r} (the batch's {REPLACED_KEY!r} flags)")
        flags = jnp.asarray(kwargs[self.argname]).astype(jnp.int32)
        if mask is not None:
            flags = flags * mask.astype(jnp.int32)
        self.total[...] += flags.sum()

    def compute(self) -> jax.Array:
        """The total so far, an int32 scalar."""
        return self.total[...]
