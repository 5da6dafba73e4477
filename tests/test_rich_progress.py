"""RichProgress: live bar on terminals, plain lines elsewhere, clean stops, lazy loss reads."""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import pytest
from rich.console import Console
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.plugin_manager import create_plugin_manager
from nnx_trainer_plugins._progress_parts import train_metric_rows
from nnx_trainer_plugins.rich_progress import RichProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120), buf


class LastLoss:
    """Keeps the last step's loss (a device scalar) to compare with what the bar shows."""

    name = "last_loss"
    loss = None

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, loss):
        self.loss = loss


class FailingTask(TinyTask):
    """Raises while the train step is traced, i.e. inside the training loop."""

    def training_step(self, model, batch):
        raise ValueError("boom in training_step")


class RaiseAtStep:
    """A plugin that fails in the middle of an epoch, while the live bar is running."""

    name = "raise_at_step"

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, step):
        if step == 3:
            raise RuntimeError("plugin failed at step 3")


def test_terminal_fit_shows_bar_validation_tables_and_summary(tmp_path):
    console, buf = _console(terminal=True)
    plugin, last = RichProgress(console=console), LastLoss()
    make_trainer(tmp_path, plugin, last, batch_size=8, max_epochs=2).fit(TinyTask())
    text = ANSI.sub("", buf.getvalue())
    assert "Epoch 1/2" in text and "Epoch 2/2" in text
    assert "Validate metrics, step 8" in text and "Validate metrics, step 16" in text
    assert "val/accuracy" in text and "val/loss" in text
    assert "Fit summary" in text
    # The tiny task is tabular: examples/s, never images/s (the engine names no modality).
    assert "images/s" not in text
    for row in ("steps/s", "examples/s", "data wait", "compile", "last train loss"):
        assert row in text
    assert not plugin.progress.live.is_started
    # The loss shown is a real host float: the last step's loss, read from the device.
    assert isinstance(plugin.loss, float)
    assert plugin.loss == float(last.loss)
    assert f"loss {plugin.loss:.4f}" in text


def test_plain_output_has_no_control_codes_and_one_line_per_epoch(tmp_path):
    console, buf = _console(terminal=False)
    plugin = RichProgress(console=console)
    make_trainer(tmp_path, plugin, batch_size=8, max_epochs=3).fit(TinyTask(n_train=32))
    out = buf.getvalue()
    assert "\x1b" not in out and "\r" not in out
    assert plugin.progress is None  # no live display was ever created
    lines = out.splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    for n, line in enumerate(epoch_lines, start=1):
        pattern = rf"epoch {n}/3  step {4 * n}/12  loss \d+\.\d{{4}}  [\d.]+ steps/s"
        assert re.fullmatch(pattern, line)
    val_lines = [line for line in lines if line.startswith("validate  step ")]
    assert [line.split()[2] for line in val_lines] == ["4", "8", "12"]
    assert all("val/accuracy" in line and "val/loss" in line for line in val_lines)
    assert "fit summary" in lines
    assert any(re.fullmatch(r"  examples/s\s+[\d.]+", line) for line in lines)
    # TinyTask's only train metric is the loss: the last step's loss has its own row.
    assert not any(line.startswith("  train/") for line in lines)
    assert "compiling the train step…" in lines  # said once, before the first step
    assert len(lines) < 25  # short CI logs


def test_the_summary_shows_the_last_logged_train_metrics_but_the_loss():
    logged = {"train/loss": jnp.float32(0.5), "train/skipped_images": jnp.int32(3),
              "train/accuracy": jnp.float32(0.75), "val/loss": jnp.float32(1.0), "epoch": 2}
    # A count stays an integer; other metrics are formatted as the val metrics are.
    assert train_metric_rows(logged) == [("train/accuracy", "0.7500"),
                                         ("train/skipped_images", "3")]


@pytest.mark.parametrize(
    ("task", "extra", "error"),
    [
        (FailingTask(), [], "boom in training_step"),
        (TinyTask(), [RaiseAtStep()], "plugin failed at step 3"),
    ],
    ids=["training_step_raises", "plugin_raises_mid_epoch"],
)
def test_exception_stops_live_display_and_propagates(tmp_path, task, extra, error):
    console, buf = _console(terminal=True)
    plugin = RichProgress(console=console)
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises((ValueError, RuntimeError), match=error):
        make_trainer(tmp_path, plugin, *extra, batch_size=8, max_epochs=2).fit(task)
    assert plugin.progress is not None and not plugin.progress.live.is_started
    # Live redirects stdout/stderr while running; both must be back for the traceback.
    assert sys.stdout is stdout and sys.stderr is stderr
    assert "stopped at step" in ANSI.sub("", buf.getvalue())


def test_fit_does_not_read_the_loss_every_step(tmp_path, monkeypatch):
    # Count every implicit device->host read of a JAX scalar during a 50-step fit.
    array_type = type(jnp.zeros(()))
    original = array_type.__float__
    reads = []

    def counting_float(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(array_type, "__float__", counting_float)
    console, _ = _console(terminal=True)
    # A clock that never advances: the refresh interval never elapses during the epoch.
    plugin = RichProgress(console=console, refresh_per_second=0.01, clock=lambda: 0.0)
    trainer = make_trainer(tmp_path, plugin, batch_size=8, max_steps=50, log_every_n_steps=1000)
    trainer.fit(TinyTask(n_train=400, n_val=0))
    assert trainer.global_step == 50
    assert 1 <= len(reads) <= 2  # the epoch-end read (and at most one more), not 50
    assert isinstance(plugin.loss, float)


def _hooks(*plugins) -> Any:
    """The hook caller of a run with only ``plugins`` (what ``trainer.hook`` is)."""
    return create_plugin_manager(plugins=list(plugins), autoload=False).hook


def _stub_trainer(**overrides) -> SimpleNamespace:
    values = dict(
        is_main_process=True, global_step=0, batch_in_epoch=0, steps_per_epoch=50,
        total_steps=50, max_epochs=1, current_epoch=0, task=None, hook=_hooks(),
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_loss_fetch_cadence_follows_refresh_interval():
    now = [0.0]

    def clock() -> float:  # 0.25 s per call: exact in binary, so the count is exact
        now[0] += 0.25
        return now[0]

    console, _ = _console(terminal=True)
    plugin = RichProgress(console=console, refresh_per_second=1.0, clock=clock)
    trainer = _stub_trainer()
    fetched = []
    original = plugin._fetch_loss
    plugin._fetch_loss = lambda: fetched.append(trainer.global_step) or original()
    plugin.on_fit_start(trainer=trainer)
    plugin.on_train_epoch_start(trainer=trainer, epoch=0)
    for step in range(50):
        trainer.global_step += 1
        trainer.batch_in_epoch += 1
        plugin.on_train_batch_end(trainer=trainer, loss=jnp.asarray(float(step)))
    plugin.on_run_end(trainer=trainer, stage="fit", outcome="exception",
                      exception=KeyboardInterrupt())
    # Interval 1 s = 4 calls: fetched after steps 4, 8, ..., 48 (12 of 50 steps).
    assert fetched == list(range(4, 49, 4))
    assert plugin.loss == 47.0
    assert not plugin.progress.live.is_started


def test_force_overrides_terminal_detection():
    console, _ = _console(terminal=True)
    plugin = RichProgress(console=console, force=False)
    plugin.on_fit_start(trainer=_stub_trainer())
    assert plugin.progress is None

    console, _ = _console(terminal=False)
    plugin = RichProgress(console=console, force=True)
    plugin.on_fit_start(trainer=_stub_trainer())
    assert plugin.progress.live.is_started
    plugin.on_run_end(trainer=_stub_trainer(), stage="fit", outcome="exception",
                      exception=RuntimeError())
    assert not plugin.progress.live.is_started


def test_only_the_main_process_displays():
    console, buf = _console(terminal=True)
    plugin = RichProgress(console=console)
    trainer = _stub_trainer(is_main_process=False)
    plugin.on_fit_start(trainer=trainer)
    plugin.on_train_epoch_start(trainer=trainer, epoch=0)
    plugin.on_train_batch_end(trainer=trainer, loss=jnp.asarray(1.0))
    plugin.on_validation_end(trainer=trainer, stage="validate", metrics={"val/loss": 1.0})
    plugin.on_train_epoch_end(trainer=trainer, epoch=0)
    assert plugin.progress is None and buf.getvalue() == ""


def test_defaults_entry_point_and_options(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert RichProgress().console.no_color  # Rich's own NO_COLOR handling applies
    with pytest.raises(ValueError, match="refresh_per_second"):
        RichProgress(refresh_per_second=0)
    loaded = nnx_trainer.Trainer(plugin_autoload=False, plugins=["progress"])
    assert isinstance(loaded.plugin_manager.get_plugin("progress"), RichProgress)
    mine = RichProgress(refresh_per_second=2)
    replaced = nnx_trainer.Trainer(plugin_autoload=False, plugins=[mine, "progress"])
    assert replaced.plugin_manager.get_plugin("progress") is mine


class FakeCheckpoint:
    """Stands in for the checkpoint plugin: only its directory matters here."""

    name = "checkpoint"

    def __init__(self, directory) -> None:
        self.directory = directory

    @nnx_trainer.hookimpl
    def checkpoint_dir(self, trainer):
        return self.directory


class ImageTask(TinyTask):
    example_name = "images"


def test_checkpoint_directory_saves_compile_notice_and_the_tasks_example_name(tmp_path):
    console, buf = _console(terminal=True)
    plugin = RichProgress(console=console)
    seen = []

    class Descriptions:
        @nnx_trainer.hookimpl
        def on_train_batch_start(self, step):
            if plugin._train_task is not None:
                seen.append(plugin.progress.tasks[0].description)

    ckpt_dir = tmp_path / "ckpts"
    make_trainer(tmp_path, plugin, FakeCheckpoint(ckpt_dir), Descriptions(), batch_size=8,
                 max_epochs=2).fit(ImageTask())
    text = ANSI.sub("", buf.getvalue())
    assert f"checkpoints: {ckpt_dir}" in text
    assert "checkpoint: saving step 16 (end)" in text
    # The first step's bar says it is compiling; once the step is back it is the epoch.
    assert seen[0] == "Epoch 1/2 · compiling the train step…"
    assert seen[1:] == ["Epoch 1/2"] * 7 + ["Epoch 2/2"] * 8
    assert "images/s" in text and "examples/s" not in text


def test_resumed_fit_says_where_from(tmp_path):
    console, buf = _console(terminal=False)
    plugin = RichProgress(console=console)
    trainer = _stub_trainer(global_step=12, current_epoch=1, batch_in_epoch=2,
                            steps_per_epoch=10, total_steps=30,
                            resumed_from=str(tmp_path / "checkpoints" / "12"))
    plugin.on_fit_start(trainer=trainer)
    assert f"resumed from {tmp_path / 'checkpoints' / '12'} at step 12 (epoch 2/3, 2 of " \
        "its batches done)" in buf.getvalue()
    fresh = RichProgress(console=_console(terminal=False)[0])
    fresh.on_fit_start(trainer=_stub_trainer(resumed_from=None))
    assert "resumed" not in fresh.console.file.getvalue()


def test_stop_signal_notice_is_printed_once_on_its_own_line():
    import logging

    console, buf = _console(terminal=True)
    plugin = RichProgress(console=console)
    trainer = _stub_trainer(preempted=False, stop_reason=None)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    engine_log = logging.getLogger("nnx_trainer")
    engine_log.addHandler(handler)
    try:
        plugin.on_fit_start(trainer=trainer)
        plugin.on_train_epoch_start(trainer=trainer, epoch=0)
        trainer.global_step = trainer.batch_in_epoch = 1
        plugin.on_train_batch_end(trainer=trainer, loss=jnp.asarray(1.0))
        # What the engine's SIGINT handler does mid-step: log, then set the flags.
        engine_log.warning("received %s: stopping after the current step", "SIGINT")
        trainer.preempted, trainer.stop_reason = True, "SIGINT"
        trainer.global_step = trainer.batch_in_epoch = 2
        plugin.on_train_batch_end(trainer=trainer, loss=jnp.asarray(1.0))
        plugin.on_save_checkpoint(trainer=trainer, step=2, reason="preemption")
        plugin.on_run_end(trainer=trainer, stage="fit", outcome="preempted", exception=None)
        engine_log.warning("received %s: after the display", "SIGINT")
    finally:
        engine_log.removeHandler(handler)
    # Held back while the bar ran (it would land inside it); let through afterwards.
    assert [r.getMessage() for r in records] == ["received SIGINT: after the display"]
    lines = ANSI.sub("", buf.getvalue()).replace("\r", "\n").splitlines()
    notice = [ln for ln in lines if "received SIGINT" in ln]
    assert len(notice) == 1
    assert notice[0].strip() == ("received SIGINT: stopping after the current step and saving "
                                 "a checkpoint; press Ctrl-C again to kill the run at once")
    assert any(ln.startswith("preempted (SIGINT) at step 2") for ln in lines)
    assert not plugin.progress.live.is_started


def test_one_line_per_saved_step():
    console, buf = _console(terminal=False)
    plugin = RichProgress(console=console)
    checkpoint = FakeCheckpoint("/ckpts")
    trainer = _stub_trainer(hook=_hooks(checkpoint))
    plugin.on_fit_start(trainer=trainer)
    for step, reason in [(4, "periodic"), (8, "periodic"), (8, "end")]:  # 8: one save
        plugin.on_save_checkpoint(trainer=trainer, step=step, reason=reason)
    assert [ln for ln in buf.getvalue().splitlines() if ln.startswith("checkpoint")] == [
        "checkpoints: /ckpts", "checkpoint: saving step 4 (periodic)",
        "checkpoint: saving step 8 (periodic)",
    ]
