"""Training curves as a PNG: ``run_dir/curves.png``, one panel per metric family.

The plugin keeps the host floats it receives in ``log_metrics`` (train metrics at
the log cadence, validation and test metrics after evaluations; it never reads a
device value itself) and draws them:

- when a fit ends, however it ends (``on_run_end``: completed, stopped, preempted, or
  raising: the curves up to a divergence or crash are often what explains it);
- after a standalone ``validate``/``test`` that logs outside fit, so its points
  appear too.

Panels group metrics by the part after the ``train/``, ``val/`` or ``test/``
prefix: ``train/loss`` and ``val/loss`` share the "loss" panel, ``val/accuracy``
gets an "accuracy" panel; a name without a known prefix is its own panel and
``epoch`` (a counter, not a curve) is left out. Each panel plots value against
global step, with a legend; the figure title is the run directory's name. Only what
changes is plotted: a series with one value throughout (``perf/compile_seconds``) and a
rate that only rescales another (``perf/steps_per_sec`` next to
``perf/examples_per_sec``; on one device each ``*_per_device`` rate) are named in the
title instead (:func:`changing_series`).

The history is saved in checkpoints (``state_dict``), so the plot of a resumed run
shows the whole run; at each fit start points after the starting step are
dropped, since the fit logs those steps again. Nothing is drawn when nothing was
logged. matplotlib is imported only when drawing, and through its object API with
the Agg canvas: no pyplot, no display, no change to the user's backend.

Only the main process draws. A write that fails (disk full, read-only) is one
:class:`~nnx_trainer.write_errors.RunDirWriteError` naming the file and the OS error: it
fails a run that was ending well, and is one warning line after a run's own error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.plugin_libraries import require_modules
from nnx_trainer.write_errors import RunDirWriteError, writing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nnx_trainer import Trainer

PREFIXES = ("train", "val", "test")
SKIP = frozenset({"epoch"})
STATE_KEY = "curves_plot"

# matplotlib comes with the [plots] extra. Without it this module does not load, and
# the plugin manager lists the plugin as installed, not active, naming the extra.
require_modules("matplotlib")

log = logging.getLogger("nnx_trainer.curves_plot")


def family_of(name: str) -> str:
    """The panel a metric goes to: ``"val/loss"`` -> ``"loss"``; other names stay."""
    prefix, sep, rest = name.partition("/")
    return rest if sep and prefix in PREFIXES and rest else name


def panels(history: Mapping[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    """``{family: [metric names]}`` in drawing order: "loss" first, then by name;
    inside a panel train, val, test."""
    grouped: dict[str, list[str]] = {}
    for name in history:
        grouped.setdefault(family_of(name), []).append(name)

    def series_order(name: str) -> tuple[int, str]:
        prefix = name.partition("/")[0]
        return (PREFIXES.index(prefix) if prefix in PREFIXES else len(PREFIXES), name)

    families = sorted(grouped, key=lambda f: (f != "loss", f))
    return {f: sorted(grouped[f], key=series_order) for f in families}


def changing_series(history: Mapping[str, list[tuple[int, float]]]) -> tuple[
        dict[str, list[tuple[int, float]]], dict[str, float], dict[str, str]]:
    """``(series to plot, {name: constant value}, {name: the series it copies})``.

    A series logged at least twice with one value throughout (``perf/compile_seconds``,
    a count that stays 0) is a constant, stated in the title instead of drawn as a flat
    line. A ``perf/`` rate that is another one times a fixed factor at every step is a
    scaled copy, named in the title instead of drawn again: ``perf/steps_per_sec`` and
    ``perf/flops_per_sec`` of ``perf/examples_per_sec`` (the batch size, the FLOPs per
    example), and on one device each ``*_per_device`` rate of its total.
    """
    plotted: dict[str, list[tuple[int, float]]] = {}
    constants: dict[str, float] = {}
    copies: dict[str, str] = {}
    for name in sorted(history):
        points = history[name]
        values = {v for _, v in points}
        if len(points) > 1 and len(values) == 1 and all(math.isfinite(v) for v in values):
            constants[name] = points[0][1]
            continue
        source = next((other for other in plotted if name.startswith("perf/")
                       and other.startswith("perf/") and _scaled(plotted[other], points)), None)
        if source is None:
            plotted[name] = points
        else:
            copies[name] = source
    return {name: history[name] for name in history if name in plotted}, constants, copies


def _scaled(base: list[tuple[int, float]], other: list[tuple[int, float]]) -> bool:
    """Whether ``other`` is ``base`` times one factor at the same steps (3 points or more)."""
    if len(base) != len(other) or len(base) < 3 or [s for s, _ in base] != [s for s, _ in other]:
        return False
    if not all(math.isfinite(v) and v != 0 for _, v in base + other):
        return False
    ratios = [o / b for (_, b), (_, o) in zip(base, other, strict=True)]
    return all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios)


def constants_text(constants: Mapping[str, float], copies: Mapping[str, str]) -> str:
    """The title line of what is not drawn: ``"constant: perf/compile_seconds 7.21; scaled
    copies of perf/examples_per_sec: perf/steps_per_sec"``."""
    parts = []
    if constants:
        parts.append("constant: " + ", ".join(f"{name} {value:.4g}"
                                              for name, value in sorted(constants.items())))
    for source in sorted(set(copies.values())):
        names = ", ".join(sorted(n for n, s in copies.items() if s == source))
        parts.append(f"scaled copies of {source}: {names}")
    return "; ".join(parts)


def draw(history: Mapping[str, list[tuple[int, float]]], title: str, dpi: int = 100) -> Figure:
    """The figure for ``history`` (``{metric: [(step, value), ...]}``), not yet saved:
    the series that change, one panel per family; constants in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history, constants, copies = changing_series(history)
    if constants or copies:
        title = f"{title}\n{constants_text(constants, copies)}"
    layout = panels(history)
    ncols = max(1, min(3, len(layout)))
    nrows = max(1, math.ceil(len(layout) / ncols))
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the user's backend is
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (family, names) in zip(axes, layout.items(), strict=False):
        for name in names:
            steps = [s for s, _ in history[name]]
            # inf would stretch the axis to nothing; NaN leaves a gap, as it should.
            values = [v if math.isfinite(v) else math.nan for _, v in history[name]]
            sparse = len(steps) <= 30  # few points (evaluations): show each one
            ax.plot(steps, values, label=name, marker="o" if sparse else None,
                    markersize=4, linewidth=1.5)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.set_ylabel(family)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for ax in axes[len(layout):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


class CurvesPlot:
    """Draws the logged metrics to ``run_dir/<filename>`` (see the module docstring).

    :param enabled: draw at all (False makes the plugin a no-op).
    :param filename: PNG file name inside ``trainer.run_dir``.
    :param dpi: resolution; each panel is 5.2 x 3.8 inches.
    :param title: figure title (default: the run directory's name).
    """

    name = "curves_plot"

    def __init__(self, enabled: bool = True, filename: str = "curves.png", dpi: int = 100,
                 title: str | None = None) -> None:
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.enabled = enabled
        self.filename = filename
        self.dpi = dpi
        self.title = title
        self.history: dict[str, list[tuple[int, float]]] = {}  # metric -> (step, value)s
        self._in_fit = False

    def path(self, trainer: Trainer) -> Path:
        """Where this trainer's plot goes."""
        return Path(trainer.run_dir) / self.filename

    def save(self, trainer: Trainer) -> Path | None:
        """Draw the history now; returns the file, or None when there is nothing to draw."""
        if not self.history:
            return None
        target = self.path(trainer)
        last = max(s for points in self.history.values() for s, _ in points)
        title = f"{self.title or Path(trainer.run_dir).name} (step {last})"
        fig = draw(self.history, title, dpi=self.dpi)
        tmp = target.with_name(target.name + ".tmp")
        # A failed write (disk full, read-only): one RunDirWriteError, no half-written tmp.
        with writing(f"the curves of step {last}", target, step=last):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(tmp, format="png")
                os.replace(tmp, target)  # a reader never sees a half-written PNG
            except OSError:
                with contextlib.suppress(OSError):  # (read-only: there is none)
                    tmp.unlink(missing_ok=True)
                raise
        return target

    def _should_draw(self, trainer: Trainer) -> bool:
        return self.enabled and trainer.is_main_process

    # --------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Drop points after the starting step: this fit logs those steps again."""
        self._in_fit = True
        start = int(trainer.global_step)
        for name in list(self.history):
            kept = [(s, v) for s, v in self.history[name] if s <= start]
            if kept:
                self.history[name] = kept
            else:
                del self.history[name]

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """Keep every scalar metric (except ``epoch``) as ``(step, float)``."""
        if not self._should_draw(trainer):
            return
        for name, value in metrics.items():
            if name in SKIP:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):  # vectors (per-class metrics): not a curve
                continue
            self.history.setdefault(str(name), []).append((int(step), number))
        if not self._in_fit:  # standalone validate/test: no fit end will come
            self.save(trainer)

    @hookimpl
    def on_run_end(self, trainer: Trainer, stage: str, outcome: str) -> None:
        """Draw the fit that just ended, whatever the outcome; never masks an exception."""
        if stage != "fit":
            return  # standalone evaluations drew at their log_metrics
        self._in_fit = False
        if not self._should_draw(trainer):
            return
        try:
            self.save(trainer)
        except RunDirWriteError as exc:  # the run's own error comes first: one line
            if outcome != "exception":
                raise
            log.warning("curves_plot: %s", exc.reason)
        except Exception:
            if outcome != "exception":
                raise
            log.warning("curves_plot: could not draw the curves", exc_info=True)

    @hookimpl
    def state_dict(self) -> dict[str, Any]:
        """The history, JSON-safe (non-finite values as None)."""
        return {STATE_KEY: {name: [[s, v if math.isfinite(v) else None] for s, v in points]
                            for name, points in self.history.items()}}

    @hookimpl
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history of the checkpointed run."""
        saved = state.get(STATE_KEY)
        if saved is not None:
            self.history = {
                str(name): [(int(s), math.nan if v is None else float(v)) for s, v in points]
                for name, points in saved.items()
            }
