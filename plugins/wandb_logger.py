"""Weights & Biases logging: config, metrics at the log cadence, summary, resume.

Activation (decided at each fit start, so the default instance costs nothing):

- ``enabled=True``: always on; ``enabled=False``: always off.
- ``enabled=None`` (the default instance): on when the user configured W&B, either
  through the environment (``WANDB_MODE=online|offline``, ``WANDB_API_KEY`` or
  ``WANDB_PROJECT`` set) or by passing ``project=`` or ``mode="online"|"offline"``
  to a configured instance.
- A resolved mode of ``"disabled"`` (``mode=`` or ``WANDB_MODE``) is always off.

While off, the plugin never imports ``wandb`` and writes nothing.

No prompt, ever: when the run would be online and no credentials are configured
(``WANDB_API_KEY``, ``wandb login``'s netrc entry, a settings file), fit fails at
start with a :class:`RuntimeError` telling the user to log in or set
``WANDB_MODE=offline``. Silently falling back to offline was rejected: a user who
asked for an online run would only find out at the end that nothing was uploaded.

What is logged:

- ``config``: the hyperparameters dict from ``log_hyperparams`` (trainer options,
  task hyperparameters).
- every ``log_metrics`` call (train metrics at the log cadence, validation and test
  metrics) as one ``run.log`` row that also carries ``trainer/global_step``; every
  metric is plotted against that step metric (``define_metric``), never against
  W&B's own ``_step``. W&B drops rows whose ``step=`` goes backwards, which is
  exactly what a resumed run does (it repeats the steps after its checkpoint); a
  step metric accepts them, so curves stay correct after a resume.
- ``run.summary`` at fit end: the latest value of every callback metric (final
  validation metrics included), ``trainer/global_step``, ``total_steps``,
  ``fit_seconds``, ``stop_reason`` and ``status``.

Run end: ``run.finish()`` after a successful fit; ``run.finish(exit_code=1)`` when fit
raises (KeyboardInterrupt too); on preemption ``run.mark_preempting()``, then
``finish(exit_code=1)``, which W&B shows as "preempted" rather than "finished".

Resume: the run id is written to ``run_dir/wandb_run_id.txt``; a later fit with the
same run directory passes ``id=<that id>, resume="allow"`` and so continues the same
W&B run (unless ``WANDB_RUN_ID`` is set, which wins). Metrics logged by a standalone
``validate``/``test`` after fit briefly re-open that run, log and finish it again.

If a W&B run is already active when fit starts (the user called ``wandb.init``),
it is used and left open: the plugin only finishes runs it started.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.host_values import metric_value

if TYPE_CHECKING:
    from nnx_trainer import Trainer

log = logging.getLogger("nnx_trainer.wandb")

MODES = ("online", "offline", "disabled")
STEP_METRIC = "trainer/global_step"
RUN_ID_FILE = "wandb_run_id.txt"


def _env_mode() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode or None


class WandbLogger:
    """Logs the run to Weights & Biases (see the module docstring for the rules).

    :param project: W&B project (default: ``WANDB_PROJECT``, else W&B's default).
    :param entity: W&B entity (user or team).
    :param run_name: display name of the run (default: the run directory's name).
    :param mode: ``"online"``, ``"offline"`` or ``"disabled"`` (default: ``WANDB_MODE``).
    :param enabled: force on (True) or off (False); None decides from the configuration.
    :param tags: run tags.
    :param dir: where W&B writes its ``wandb/`` folder (default: ``WANDB_DIR``, else
        ``trainer.run_dir``).
    :param init_kwargs: extra keyword arguments for ``wandb.init`` (group, notes, ...).
    """

    name = "wandb"

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        mode: str | None = None,
        enabled: bool | None = None,
        tags: Sequence[str] | None = None,
        dir: str | os.PathLike | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} or None, got {mode!r}")
        self.project = project
        self.entity = entity
        self.run_name = run_name
        self.mode = mode
        self.enabled = enabled
        self.tags = list(tags) if tags is not None else None
        self.dir = dir
        self.init_kwargs = dict(init_kwargs or {})
        self.run: Any = None  # the live wandb Run while fit runs
        self._owns_run = False
        self._config: dict[str, Any] = {}

    # ------------------------------------------------------------------ rules

    def is_active(self) -> bool:
        """Whether this instance logs (reads the environment; never imports wandb)."""
        mode = self.mode or _env_mode()
        if mode == "disabled":
            return False
        if self.enabled is not None:
            return self.enabled
        if self.project or self.mode in ("online", "offline"):
            return True
        return (
            mode in ("online", "offline")
            or bool(os.environ.get("WANDB_API_KEY"))
            or bool(os.environ.get("WANDB_PROJECT"))
        )

    def _should_log(self, trainer: Trainer) -> bool:
        return trainer.is_main_process and self.is_active()

    @staticmethod
    def run_id_path(trainer: Trainer) -> Path:
        """Where the run id is kept so a resumed fit continues the same W&B run."""
        return Path(trainer.run_dir) / RUN_ID_FILE

    # -------------------------------------------------------------- the run

    def _check_credentials(self) -> None:
        """Fail before ``wandb.init`` could prompt for an API key."""
        from wandb.sdk import wandb_setup

        # The mode wandb.init will use: ours, else WANDB_MODE or `wandb offline`'s file.
        settings = wandb_setup.singleton().settings
        mode = self.init_kwargs.get("mode") or self.mode or settings.mode
        if mode in ("offline", "dryrun", "disabled"):
            return
        if _has_credentials(settings):
            return
        raise RuntimeError(
            "the wandb plugin is active in online mode but no W&B API key is configured. "
            "Set WANDB_MODE=offline (or WandbLogger(mode='offline')) to log locally, run "
            "`wandb login` or set WANDB_API_KEY to upload, or disable the plugin with "
            "Trainer(disable_plugins=['wandb'])."
        )

    def _start(self, trainer: Trainer, config: Mapping[str, Any] | None) -> None:
        import wandb

        if wandb.run is not None:
            # The user's own run: log into it, leave its lifetime to them.
            self.run, self._owns_run = wandb.run, False
            if config:
                self.run.config.update(dict(config), allow_val_change=True)
        else:
            self._check_credentials()
            run_dir = Path(trainer.run_dir)
            root = Path(self.dir or os.environ.get("WANDB_DIR") or run_dir)
            root.mkdir(parents=True, exist_ok=True)
            id_path = self.run_id_path(trainer)
            kwargs: dict[str, Any] = {
                "project": self.project,
                "entity": self.entity,
                "name": self.run_name or run_dir.name,
                "tags": self.tags,
                "dir": str(root),
                "config": dict(config) if config else None,
            }
            if self.mode is not None:
                kwargs["mode"] = self.mode
            if id_path.exists() and not os.environ.get("WANDB_RUN_ID"):
                kwargs["id"] = id_path.read_text(encoding="utf-8").strip()
                kwargs["resume"] = "allow"
            kwargs.update(self.init_kwargs)
            self.run, self._owns_run = wandb.init(**kwargs), True
            if self.run is not None and getattr(self.run, "id", None):
                id_path.parent.mkdir(parents=True, exist_ok=True)
                id_path.write_text(f"{self.run.id}\n", encoding="utf-8")
        # Every metric is plotted against the trainer's step: see the module docstring.
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def _finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None and self._owns_run:
            run.finish(exit_code=exit_code)

    def _end(self, trainer: Trainer, status: str, exit_code: int) -> None:
        """Write the summary and finish; never raises (it may run while an error unwinds)."""
        if self.run is None:
            return
        try:
            summary: dict[str, Any] = {
                STEP_METRIC: int(trainer.global_step),
                "total_steps": int(trainer.total_steps),
                "fit_seconds": float(trainer.fit_seconds),
                "status": status,
            }
            if trainer.stop_reason:
                summary["stop_reason"] = str(trainer.stop_reason)
            if status != "failed":  # reading device values after a failure may fail again
                for key, value in trainer.callback_metrics.items():
                    value = metric_value(value)
                    if isinstance(value, float) and math.isfinite(value):
                        summary[str(key)] = value
            self.run.summary.update(summary)
            if status == "preempted":
                self.run.mark_preempting()
        except Exception:  # the run must still be finished
            log.warning("wandb: could not write the run summary", exc_info=True)
        try:
            self._finish(exit_code)
        except Exception:
            log.warning("wandb: could not finish the run", exc_info=True)

    # --------------------------------------------------------------- hooks

    @hookimpl
    def log_hyperparams(self, trainer: Trainer, params: Mapping[str, Any]) -> None:
        """Keep the config for ``wandb.init`` (called just before ``on_fit_start``)."""
        if not self._should_log(trainer):
            return
        self._config = dict(params)
        if self.run is not None:
            self.run.config.update(self._config, allow_val_change=True)

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Start (or resume) the W&B run."""
        if not self._should_log(trainer):
            return
        if self.run is None:
            self._start(trainer, self._config)

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """One ``run.log`` row per call, with ``trainer/global_step`` as its x-axis."""
        if not self._should_log(trainer):
            return
        row = {str(k): metric_value(v) for k, v in metrics.items()}
        row[STEP_METRIC] = int(step)
        if self.run is not None:
            self.run.log(row)
            return
        # Outside fit (standalone validate/test): re-open the run for this one row.
        self._start(trainer, None)
        try:
            self.run.log(row)
        finally:
            self._finish()

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        """Final summary, then finish the run cleanly."""
        if trainer.is_main_process:
            self._end(trainer, "finished", exit_code=0)

    @hookimpl(trylast=True)  # after the checkpoint plugin has started its save
    def on_save_checkpoint(self, trainer: Trainer, reason: str) -> None:
        """On preemption: mark the run preempted and finish it (fit ends without on_fit_end)."""
        if reason == "preemption" and trainer.is_main_process:
            self._end(trainer, "preempted", exit_code=1)

    @hookimpl
    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        """Finish the run with exit code 1 so W&B marks it failed."""
        if trainer.is_main_process:
            self._end(trainer, "failed", exit_code=1)


def _has_credentials(settings: Any) -> bool:
    """Whether W&B would find an API key without prompting (env, netrc, settings files)."""
    try:
        from wandb.sdk.lib import wbauth

        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(
            host=host, source="nnx_trainer", prompt=False, update_session=False
        )
        return auth is not None
    except (ImportError, AttributeError, TypeError):
        # wbauth is internal to wandb: if it moved, fall back to what the env and
        # the netrc file say (the places `wandb login` writes to).
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
            return True
        import netrc
        from urllib.parse import urlsplit

        try:
            host_name = urlsplit(str(settings.base_url)).hostname
            return netrc.netrc().authenticators(host_name or "") is not None
        except (OSError, netrc.NetrcParseError):
            return False
