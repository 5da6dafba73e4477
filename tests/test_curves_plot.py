"""CurvesPlot: a valid PNG of the logged series, when and only when there is something to draw."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from PIL import Image
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.plugin_manager import create_plugin_manager
from nnx_trainer_plugins.curves_plot import CurvesPlot, draw, family_of, panels
from nnx_trainer_plugins.jsonl_logger import JsonlLogger

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("curves") / "exp-7"
    plot = CurvesPlot()
    trainer = make_trainer(run_dir, plot, JsonlLogger(), max_epochs=2, batch_size=8,
                           log_every_n_steps=3)
    trainer.fit(TinyTask())  # 16 steps; validation at steps 8 and 16
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(plot=plot, trainer=trainer, run_dir=run_dir, jsonl=jsonl)


def test_png_written_at_fit_end(run):
    path = run.run_dir / "curves.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not (run.run_dir / "curves.png.tmp").exists()
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        # Two panels (loss, accuracy) side by side, 5.2 x 3.8 inches each at 100 dpi.
        assert image.format == "PNG" and image.size == (1040, 380)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 20  # lines, text, antialiasing: not a blank canvas
    assert 10_000 < path.stat().st_size < 1_000_000


def test_collected_series_are_the_logged_values(run):
    history = run.plot.history
    assert set(history) == {"train/loss", "val/loss", "val/accuracy"}  # no "epoch"
    assert [s for s, _ in history["train/loss"]] == [3, 6, 9, 12, 15, 16]
    assert [s for s, _ in history["val/loss"]] == [8, 16]
    expected = {(line["step"], k): v for line in run.jsonl for k, v in line.items()
                if "/" in k}
    for name, points in history.items():
        for step, value in points:
            assert math.isclose(value, expected[(step, name)], rel_tol=1e-6)


def test_figure_plots_each_series_in_its_panel(run):
    assert panels(run.plot.history) == {
        "loss": ["train/loss", "val/loss"], "accuracy": ["val/accuracy"]
    }
    fig = draw(run.plot.history, "exp-7")
    loss, accuracy = [ax for ax in fig.axes if ax.get_visible()]
    assert (loss.get_title(), accuracy.get_title()) == ("loss", "accuracy")
    assert loss.get_xlabel() == "step" and loss.get_ylabel() == "loss"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train/loss", "val/loss"]
    for ax in (loss, accuracy):
        for line in ax.get_lines():
            points = run.plot.history[line.get_label()]
            assert list(line.get_xdata()) == [s for s, _ in points]
            assert list(line.get_ydata()) == [v for _, v in points]
    assert fig._suptitle.get_text() == "exp-7"


def test_family_of():
    assert family_of("train/loss") == family_of("val/loss") == "loss"
    assert family_of("test/top_5") == "top_5" and family_of("lr") == "lr"
    assert family_of("optim/lr") == "optim/lr"  # unknown prefix: its own panel


def _stub(run_dir: Path, step: int = 0, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(run_dir=run_dir, global_step=step, is_main_process=main)


def _hook(plot: CurvesPlot):
    """The plugin's hooks through pluggy, called as the engine calls them."""
    return create_plugin_manager(plugins=[plot], autoload=False).hook


def test_nothing_logged_nothing_drawn(tmp_path):
    hook, trainer = _hook(CurvesPlot()), _stub(tmp_path / "run")
    hook.on_fit_start(trainer=trainer, task=None)
    for outcome in ("completed", "preempted"):
        hook.on_run_end(trainer=trainer, stage="fit", outcome=outcome, exception=None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("outcome", ["completed", "stopped", "preempted", "exception"])
def test_drawn_when_the_fit_ends_whatever_the_outcome(tmp_path, outcome):
    plot = CurvesPlot(filename="c.png", title="custom")
    hook, trainer = _hook(plot), _stub(tmp_path)
    hook.on_fit_start(trainer=trainer, task=None)
    hook.log_metrics(trainer=trainer, metrics={"train/loss": jnp.asarray(1.0)}, step=2)
    hook.log_metrics(trainer=trainer, metrics={"train/loss": jnp.asarray(jnp.nan)}, step=4)
    assert not (tmp_path / "c.png").exists()  # inside fit: not drawn per log
    exception = RuntimeError("diverged") if outcome == "exception" else None
    hook.on_run_end(trainer=trainer, stage="fit", outcome=outcome, exception=exception)
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


def test_checkpoint_saves_do_not_draw(tmp_path):
    hook, trainer = _hook(CurvesPlot()), _stub(tmp_path)
    hook.on_fit_start(trainer=trainer, task=None)
    hook.log_metrics(trainer=trainer, metrics={"train/loss": 1.0}, step=2)
    for reason in ("periodic", "preemption"):
        hook.on_save_checkpoint(trainer=trainer, step=2, reason=reason)
    assert not (tmp_path / "curves.png").exists()


def test_a_real_preempted_fit_draws_its_curves(tmp_path):
    class Preempt:
        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer, step):
            if step == 4:
                trainer.preempted, trainer.stop_reason = True, "SIGTERM"

    trainer = make_trainer(tmp_path, CurvesPlot(), Preempt(), max_epochs=2, batch_size=8,
                           log_every_n_steps=2)
    trainer.fit(TinyTask())
    assert trainer.global_step == 5
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_standalone_evaluation_draws_right_away(tmp_path):
    plot = CurvesPlot()
    plot.log_metrics(trainer=_stub(tmp_path), metrics={"test/accuracy": 0.5}, step=10)
    assert (tmp_path / "curves.png").exists() and plot.history == {"test/accuracy": [(10, 0.5)]}


def test_state_round_trip_and_resume_truncation(tmp_path):
    plot = CurvesPlot()
    trainer = _stub(tmp_path)
    plot.on_fit_start(trainer=trainer)
    for step, loss in [(3, 1.0), (6, math.inf), (9, 0.5)]:
        plot.log_metrics(trainer=trainer, metrics={"train/loss": loss, "epoch": 0}, step=step)
    state = dict(plot.state_dict())
    json.dumps(state, allow_nan=False)  # checkpoint metadata must be strict JSON
    resumed = CurvesPlot()
    resumed.load_state_dict(state=state)
    assert [s for s, _ in resumed.history["train/loss"]] == [3, 6, 9]
    assert math.isnan(resumed.history["train/loss"][1][1])
    resumed.on_fit_start(trainer=_stub(tmp_path, step=6))  # resumed from the step-6 checkpoint
    assert [s for s, _ in resumed.history["train/loss"]] == [3, 6]
    resumed.on_fit_start(trainer=_stub(tmp_path, step=0))  # a fresh fit starts over
    assert resumed.history == {}


def test_vectors_skipped_and_non_main_or_disabled_collect_nothing(tmp_path):
    plot = CurvesPlot()
    plot.on_fit_start(trainer=_stub(tmp_path))
    plot.log_metrics(trainer=_stub(tmp_path), metrics={"val/per_class": [0.1, 0.2]}, step=1)
    assert plot.history == {}
    for plot, trainer in [(CurvesPlot(), _stub(tmp_path, main=False)),
                          (CurvesPlot(enabled=False), _stub(tmp_path))]:
        plot.log_metrics(trainer=trainer, metrics={"val/loss": 1.0}, step=1)
        plot.on_run_end(trainer=trainer, stage="fit", outcome="completed")
        assert plot.history == {}
    assert not (tmp_path / "curves.png").exists()


def test_bad_filename_rejected():
    with pytest.raises(ValueError, match="plain file name"):
        CurvesPlot(filename="../x.png")


def test_importing_the_logging_plugins_imports_no_heavy_library():
    """Autoload instantiates every plugin: it must not pay for matplotlib/tensorboardX/wandb."""
    code = (
        "import sys\n"
        "from nnx_trainer_plugins.curves_plot import CurvesPlot\n"
        "from nnx_trainer_plugins.tensorboard_logger import TensorBoardLogger\n"
        "from nnx_trainer_plugins.wandb_logger import WandbLogger\n"
        "CurvesPlot(); TensorBoardLogger(); WandbLogger()\n"
        "print(sorted(m for m in ('matplotlib', 'tensorboardX', 'wandb') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=120,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_only_changing_series_are_plotted_and_the_rest_is_named_in_the_title():
    from nnx_trainer_plugins.curves_plot import changing_series

    examples = [(20, 3000.0), (40, 3300.0), (60, 3100.0)]
    history = {
        "train/loss": [(20, 2.0), (40, 1.5), (60, 1.0)],
        "val/accuracy": [(44, 0.9)],  # one evaluation: a point, not a constant
        "perf/compile_seconds": [(20, 7.25), (40, 7.25), (60, 7.25)],
        "train/skipped_images": [(20, 0.0), (40, 0.0), (60, 0.0)],
        "perf/examples_per_sec": examples,
        "perf/steps_per_sec": [(s, v / 32) for s, v in examples],  # batch size 32
        "perf/flops_per_sec": [(s, v * 1.6e7) for s, v in examples],
        "perf/flops_per_sec_per_device": [(s, v * 1.6e7) for s, v in examples],  # 1 device
        "perf/data_wait_share": [(20, 0.1), (40, 0.02), (60, 0.05)],
    }
    plotted, constants, copies = changing_series(history)
    assert list(plotted) == ["train/loss", "val/accuracy", "perf/examples_per_sec",
                             "perf/data_wait_share"]  # in the order logged
    assert constants == {"perf/compile_seconds": 7.25, "train/skipped_images": 0.0}
    assert copies == dict.fromkeys(["perf/steps_per_sec", "perf/flops_per_sec",
                                    "perf/flops_per_sec_per_device"], "perf/examples_per_sec")
    fig = draw(history, "exp-7")
    assert fig._suptitle.get_text() == (
        "exp-7\nconstant: perf/compile_seconds 7.25, train/skipped_images 0; scaled copies "
        "of perf/examples_per_sec: perf/flops_per_sec, perf/flops_per_sec_per_device, "
        "perf/steps_per_sec")
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert labels == set(plotted)
    # A rate that is not a fixed multiple of another (here the data wait) is its own curve.
    history["perf/steps_per_sec"] = [(20, 90.0), (40, 110.0), (60, 95.0)]
    assert "perf/steps_per_sec" in changing_series(history)[0]
