"""Fit TinyTask as ``nnx-trainer fit --task tiny_task:TinyTask`` with checkpoints every 2
steps would, then hold the run directory: a live run for tests/test_run_lock.py.

Once the checkpoint of step ``--hold-at-step`` (K) is committed, inside step K + 1 (before
its metrics are logged), it writes the file ``--ready`` and sleeps until it is killed.
``config.yaml`` is written as the command line's fit writes it (``nnx_trainer.config_file``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_task


def settled(run_dir: Path, quiet_seconds: float = 1.0, limit_seconds: float = 60.0) -> None:
    """Return once the list of files under ``run_dir`` stayed the same for ``quiet_seconds``."""
    def listing() -> list[str]:
        return sorted(str(p) for p in run_dir.rglob("*"))

    deadline, last = time.monotonic() + limit_seconds, None
    while time.monotonic() < deadline:
        try:
            current = listing()
        except FileNotFoundError:  # a folder vanished while it was walked
            current = None
        if current is not None and current == last:
            return
        last = current
        time.sleep(quiet_seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--hold-at-step", type=int, default=4)
    parser.add_argument("--ready", required=True)
    args = parser.parse_args()

    from tiny_task import TinyTask

    import nnx_trainer
    from nnx_trainer.config_file import ConfigFile
    from nnx_trainer_plugins.jsonl_logger import JsonlLogger
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    class Hold:
        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer) -> None:
            # In step K + 1, before its metrics: step K's save point has passed.
            if trainer.global_step == args.hold_at_step + 1:
                trainer.hook.wait_for_checkpoints(trainer=trainer)
                # Orbax deletes the checkpoints beyond max_to_keep in a background thread:
                # the test snapshots the files, so wait until nothing changes any more.
                settled(Path(args.run_dir))
                Path(args.ready).write_text(str(os.getpid()))
                while True:
                    time.sleep(1)

    trainer = nnx_trainer.Trainer(
        max_steps=100, batch_size=16, log_every_n_steps=1, run_dir=args.run_dir,
        plugin_autoload=False,
        plugins=[JsonlLogger(), OrbaxCheckpoint(every_n_steps=2), Hold(),
                 ConfigFile(lambda run_dir: f"trainer: {{run_dir: {run_dir}}}\n")],
    )
    trainer.fit(TinyTask())


if __name__ == "__main__":
    main()
