"""The tests' one hook recorder: a plugin that records the calls of the hooks it is named.

Modelled on pytest's ``HookRecorder`` (``getcalls("pytest_runtest_logreport")``), but as a
plugin passed to the Trainer, so it sees the hooks from the first one on::

    recorder = HookRecorder("log_metrics", "on_save_checkpoint")
    make_trainer(tmp_path, recorder, max_epochs=2).fit(TinyTask())
    [(call.step, call.metrics) for call in recorder.getcalls("log_metrics")]
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import nnx_trainer
from nnx_trainer import hookspecs


class RecordedCall:
    """One hook call: ``hook_name``, each argument of the hook's spec as an attribute
    (``call.metrics``, ``call.step``), and ``global_step``: the trainer's step when the call
    was made (the trainer passed in keeps moving). Mapping arguments are copied at the
    call, as a logger that keeps them would copy them."""

    def __init__(self, hook_name: str, kwargs: Mapping[str, Any]) -> None:
        self.hook_name = hook_name
        self.kwargs = {k: dict(v) if isinstance(v, Mapping) else v for k, v in kwargs.items()}
        self.global_step: int | None = getattr(kwargs.get("trainer"), "global_step", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["kwargs"][name]
        except KeyError:
            raise AttributeError(f"{self.hook_name} has no argument {name!r}") from None

    def __repr__(self) -> str:
        return f"<RecordedCall {self.hook_name} at step {self.global_step}>"


class HookRecorder:
    """A plugin that records every call of the named hooks, in call order."""

    def __init__(self, *hook_names: str, name: str = "hook_recorder") -> None:
        if not hook_names:
            raise ValueError("name the hooks to record, e.g. HookRecorder('log_metrics')")
        self.name = name
        self._calls: list[RecordedCall] = []
        for hook_name in hook_names:
            setattr(self, hook_name, self._recording(hook_name))

    def getcalls(self, *hook_names: str) -> list[RecordedCall]:
        """The recorded calls of these hooks (all recorded hooks if none is named)."""
        return [c for c in self._calls if not hook_names or c.hook_name in hook_names]

    def logged(self, floats: bool = False) -> list[tuple[int, dict[str, Any]]]:
        """The ``log_metrics`` calls as ``(step, metrics)``: the values as they were passed,
        or each read as a Python float (``floats=True``), as a logger writing numbers would."""
        return [(call.step, {k: float(v) for k, v in call.metrics.items()} if floats
                 else call.metrics) for call in self.getcalls("log_metrics")]

    def losses(self) -> dict[int, float]:
        """``{step: loss}`` of the recorded ``on_train_batch_end`` calls, in call order."""
        return {call.step: float(call.loss) for call in self.getcalls("on_train_batch_end")}

    def _recording(self, hook_name: str) -> Callable[..., None]:
        spec = getattr(hookspecs, hook_name, None)
        if not hasattr(spec, f"{hookspecs.PROJECT_NAME}_spec"):  # set by @hookspec
            raise ValueError(f"{hook_name!r} is not a hook of nnx_trainer.hookspecs")
        arg_names = tuple(inspect.signature(spec).parameters)

        def record(*args: Any) -> None:  # pluggy passes the spec's arguments in order
            self._calls.append(RecordedCall(hook_name, dict(zip(arg_names, args, strict=True))))

        # The spec's signature is the recorder's: pluggy reads the argument names through
        # ``inspect.unwrap``, so the recorder asks for every argument the hook has.
        functools.update_wrapper(record, spec, assigned=("__name__", "__qualname__"),
                                 updated=())
        return nnx_trainer.hookimpl(record)
