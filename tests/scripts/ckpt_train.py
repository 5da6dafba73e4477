"""Train TinyTask with the Orbax checkpoint plugin; record what a resume test compares.

Used by tests/test_resume.py as a real process that can be killed. Files it writes
(all optional, each appended or written by this process only):

- ``--losses``: one line per step, ``<global step index> <repr(float loss)>``;
- ``--vals``: one line per validation, ``<global_step> <repr(val/loss)>``;
- ``--out``: JSON at the end of fit: start step, end step, counter, preempted;
- ``--params``: ``.npz`` of every array of the final training state (exact compare).

Faults on request: ``--kill-at-step K`` (SIGKILL itself once step K is completed and
every save so far is committed), ``--sigterm-at-step K`` (SIGTERM itself after step K),
``--hang-save-at K`` (the commit of checkpoint K never happens; once it is in flight
the process SIGKILLs itself), ``--step-sleep S`` (slow steps, so a parent can signal).
``--stream`` trains on a ``grain.IterDataset`` (tiny_task.StreamingTinyTask).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

# Only light imports at the top: Grain's worker processes are spawned and import this
# module again (as __mp_main__); JAX and the trainer load in main() only.


def build_plugins(args: argparse.Namespace):
    """The counter and recorder plugins (defined here, after nnx_trainer is imported)."""
    import nnx_trainer

    class Counter:
        """A plugin with state: counts training batches across resumes."""

        name = "counter"

        def __init__(self) -> None:
            self.batches = 0

        @nnx_trainer.hookimpl
        def on_train_batch_end(self) -> None:
            self.batches += 1

        @nnx_trainer.hookimpl
        def state_dict(self):
            return {"counter": {"batches": self.batches}}

        @nnx_trainer.hookimpl
        def load_state_dict(self, state):
            self.batches = int(state.get("counter", {}).get("batches", 0))

    class Record:
        """Appends each step's loss and each validation loss to files; injects faults."""

        def __init__(self, args: argparse.Namespace) -> None:
            self.args = args
            self.start_step: int | None = None

        def _append(self, path: str | None, line: str) -> None:
            if path:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")

        @nnx_trainer.hookimpl
        def on_fit_start(self, trainer) -> None:
            self.start_step = trainer.global_step

        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer, step, loss) -> None:
            self._append(self.args.losses, f"{step} {float(loss)!r}")
            if self.args.step_sleep:
                time.sleep(self.args.step_sleep)
            if trainer.global_step == self.args.kill_at_step:
                trainer.hook.wait_for_checkpoints(trainer=trainer)  # "between saves"
                os.kill(os.getpid(), signal.SIGKILL)
            if trainer.global_step == self.args.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            hang = self.args.hang_save_at
            if hang is not None and trainer.global_step > hang:
                flag = Path(self.args.run_dir) / "commit_hanging"
                deadline = time.monotonic() + 60
                while not flag.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)

        @nnx_trainer.hookimpl
        def log_metrics(self, metrics, step) -> None:
            if "val/loss" in metrics:
                self._append(self.args.vals, f"{step} {float(metrics['val/loss'])!r}")

    return Counter(), Record(args)


def hang_commit_of(step: int, run_dir: str) -> None:
    """Make orbax's final rename of checkpoint ``step`` wait forever (the data is written)."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        final = self.get_final()
        if final.name == str(step) and final.parent.name == "checkpoints":
            # Written aside, then renamed: the main thread kills the process as soon as
            # the flag exists, which must not be before its text is in it.
            flag = Path(run_dir) / "commit_hanging"
            flag.with_suffix(".writing").write_text(str(self.get()))
            os.replace(flag.with_suffix(".writing"), flag)
            await asyncio.sleep(3600)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--resume", default=None, help="ckpt_path for fit (e.g. last)")
    p.add_argument("--every-n-steps", type=int, default=None)
    p.add_argument("--every-n-epochs", type=int, default=1)
    p.add_argument("--monitor", default=None)
    p.add_argument("--keep-best", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=1)
    p.add_argument("--losses")
    p.add_argument("--vals")
    p.add_argument("--out")
    p.add_argument("--params")
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--sigterm-at-step", type=int, default=None)
    p.add_argument("--hang-save-at", type=int, default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--stream", action="store_true", help="train on a grain.IterDataset")
    args = p.parse_args()

    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_task import StreamingTinyTask, TinyTask

    import nnx_trainer
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    if args.hang_save_at is not None:
        hang_commit_of(args.hang_save_at, args.run_dir)
    counter, record = build_plugins(args)
    checkpoint = OrbaxCheckpoint(
        every_n_steps=args.every_n_steps, every_n_epochs=args.every_n_epochs,
        monitor=args.monitor, keep_best=args.keep_best, keep_last=args.keep_last,
        min_seconds_between_saves=0,  # the tests count saves
    )
    trainer = nnx_trainer.Trainer(
        run_dir=args.run_dir, max_steps=args.max_steps, batch_size=args.batch_size,
        worker_count=args.workers, log_every_n_steps=3, plugin_autoload=False,
        plugins=[checkpoint, counter, record],
    )
    trainer.fit(StreamingTinyTask() if args.stream else TinyTask(), ckpt_path=args.resume)
    if args.params:
        leaves = jax.tree.leaves(trainer.checkpoint_state().arrays())
        np.savez(args.params, *[np.asarray(x) for x in leaves])
    if args.out:
        Path(args.out).write_text(json.dumps({
            "start_step": record.start_step, "end_step": trainer.global_step,
            "counter": counter.batches, "preempted": trainer.preempted,
            "saved_steps": checkpoint.saved_steps,
        }))
    print(f"done: steps {record.start_step}..{trainer.global_step} preempted={trainer.preempted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
