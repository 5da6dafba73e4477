"""A fake wall clock for Orbax's save decisions (tests only).

Orbax's ``CheckpointManager`` stamps each step with ``datetime.datetime.now()`` read in
``orbax.checkpoint.checkpoint_manager`` (for ``should_save`` and for each save), and its
``ContinuousCheckpointingPolicy`` compares those stamps. Replacing that module's
``datetime`` with a shim whose ``now()`` returns ``clock.seconds`` (plus ``skew``) makes
the throttle deterministic, and lets a process's clock run ahead of another's.
"""

from __future__ import annotations

import datetime as _dt
import types

EPOCH = 1_700_000_000.0


class FakeClock:
    def __init__(self, seconds: float = 0.0, skew: float = 0.0) -> None:
        self.seconds, self.skew = seconds, skew

    def install(self, setattr_=None) -> FakeClock:
        """Patch Orbax's checkpoint_manager (``setattr_``: e.g. ``monkeypatch.setattr``)."""
        from orbax.checkpoint import checkpoint_manager

        clock = self

        class FakeDateTime(_dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return _dt.datetime.fromtimestamp(EPOCH + clock.seconds + clock.skew, tz=tz)

        shim = types.SimpleNamespace(
            datetime=FakeDateTime, timezone=_dt.timezone, timedelta=_dt.timedelta
        )
        (setattr_ or setattr)(checkpoint_manager, "datetime", shim)
        return self
