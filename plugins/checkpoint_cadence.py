"""When :class:`~nnx_trainer_plugins.orbax_checkpoint.OrbaxCheckpoint` saves.

Orbax's ``save_decision_policy`` decides, from the plugin's options:
``every_n_steps=N`` is ``FixedIntervalPolicy(N)`` and ``every_n_epochs=N``
``FixedIntervalPolicy(N * steps_per_epoch)``, both exact. Neither given (the default):
every epoch *and* ``ContinuousCheckpointingPolicy(minimum_interval_secs=...)``, whose
time-based answer process 0 takes and broadcasts. With a ``monitor``, the default cadence
also saves every validation whose value ranks among the ``keep_best`` best
(:func:`ranks_among_best`, Lightning's ``save_top_k`` test), throttle or not, so that
``ckpt_path="best"`` is the best validated, not the best of the steps the clock let through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orbax.checkpoint import checkpoint_managers as policies


@dataclasses.dataclass
class AllSavePolicy(policies.SaveDecisionPolicy):
    """Save when every policy says so (Orbax has ``AnySavePolicy`` but no "all").

    The default cadence is "an epoch end *and* a minute since the last save". Policies
    are asked in order and the first False stops: the deterministic
    ``FixedIntervalPolicy`` goes first, so every process reaches the
    ``ContinuousCheckpointingPolicy`` (process 0 decides, the others block on its
    broadcast) at the same steps, together.
    """

    policies: Sequence[policies.SaveDecisionPolicy]

    def should_save(self, step, previous_steps, *, context) -> bool:
        return all(p.should_save(step, previous_steps, context=context) for p in self.policies)


def save_decision(every_n_steps: int | None, every_n_epochs: int | None,
                  min_seconds_between_saves: float,
                  steps_per_epoch: int) -> policies.SaveDecisionPolicy:
    """Orbax's policy for the cadence options (the module doc). No
    ``PreemptionCheckpointingPolicy``: the loop saves on SIGTERM/SIGINT itself."""
    per_epoch = policies.FixedIntervalPolicy(max(1, steps_per_epoch))
    if every_n_steps is None and every_n_epochs is None:  # the default cadence
        if not min_seconds_between_saves:
            return per_epoch
        return AllSavePolicy([per_epoch, policies.ContinuousCheckpointingPolicy(
            minimum_interval_secs=min_seconds_between_saves)])
    steps = [every_n_steps, (every_n_epochs or 0) * max(1, steps_per_epoch)]
    chosen = [policies.FixedIntervalPolicy(n) for n in steps if n]
    return policies.AnySavePolicy(chosen or [policies.SpecificStepsPolicy(())])


def ranks_among_best(value: float, saved: Sequence[float], keep_best: int, mode: str) -> bool:
    """Whether ``value`` would be one of the ``keep_best`` best next to the ``saved`` values
    (``mode`` ``"min"`` or ``"max"``); a tie with the K-th best does not displace it."""
    ranked = sorted(saved, reverse=mode == "max")
    if len(ranked) < keep_best:
        return True
    kth = ranked[keep_best - 1]
    return value > kth if mode == "max" else value < kth
