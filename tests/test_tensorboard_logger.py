"""TensorBoardLogger: event files read back without the tensorboard package.

An event file is a TFRecord stream: ``uint64 length, uint32 masked crc32c(length),
data, uint32 masked crc32c(data)``, each ``data`` a serialized ``Event`` proto.
``_events`` checks both checksums and parses with tensorboardX's own protos.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
from tensorboardX.record_writer import masked_crc32c
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.plugin_manager import create_plugin_manager
from nnx_trainer_plugins.jsonl_logger import JsonlLogger
from nnx_trainer_plugins.tensorboard_logger import TensorBoardLogger, flatten_hparams


def _events(log_dir: Path) -> list[Event]:
    """Every event of every event file in ``log_dir``, file by file (files sort by time)."""
    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}"
    events = []
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert header_crc == masked_crc32c(header)
            body = data[pos + 12 : pos + 12 + length]
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert body_crc == masked_crc32c(body)
            event = Event()
            event.ParseFromString(body)
            events.append(event)
            pos += 16 + length
    return events


def _scalars(events: list[Event]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _summaries(events: list[Event]) -> dict[str, Event]:
    return {v.tag: e for e in events for v in e.summary.value}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    logger = TensorBoardLogger()
    trainer = make_trainer(run_dir, logger, JsonlLogger(), max_epochs=2, batch_size=8,
                           log_every_n_steps=3)
    trainer.fit(TinyTask())  # 8 steps per epoch, validation after each epoch
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(run_dir / "tensorboard")
    return SimpleNamespace(logger=logger, run_dir=run_dir, jsonl=jsonl, events=events,
                           scalars=_scalars(events))


def test_scalars_at_the_logged_steps(run):
    steps = {tag: [s for s, _ in points] for tag, points in run.scalars.items()}
    assert steps["train/loss"] == [3, 6, 9, 12, 15, 16]
    assert steps["epoch"] == [3, 6, 9, 12, 15, 16]
    assert steps["val/loss"] == steps["val/accuracy"] == [8, 16]


def test_scalar_values_match_what_was_logged(run):
    for line in run.jsonl:
        for key, value in line.items():
            if key in ("step", "time"):
                continue
            (logged,) = [v for s, v in run.scalars[key] if s == line["step"]]
            assert math.isclose(logged, value, rel_tol=1e-6)  # float32 on disk


def test_hparams_as_text_and_in_the_hparams_plugin(run):
    summaries = _summaries(run.events)
    text = summaries["hparams/text_summary"].summary.value[0].tensor.string_val[0].decode()
    params = json.loads("\n".join(line[4:] for line in text.splitlines()))
    assert params["trainer"]["batch_size"] == 8 and params["task"] == {"lr": 0.1, "n_train": 64}

    start = summaries["_hparams_/session_start_info"].summary.value[0]
    assert start.metadata.plugin_data.plugin_name == "hparams"
    data = HParamsPluginData.FromString(start.metadata.plugin_data.content)
    hp = data.session_start_info.hparams
    assert hp["trainer/batch_size"].number_value == 8
    assert hp["trainer/precision"].string_value == "fp32"
    assert hp["task/lr"].number_value == pytest.approx(0.1)
    assert "trainer/max_steps" not in hp  # None: HPARAMS has no null
    assert "_hparams_/experiment" in summaries


def test_writer_closed_after_fit_and_one_file_per_fit(run):
    assert run.logger.writer is None
    assert len(list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not any(e.HasField("session_log") for e in run.events)  # fresh fit: no purge


def _stub(run_dir: Path, step: int = 0, main: bool = True) -> SimpleNamespace:
    resumed_from = str(run_dir / "checkpoints" / str(step)) if step else None
    return SimpleNamespace(run_dir=run_dir, global_step=step, is_main_process=main,
                           resumed_from=resumed_from)


def test_resumed_fit_purges_the_steps_it_will_redo(tmp_path):
    logger, trainer = TensorBoardLogger(), _stub(tmp_path, step=8)
    logger.log_hyperparams(trainer=trainer, params={"trainer": {"seed": 0}})
    logger.log_metrics(trainer=trainer, metrics={"train/loss": 0.5}, step=9)
    logger.on_run_end(outcome="completed")
    events = _events(tmp_path / "tensorboard")
    (purge,) = [e for e in events if e.HasField("session_log")]
    # TensorBoard drops earlier events with step >= 9; step 8 was logged before the checkpoint.
    assert purge.step == 9 and purge.session_log.status == purge.session_log.START
    assert _scalars(events) == {"train/loss": [(9, 0.5)]}


def _scalar_steps(log_dir: Path) -> list[int]:
    """The steps of ``train/loss`` as TensorBoard shows them: a ``SessionLog(START)`` at
    step p drops the earlier events at steps >= p (what ``purge_step`` asks for)."""
    shown: list[int] = []
    for event in _events(log_dir):
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            shown = [s for s in shown if s < event.step]
        shown += [event.step for v in event.summary.value if v.tag == "train/loss"]
    return shown


def _fit_with(run_dir: Path, *extra, max_epochs: int = 2, ckpt_path=None):
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    checkpoint = OrbaxCheckpoint(every_n_steps=4, min_seconds_between_saves=0, async_save=False)
    trainer = make_trainer(run_dir, TensorBoardLogger(), *extra, checkpoint,
                           max_epochs=max_epochs, batch_size=8, log_every_n_steps=1)
    return trainer.fit(TinyTask(), ckpt_path=ckpt_path)


def test_a_run_killed_and_resumed_shows_each_step_once(tmp_path):
    class Crash:
        @nnx_trainer.hookimpl
        def on_train_batch_start(self, step):
            if step == 10:  # steps 0..9 ran and were logged; the checkpoint is at 8
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _fit_with(tmp_path, Crash())
    assert _scalar_steps(tmp_path / "tensorboard") == list(range(1, 11))
    assert _fit_with(tmp_path, ckpt_path="last").resumed_from is not None
    assert _scalar_steps(tmp_path / "tensorboard") == list(range(1, 17))
    assert not (tmp_path / "tensorboard.1").exists()  # the same fit, continued


def test_a_second_fit_into_the_same_run_dir_gets_its_own_event_files(tmp_path):
    _fit_with(tmp_path, max_epochs=1)
    first = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    _fit_with(tmp_path, max_epochs=1)  # fresh: not resumed
    # The first fit's files moved aside, unchanged; the new folder holds only the second.
    assert sorted(p.name for p in (tmp_path / "tensorboard.1").iterdir()) == first
    assert _scalar_steps(tmp_path / "tensorboard.1") == list(range(1, 9))
    assert _scalar_steps(tmp_path / "tensorboard") == list(range(1, 9))
    assert not set(first) & {p.name for p in (tmp_path / "tensorboard").iterdir()}


def test_device_scalars_logged_vectors_skipped(tmp_path):
    logger, trainer = TensorBoardLogger(subdir="tb/x"), _stub(tmp_path)
    metrics = {"train/loss": jnp.asarray(0.25), "val/per_class": jnp.asarray([0.5, 1.0]),
               "train/nan": jnp.asarray(jnp.nan), "epoch": 2}
    logger.log_metrics(trainer=trainer, metrics=metrics, step=4)
    # Flushed at each call: readable before close.
    scalars = _scalars(_events(tmp_path / "tb" / "x"))
    assert scalars.keys() == {"train/loss", "train/nan", "epoch"}
    assert scalars["train/loss"] == [(4, 0.25)] and scalars["epoch"] == [(4, 2.0)]
    assert math.isnan(scalars["train/nan"][0][1])
    logger.close()


@pytest.mark.parametrize(("hook", "kwargs", "closed"), [
    ("on_run_end", {"stage": "fit", "outcome": "exception", "exception": RuntimeError()}, True),
    ("on_run_end", {"stage": "fit", "outcome": "preempted", "exception": None}, True),
    ("on_run_end", {"stage": "test", "outcome": "completed", "exception": None}, True),
    ("on_save_checkpoint", {"step": 3, "reason": "preemption"}, False),
    ("on_save_checkpoint", {"step": 3, "reason": "periodic"}, False),
])
def test_closed_when_the_run_ends_whatever_the_outcome(tmp_path, hook, kwargs, closed):
    logger, trainer = TensorBoardLogger(), _stub(tmp_path)
    logger.log_metrics(trainer=trainer, metrics={"train/loss": 1.0}, step=3)
    # Through pluggy, as the engine calls it (full spec arguments).
    pm = create_plugin_manager(plugins=[logger], autoload=False)
    getattr(pm.hook, hook)(trainer=trainer, **kwargs)
    assert (logger.writer is None) is closed
    assert _scalars(_events(tmp_path / "tensorboard")) == {"train/loss": [(3, 1.0)]}
    logger.close()


def test_disabled_and_non_main_write_nothing(tmp_path):
    for logger, trainer in [(TensorBoardLogger(enabled=False), _stub(tmp_path)),
                            (TensorBoardLogger(), _stub(tmp_path, main=False))]:
        logger.log_hyperparams(trainer=trainer, params={"a": 1})
        logger.log_metrics(trainer=trainer, metrics={"train/loss": 1.0}, step=1)
        assert logger.writer is None
    assert not (tmp_path / "tensorboard").exists()


def test_flatten_hparams():
    params = {"trainer": {"clip": None, "devices": 1, "bf": True}, "task": {"sizes": [1, 2]}}
    assert flatten_hparams(params) == {
        "trainer/devices": 1, "trainer/bf": True, "task/sizes": "[1, 2]"
    }


def test_bad_subdir_rejected():
    for bad in ("", "/abs", "../out"):
        with pytest.raises(ValueError, match="relative folder"):
            TensorBoardLogger(subdir=bad)


def test_entry_point_default_writes_nothing_until_a_log(tmp_path):
    # (That importing the plugin does not import tensorboardX is checked, for all
    # three logging plugins at once, in test_curves_plot.py.)
    trainer = nnx_trainer.Trainer(plugin_autoload=False, plugins=["tensorboard"],
                                  run_dir=tmp_path / "run")
    default = trainer.plugin_manager.get_plugin("tensorboard")
    assert isinstance(default, TensorBoardLogger) and default.enabled
    assert default.subdir == "tensorboard" and default.writer is None
    assert not (tmp_path / "run").exists()


def test_logging_does_not_import_pytorch(tmp_path):
    """tensorboardX would import torch (seconds, ~190 MiB) when it is installed; we keep it out."""
    import subprocess
    import sys

    script = f"""
import sys
from tiny_task import TinyTask
import nnx_trainer
from nnx_trainer_plugins.tensorboard_logger import TensorBoardLogger
nnx_trainer.Trainer(run_dir={str(tmp_path)!r}, max_steps=2, batch_size=16, log_every_n_steps=1,
                    plugin_autoload=False, plugins=[TensorBoardLogger()]).fit(TinyTask())
assert "tensorboardX" in sys.modules and "torch" not in sys.modules, "torch was imported"
import importlib.util
if importlib.util.find_spec("torch") is not None:  # installed: a later import still works
    import torch
    assert torch.zeros(1).shape == (1,)
print("ok")
"""
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tests_dir)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    assert list((tmp_path / "tensorboard").iterdir())  # and the events were written
