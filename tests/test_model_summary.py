"""ModelSummary: the layer table at fit start, the train step's FLOPs, FLOP/s and MFU."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from hook_recorder import HookRecorder
from rich.console import Console
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer import flops as flops_lib
from nnx_trainer.flops import StepFlops
from nnx_trainer_plugins import model_summary as ms
from nnx_trainer_plugins._progress_parts import flop_rows
from nnx_trainer_plugins.model_summary import ModelSummary
from nnx_trainer_plugins.rich_progress import RichProgress
from nnx_trainer_plugins.throughput import Throughput
from nnx_trainer_plugins.wandb_logger import WandbLogger

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
F32 = 4  # bytes


def _console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120), buf


def _fit(tmp_path, *plugins, task=None, **options) -> nnx_trainer.Trainer:
    trainer = make_trainer(tmp_path, *plugins, **{"max_steps": 1, **options})
    return trainer.fit(task or TinyTask(n_val=0))


class CountingTask(TinyTask):
    """Counts how often the train step is traced (``training_step`` runs only when traced)."""

    traces = 0

    def training_step(self, model, batch):
        CountingTask.traces += 1
        return super().training_step(model, batch)


def test_summary_numbers_are_the_hand_counts_and_the_table_is_printed(tmp_path):
    console, buf = _console()
    plugin = ModelSummary(console=console)
    _fit(tmp_path, plugin)
    s = plugin.summary
    # TinyModel(8 -> 16 -> 3): fc1 8*16 kernel + 16 bias; BatchNorm scale + bias (its mean
    # and var are batch stats, not parameters); fc2 16*3 + 3.
    assert s["layers"] == {
        "fc1": {"parameters": 8 * 16 + 16, "bytes": (8 * 16 + 16) * F32},
        "bn": {"parameters": 16 + 16, "bytes": 32 * F32},
        "fc2": {"parameters": 16 * 3 + 3, "bytes": (16 * 3 + 3) * F32},
    }
    assert s["parameters"] == 144 + 32 + 51 == 227
    assert s["parameter_bytes"] == 227 * F32
    assert s["other_state_bytes"] == 2 * 16 * F32  # batch mean and var
    text = buf.getvalue()
    assert "Model summary" in text
    assert re.search(r"fc1\s+144\s+576 B", text) and re.search(r"total\s+227\s+908 B", text)
    assert re.search(r"other state\s+128 B", text)


def test_layers_beyond_max_rows_are_folded():
    summary = {"parameters": 6, "parameter_bytes": 24, "other_state_bytes": 0,
               "layers": {n: {"parameters": 2, "bytes": 8} for n in ("a", "b", "c")}}
    rows = ms.summary_rows(summary, max_rows=1)
    assert rows == [("a", "2", "8 B"), ("… 2 more", "4", "16 B"), ("total", "6", "24 B")]


def test_table_is_printed_through_the_live_display_on_a_terminal(tmp_path):
    console, buf = _console(terminal=True)
    progress, plugin = RichProgress(console=console), ModelSummary()  # no console: progress's
    _fit(tmp_path, plugin, progress, max_steps=None, max_epochs=1)
    text = ANSI.sub("", buf.getvalue())
    assert "Model summary" in text and "fc1" in text and "Epoch 1/1" in text
    assert "│" in text  # a Rich table, not plain lines
    assert "FLOPs/step" in text and "Fit summary" in text
    assert not progress.progress.live.is_started


def test_flops_are_positive_scale_with_the_batch_and_do_not_retrace(tmp_path):
    counted = {}
    for batch_size in (16, 32):
        CountingTask.traces = 0
        plugin = ModelSummary(console=_console()[0])
        trainer = _fit(tmp_path / str(batch_size), plugin, task=CountingTask(n_val=0),
                       batch_size=batch_size)
        assert plugin.flops_source == "lowered"
        assert plugin.flops_per_example == plugin.flops_per_step / batch_size
        # Lowering the step for its FLOPs reuses jit's trace: the step is traced once.
        assert CountingTask.traces == 1
        assert trainer.compile_seconds["train"] > 0
        counted[batch_size] = plugin.flops_per_step
    assert counted[16] > 0
    assert counted[32] / counted[16] == pytest.approx(2.0, rel=0.1)


def test_a_step_that_only_compiled_code_can_cost_is_compiled_once(tmp_path, monkeypatch):
    lowered = ModelSummary(console=_console()[0])
    _fit(tmp_path / "a", lowered)
    # As on GPU/TPU behind PJRT's C API: the lowered module has no cost analysis.
    monkeypatch.setattr(flops_lib, "flops_of", lambda lowered: None)
    CountingTask.traces = 0
    compiled = ModelSummary(console=_console()[0])
    _fit(tmp_path / "b", compiled, task=CountingTask(n_val=0))
    assert compiled.flops_source == "compiled"
    assert compiled.flops_per_step == pytest.approx(lowered.flops_per_step, rel=0.5)
    assert CountingTask.traces == 1


def test_fit_summary_and_throughput_show_flops_per_second_without_mfu_on_cpu(tmp_path):
    console, buf = _console()
    logged, plugin = HookRecorder("log_metrics"), ModelSummary(console=console)
    _fit(tmp_path, plugin, RichProgress(console=console), Throughput(), logged,
         max_steps=None, max_epochs=2, log_every_n_steps=2)
    text = buf.getvalue()
    assert re.search(r"train step: [\d.]+ kFLOP", text)
    assert re.search(r"FLOPs/step\s+[\d.]+ kFLOP \([\d.]+ kFLOP/example\)", text)
    assert re.search(r"FLOP/s\s+[\d.]+ \w?FLOP/s \([\d.]+ \w?FLOP/s per device\)", text)
    assert "MFU" not in text  # no known peak for a CPU
    perf = [m for _, m in logged.logged() if "perf/steps_per_sec" in m]
    assert perf
    for m in perf:
        assert m["perf/flops_per_sec"] == pytest.approx(
            plugin.flops_per_step * m["perf/steps_per_sec"])
        assert m["perf/flops_per_sec_per_device"] == m["perf/flops_per_sec"]  # one device
        assert "perf/mfu" not in m


def test_peak_table_lookup():
    peak_flops = flops_lib.peak_flops
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "fp32") == pytest.approx(494.7e12)  # TF32
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak_flops("TPU v4", "bf16") == pytest.approx(275e12)
    assert peak_flops("TPU v5 lite", "bf16") == pytest.approx(197e12)
    assert peak_flops("TPU v5", "bf16") == pytest.approx(459e12)
    assert peak_flops("cpu", "bf16") is None
    assert peak_flops("Tesla V100-SXM2-16GB", "fp32") is None


def test_mfu_is_reported_where_the_peak_is_known(tmp_path, monkeypatch):
    monkeypatch.setattr(flops_lib, "device_kind", lambda: "NVIDIA H100 80GB HBM3")
    console, buf = _console()
    logged, plugin = HookRecorder("log_metrics"), ModelSummary(console=console)
    _fit(tmp_path, plugin, RichProgress(console=console), Throughput(), logged,
         max_steps=None, max_epochs=2, log_every_n_steps=2)
    perf = [m for _, m in logged.logged() if "perf/steps_per_sec" in m]
    assert perf
    for m in perf:
        assert m["perf/mfu"] == pytest.approx(m["perf/flops_per_sec_per_device"] / 494.7e12)
    assert re.search(r"MFU\s+[\d.]+% of 495 TFLOP/s \(NVIDIA H100 80GB HBM3, fp32\)",
                     buf.getvalue())


def test_achieved_divides_by_devices_and_needs_a_flop_count(monkeypatch):
    monkeypatch.setattr(flops_lib, "device_kind", lambda: "TPU v4")
    rates = flops_lib.achieved(1e12, steps_per_sec=2.0, num_devices=4, precision="bf16")
    assert rates == pytest.approx({"flops_per_sec": 2e12, "flops_per_sec_per_device": 5e11,
                                   "mfu": 5e11 / 275e12})
    assert flops_lib.achieved(None, 2.0, 4, "bf16") == {}
    assert flops_lib.achieved(1e12, 0.0, 4, "bf16") == {}
    assert flop_rows(SimpleNamespace(), None, 2.0) == []  # no FLOP count: no rows


class ThirdPartyLogger:
    """A logger from another distribution: it gets the count through the hook, as the
    built-in loggers do; nobody looks it up by name."""

    name = "acme_logger"

    def __init__(self) -> None:
        self.received: list[tuple[dict, StepFlops | None]] = []

    @nnx_trainer.hookimpl
    def log_model_summary(self, trainer, summary, flops):
        assert isinstance(trainer, nnx_trainer.RunView)
        self.received.append((dict(summary), flops))


def test_a_third_party_logger_receives_the_summary_and_flops_once_per_fit(tmp_path):
    logger, plugin = ThirdPartyLogger(), ModelSummary(console=_console()[0])
    trainer = _fit(tmp_path, plugin, logger, max_steps=3)
    assert len(logger.received) == 1
    summary, flops = logger.received[0]
    assert summary["parameters"] == 227 and summary == plugin.summary
    assert flops == StepFlops(per_step=plugin.flops_per_step,
                              per_example=plugin.flops_per_step / trainer.batch_size,
                              counted_from="lowered")
    assert flops.as_dict() == {"per_step": flops.per_step, "per_example": flops.per_example,
                               "counted_from": "lowered"}
    trainer.fit(TinyTask(n_val=0))  # a second fit announces its own count
    assert len(logger.received) == 2


def test_without_a_flop_count_the_hook_still_carries_the_summary(tmp_path):
    logger = ThirdPartyLogger()
    _fit(tmp_path, ModelSummary(flops=False, console=_console()[0]), logger)
    assert [(s["parameters"], f) for s, f in logger.received] == [(227, None)]


def test_the_wandb_logger_adds_the_flops_to_its_config():
    calls = []
    logger = WandbLogger(mode="offline")
    logger.run = SimpleNamespace(config=SimpleNamespace(
        update=lambda values, allow_val_change: calls.append(values)))
    flops = StepFlops(per_step=8.0, per_example=1.0, counted_from="lowered")
    trainer = SimpleNamespace(is_main_process=True)
    logger.log_model_summary(trainer=trainer, flops=flops)
    logger.log_model_summary(trainer=trainer, flops=None)  # nothing counted: nothing added
    assert calls == [{"flops": {"per_step": 8.0, "per_example": 1.0, "counted_from": "lowered"}}]


def test_wandb_update_config_adds_keys_to_the_open_run():
    calls = []
    logger = WandbLogger(mode="offline")
    logger.run = SimpleNamespace(config=SimpleNamespace(
        update=lambda values, allow_val_change: calls.append((values, allow_val_change))))
    logger.update_config(SimpleNamespace(is_main_process=True), {"flops": {"per_step": 1.0}})
    assert calls == [({"flops": {"per_step": 1.0}}, True)]
    logger.update_config(SimpleNamespace(is_main_process=False), {"x": 1})
    assert len(calls) == 1  # only the main process logs
    assert WandbLogger(mode="disabled")._config == {}


def test_disabled_prints_and_counts_nothing(tmp_path):
    console, buf = _console()
    plugin = ModelSummary(enabled=False, console=console)
    _fit(tmp_path, plugin)
    assert buf.getvalue() == "" and plugin.flops_per_step is None


def test_loaded_by_default_through_its_entry_point(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert isinstance(trainer.plugin_manager.get_plugin("model_summary"), ModelSummary)


def test_format_count():
    assert flops_lib.format_count(4.1e9) == "4.1 GFLOP"
    assert flops_lib.format_count(2.5e14, "FLOP/s") == "250 TFLOP/s"
    assert flops_lib.format_count(12) == "12 FLOP"
    assert ms.format_bytes(97.5 * 2**20) == "97.5 MiB"


def test_summary_and_flops_are_in_hparams_json(tmp_path):
    import json

    from nnx_trainer_plugins.jsonl_logger import JsonlLogger

    summary = ModelSummary()
    _fit(tmp_path, summary, JsonlLogger())
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams["model"]["parameters"] == 8 * 16 + 16 + 16 * 2 + 16 * 3 + 3
    assert hparams["flops"]["per_example"] == pytest.approx(summary.flops_per_example)
    assert hparams["flops"]["per_step"] > 0 and "trainer" in hparams  # added, not replaced
