"""Weights & Biases logging: config, metrics at the log cadence, summary, resume.

Opt-in (registered only when configured):

- Autoload registers it only when the environment configures W&B
  (``from_environment``): ``WANDB_MODE=online|offline``, ``WANDB_API_KEY`` or
  ``WANDB_PROJECT`` set, and ``WANDB_MODE`` is not ``disabled``. Otherwise it is not
  registered, never imports ``wandb`` and writes nothing; ``nnx-trainer-plugins`` lists
  it as inactive with its ``activation`` sentence.
- A configured instance (``Trainer(plugins=[WandbLogger(project=...)])``) or a request
  by name (``plugins=["wandb"]``) is on, unless its resolved mode (``mode=``, else
  ``WANDB_MODE``) is ``"disabled"``.

No prompt, ever: when the run would be online and no credentials are configured
(``WANDB_API_KEY``, ``wandb login``'s netrc entry, a settings file), fit fails at
start with a :class:`RuntimeError` telling the user to log in or set
``WANDB_MODE=offline``. Silently falling back to offline was rejected: a user who
asked for an online run would only find out at the end that nothing was uploaded.

What is logged:

- ``config``: the hyperparameters dict from ``log_hyperparams`` (trainer options,
  task hyperparameters), plus ``flops`` from ``log_model_summary`` (the train step's
  FLOP count, known at the first step), added by ``update_config``.
- every ``log_metrics`` call (train metrics at the log cadence, validation and test
  metrics) as one ``run.log`` row that also carries ``trainer/global_step``; every
  metric is plotted against that step metric (``define_metric``), never against
  W&B's own ``_step``. W&B drops rows whose ``step=`` goes backwards, which is
  exactly what a resumed run does (it repeats the steps after its checkpoint); a
  step metric accepts them, so curves stay correct after a resume.
- ``run.summary`` at the end of each fit/validate/test: the latest value of every
  callback metric, ``trainer/global_step``, ``total_steps``, ``fit_seconds``,
  ``stop_reason`` and ``status``.

One W&B run per run directory: a fit and the evaluations after it (the example's final
``validate``) log into the same run. A fit that completes does not finish it; it is finished:

- at interpreter exit (an ``atexit`` handler, registered when the run starts, finishes
  it with exit code 0), or when :meth:`WandbLogger.finish` is called;
- at once with ``exit_code=1`` when a fit/validate/test raises (KeyboardInterrupt
  too): W&B marks it failed;
- at once on preemption: ``run.mark_preempting()``, then ``finish(exit_code=1)``, which
  W&B shows as "preempted" rather than "finished";
- when a fit starts into another run directory (that run's own W&B run begins).

Resume: the run id is written to ``run_dir/wandb_run_id.txt``; a later process with
the same run directory passes ``id=<that id>, resume="allow"`` and so continues the
same W&B run (unless ``WANDB_RUN_ID`` is set, which wins). A W&B run already active
when fit starts (the user called ``wandb.init``) is used and left open.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.host_values import metric_value

if TYPE_CHECKING:
    from nnx_trainer import RunView
    from nnx_trainer.flops import StepFlops

log = logging.getLogger("nnx_trainer.wandb")

MODES = ("online", "offline", "disabled")
STEP_METRIC = "trainer/global_step"
RUN_ID_FILE = "wandb_run_id.txt"


def _env_mode() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode or None


def configured_by_environment() -> bool:
    """Whether the environment asks for W&B logging (the autoload rule; see the module)."""
    mode = _env_mode()
    return mode != "disabled" and (mode in ("online", "offline") or bool(
        os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_PROJECT")))


# Loggers whose run is open, so a new run finishes another logger's first (one active
# run per process) and the exit handler finishes what is left.
_OPEN: list[WandbLogger] = []
_EXIT_HANDLER_REGISTERED = False


def _finish_open_runs() -> None:
    """At interpreter exit: finish every run a logger left open (completed fits)."""
    for logger in list(_OPEN):
        try:
            logger.finish()
        except Exception:  # pragma: no cover - exit must go on
            log.warning("wandb: could not finish the run at exit", exc_info=True)


class WandbLogger:
    """Logs the run to Weights & Biases (see the module docstring for the rules).

    :param project: W&B project (default: ``WANDB_PROJECT``, else W&B's default).
    :param entity: W&B entity (user or team).
    :param run_name: display name of the run (default: the run directory's name).
    :param mode: ``"online"``, ``"offline"`` or ``"disabled"`` (default: ``WANDB_MODE``).
    :param tags: run tags.
    :param dir: where W&B writes its ``wandb/`` folder (default: ``WANDB_DIR``, else
        ``trainer.run_dir``).
    :param init_kwargs: extra keyword arguments for ``wandb.init`` (group, notes, ...).
    """

    name = "wandb"
    activation = (
        "opt-in: set WANDB_MODE=offline (or online), WANDB_API_KEY or WANDB_PROJECT, or "
        "pass Trainer(plugins=[WandbLogger(project=...)])"
    )

    @classmethod
    def from_environment(cls) -> WandbLogger | None:
        """An instance when the environment configures W&B, else None (not registered)."""
        return cls() if configured_by_environment() else None

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        mode: str | None = None,
        tags: Sequence[str] | None = None,
        dir: str | os.PathLike | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} or None, got {mode!r}")
        self.project, self.entity, self.run_name, self.mode = project, entity, run_name, mode
        self.tags = list(tags) if tags is not None else None
        self.dir = dir
        self.init_kwargs = dict(init_kwargs or {})
        self.run: Any = None  # the open wandb Run (from the first fit or log until finished)
        self._run_dir: Path | None = None  # the trainer run directory the open run belongs to
        self._owns_run = False
        self._config: dict[str, Any] = {}

    def is_active(self) -> bool:
        """Whether this instance logs: unless its mode (``mode=``, else ``WANDB_MODE``) is
        ``"disabled"``. Reads the environment; never imports wandb."""
        return (self.mode or _env_mode()) != "disabled"

    def _should_log(self, trainer: RunView) -> bool:
        return trainer.is_main_process and self.is_active()

    @staticmethod
    def run_id_path(trainer: RunView) -> Path:
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

    def _ensure_run(self, trainer: RunView, config: Mapping[str, Any] | None) -> None:
        """The run of ``trainer.run_dir``: the open one, else a new (or resumed) one."""
        if self.run is not None and self._run_dir == Path(trainer.run_dir):
            return
        self.finish()  # a run of another run directory
        self._start(trainer, config)

    def _start(self, trainer: RunView, config: Mapping[str, Any] | None) -> None:
        global _EXIT_HANDLER_REGISTERED
        import wandb

        for other in list(_OPEN):  # one active run per process: another logger's ends
            if other is not self:
                other.finish()
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
            _OPEN.append(self)
            if not _EXIT_HANDLER_REGISTERED:
                # Registered after wandb's own (atexit runs last-registered first), so
                # our runs finish while wandb can still finish them.
                atexit.register(_finish_open_runs)
                _EXIT_HANDLER_REGISTERED = True
        self._run_dir = Path(trainer.run_dir)
        # Every metric is plotted against the trainer's step: see the module docstring.
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the open run now (done at interpreter exit otherwise); safe to call twice."""
        run, self.run, self._run_dir = self.run, None, None
        if self in _OPEN:
            _OPEN.remove(self)
        if run is not None and self._owns_run:
            run.finish(exit_code=exit_code)

    def _summarize(self, trainer: RunView, status: str | None) -> None:
        """Write the summary (``status`` None: an evaluation's metrics only); never raises
        (it may run while an error unwinds)."""
        if self.run is None:
            return
        try:
            summary: dict[str, Any] = {} if status is None else {
                STEP_METRIC: int(trainer.global_step),
                "total_steps": int(trainer.total_steps),
                "fit_seconds": float(trainer.fit_seconds),
                "status": status,
            }
            if status is not None and trainer.stop_reason:
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

    # --------------------------------------------------------------- hooks

    @hookimpl
    def log_hyperparams(self, trainer: RunView, params: Mapping[str, Any]) -> None:
        """Keep the config for ``wandb.init`` (called just before ``on_fit_start``)."""
        if not self._should_log(trainer):
            return
        self._config = dict(params)
        if self.run is not None:
            self.run.config.update(self._config, allow_val_change=True)

    def update_config(self, trainer: RunView, values: Mapping[str, Any]) -> None:
        """Add ``values`` to the run's config after fit start (e.g. the step's FLOP count)."""
        if self._should_log(trainer):
            self._config.update(values)
            if self.run is not None:
                self.run.config.update(dict(values), allow_val_change=True)

    @hookimpl
    def log_model_summary(self, trainer: RunView, flops: StepFlops | None) -> None:
        """Add the train step's FLOP count to the config (the parameters are in it already)."""
        if flops is not None:
            self.update_config(trainer, {"flops": flops.as_dict()})

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Start (or resume) the W&B run."""
        if not self._should_log(trainer):
            return
        self._ensure_run(trainer, self._config)

    @hookimpl
    def log_metrics(self, trainer: RunView, metrics: Mapping[str, Any], step: int) -> None:
        """One ``run.log`` row per call, with ``trainer/global_step`` as its x-axis."""
        if not self._should_log(trainer):
            return
        row = {str(k): metric_value(v) for k, v in metrics.items()}
        row[STEP_METRIC] = int(step)
        # A standalone validate/test logs into the fit's run (still open), or opens
        # (resumes, by the stored id) the run of this run directory.
        self._ensure_run(trainer, None)
        self.run.log(row)

    @hookimpl
    def on_run_end(self, trainer: RunView, stage: str, outcome: str) -> None:
        """Summary after every call; finish at once only on an exception or preemption.

        A completed (or stopped) fit leaves the run open for the evaluations after it;
        it is finished at interpreter exit (see the module docstring).
        """
        if not trainer.is_main_process or self.run is None:
            return
        if outcome == "exception":
            status, exit_code = "failed", 1
        elif outcome == "preempted":
            status, exit_code = "preempted", 1
        else:
            self._summarize(trainer, "finished" if stage == "fit" else None)
            return
        self._summarize(trainer, status)
        try:
            self.finish(exit_code)
        except Exception:
            log.warning("wandb: could not finish the run", exc_info=True)


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
