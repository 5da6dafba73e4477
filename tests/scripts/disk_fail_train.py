"""Train TinyTask with the run's writers while the test breaks the disk under it.

Used by tests/test_disk_failure.py as a real process. ``--pause-at K``: at the end of
step K (a save *at* step K comes after it: pause at K + 1 to have it), once every save
so far is committed, the process creates ``<signals>/paused``
and waits (up to 120 s) for ``<signals>/go``; meanwhile the test makes the disk full
or read-only. The run's errors are reported as the command line reports them (one
line, the exit status of ``nnx_trainer.cli.failure_status``); anything else raises.

``--writers`` picks the plugins (``checkpoint``, ``jsonl``, ``tensorboard``, ``curves``);
``--ckpt-dir`` puts the checkpoints elsewhere (so a logger meets the full disk first).
``--orbax-async-dirs`` restores Orbax's default of making step directories in a
background thread: the case that used to hang, for the last-resort exit.

Where the test cannot mount a file system (not root), ``--inject-under DIR`` breaks the
disk in here instead: when ``<signals>/go`` holds an errno, from then on every Python
file call that would write under DIR (``open`` for writing, ``mkdir``, ``fsync``)
fails with it, as a full or read-only disk answers.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import sys
import time
from pathlib import Path


def inject(under: Path, code: int) -> None:
    """Make every Python write under ``under`` fail with ``OSError(code)`` from now on."""
    real_open, real_mkdir, real_fsync = io.open, os.mkdir, os.fsync
    root = str(under.resolve())

    def hit(path) -> bool:
        return os.path.abspath(os.fsencode(path)).decode().startswith(root)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and set(mode) & set("wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        return fail(path) if hit(path) else real_mkdir(path, *args, **kwargs)

    def fsync(fd):  # a file opened before the disk broke (an event file)
        path = os.readlink(f"/proc/self/fd/{fd}")
        return fail(path) if hit(path) else real_fsync(fd)

    builtins.open = io.open = open_
    os.mkdir, os.fsync = mkdir, fsync


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--writers", default="checkpoint")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--every-n-steps", type=int, default=10)
    p.add_argument("--resume", default=None)
    p.add_argument("--pause-at", type=int, default=None)
    p.add_argument("--signals", default=None)
    p.add_argument("--orbax-async-dirs", action="store_true")
    p.add_argument("--inject-under", default=None)
    args = p.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_task import TinyTask

    import nnx_trainer
    from nnx_trainer.cli import error_message, failure_status

    if args.orbax_async_dirs:
        from nnx_trainer_plugins import checkpoint_writes

        checkpoint_writes.OPTIONS.clear()

    class Pause:
        """Stops after step ``--pause-at`` until the test has broken the disk."""

        start: int | None = None

        @nnx_trainer.hookimpl
        def on_fit_start(self, trainer) -> None:
            self.start = trainer.global_step

        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer) -> None:
            if trainer.global_step != args.pause_at:
                return
            trainer.hook.wait_for_checkpoints(trainer=trainer)
            signals = Path(args.signals)
            (signals / "paused").write_text(str(trainer.global_step))
            deadline = time.monotonic() + 120
            while not (signals / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            code = (signals / "go").read_text().strip()
            if args.inject_under and code:
                inject(Path(args.inject_under), int(code))

    writers = set(args.writers.split(","))
    pause = Pause()
    plugins: list = [pause]
    if "checkpoint" in writers:
        from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

        plugins.append(OrbaxCheckpoint(every_n_steps=args.every_n_steps, keep_last=3,
                                       directory=args.ckpt_dir))
    if "jsonl" in writers:
        from nnx_trainer_plugins.jsonl_logger import JsonlLogger

        plugins.append(JsonlLogger())
    if "tensorboard" in writers:
        from nnx_trainer_plugins.tensorboard_logger import TensorBoardLogger

        plugins.append(TensorBoardLogger())
    if "curves" in writers:
        from nnx_trainer_plugins.curves_plot import CurvesPlot

        plugins.append(CurvesPlot())
    trainer = nnx_trainer.Trainer(
        run_dir=args.run_dir, max_steps=args.max_steps, batch_size=16, log_every_n_steps=3,
        plugin_autoload=False, plugins=plugins,
    )
    try:
        trainer.fit(TinyTask(), ckpt_path=args.resume)
    except Exception as exc:  # as nnx-trainer fit and the example report it
        status = failure_status(exc)
        if status is None:
            raise
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return status
    print(f"done: steps {pause.start}..{trainer.global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
