"""Preemption: SIGTERM/SIGINT during fit ask for a clean stop after the current step."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax

from nnx_trainer.progress import FitProgress

log = logging.getLogger("nnx_trainer")


class PreemptionSignals:
    """Installs the fit's SIGTERM/SIGINT handlers, which mark ``progress`` preempted.

    A second SIGINT falls through to the default handler, so Ctrl-C twice still
    kills a stuck run. Handlers are only installed from the main thread.

    With more than one process and JAX's preemption service on (``jax.distributed``
    starts it by default), SIGTERM is left to that service (``coordinated``): it
    catches the signal in whichever process gets it, tells every process, and agrees
    on the step after which all of them stop (``reached_preemption_sync_point``, see
    :func:`stop_together`). A Python handler here would replace its handler and stop
    one process alone, which the others' next collective would then wait for forever.
    """

    def __init__(self, progress: FitProgress, process_count: int) -> None:
        self.progress = progress
        self.previous: dict[int, Any] = {}
        self.coordinated = process_count > 1 and bool(jax.config.jax_enable_preemption_service)
        self.signals = (signal.SIGINT,) if self.coordinated else (
            signal.SIGTERM, signal.SIGINT)

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.progress.stop(signal.Signals(signum).name, preempted=True)
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> PreemptionSignals:
        try:
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals to the host program
            self.previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop_together(progress: FitProgress, process_count: int) -> None:
    """Every process reached the agreed step after a preemption notice: stop here."""
    log.warning("preemption notice (SIGTERM to one of %d processes): every process "
                "stops after step %d and saves", process_count, progress.global_step)
    progress.stop("SIGTERM", preempted=True)
