"""The tests' one fake clock: seconds that move only when a test moves them.

It serves two kinds of reader. A plugin that takes a ``clock`` callable (``Timer``,
``Throughput``) gets the clock itself: calling it returns ``seconds``. Orbax's
``CheckpointManager`` reads ``datetime.datetime.now()`` in
``orbax.checkpoint.checkpoint_manager`` (for ``should_save`` and for each save's stamp), and
its ``ContinuousCheckpointingPolicy`` compares those stamps: :meth:`FakeClock.install` gives
that module a ``datetime`` whose ``now()`` reads this clock, which makes the throttle
deterministic and lets a process's clock run ahead of another's (``skew``).
"""

from __future__ import annotations

import datetime as _dt
import types
from collections.abc import Callable
from typing import Any

EPOCH = 1_700_000_000.0  # what Orbax's datetime reads at seconds == 0


class FakeClock:
    """A clock at ``seconds`` (plus ``skew``); tests move it with ``clock.seconds += 10``."""

    def __init__(self, seconds: float = 0.0, skew: float = 0.0) -> None:
        self.seconds, self.skew = seconds, skew

    def __call__(self) -> float:
        """The time in seconds, as ``time.monotonic`` or ``time.perf_counter`` would give."""
        return self.seconds + self.skew

    def install(self, setattr_: Callable[[Any, str, Any], None] | None = None) -> FakeClock:
        """Make Orbax's checkpoint manager read this clock; ``setattr_``: e.g.
        ``monkeypatch.setattr``, which undoes it after the test (plain ``setattr`` does not)."""
        from orbax.checkpoint import checkpoint_manager

        clock = self

        class FakeDateTime(_dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return _dt.datetime.fromtimestamp(EPOCH + clock(), tz=tz)

        shim = types.SimpleNamespace(
            datetime=FakeDateTime, timezone=_dt.timezone, timedelta=_dt.timedelta
        )
        (setattr_ or setattr)(checkpoint_manager, "datetime", shim)
        return self
