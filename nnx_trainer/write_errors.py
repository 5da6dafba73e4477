"""A write under the run directory failed: one error that names what, where and why.

A disk that fills up or turns read-only mid-run must end the run within seconds with
one clear message (the design's reliability rules), whichever writer meets it first:
the checkpoint plugin, the metrics, TensorBoard or plot writers. Each of them raises
:class:`RunDirWriteError`, an ``OSError`` that keeps the operating system's ``errno``
and names the file, the step and what to do; the command line prints it as one line
and exits 1.

Orbax's background writes report TensorStore failures as ``ValueError`` text carrying
``[os_error_code='28']``; :func:`os_error_of` finds the OS error behind either form.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import os
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RunDirWriteError", "os_error_of", "writing"]

_TENSORSTORE_CODE = re.compile(r"os_error_code='?(\d+)")
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")
# What a failing disk answers to a write (full, read-only, gone bad, quota, no access).
WRITE_ERRNOS = frozenset({errno_lib.ENOSPC, errno_lib.EROFS, errno_lib.EIO, errno_lib.EDQUOT,
                          errno_lib.EFBIG, errno_lib.EACCES, errno_lib.EPERM})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def os_error_of(exc: BaseException | None) -> tuple[int, str] | None:
    """``(errno, strerror)`` of the operating system error behind ``exc``, else None.

    Looks through the exception's causes for an ``OSError`` with an ``errno``, or for
    the error text TensorStore and Orbax's threads carry (``os_error_code='28'``,
    ``[Errno 30]``).
    """
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno:
            return link.errno, link.strerror or os.strerror(link.errno)
    for link in _chain(exc):
        found = _TENSORSTORE_CODE.search(str(link)) or _ERRNO_TEXT.search(str(link))
        if found:
            code = int(found.group(1))
            return code, os.strerror(code)
    return None


class RunDirWriteError(OSError):
    """A file of the run could not be written (disk full, read-only, I/O error).

    :ivar what: what was being written, e.g. ``"the checkpoint of step 40"``.
    :ivar path: where.
    :ivar step: the training step it belongs to (``None``: not tied to one).
    :ivar advice: what to do, one sentence.
    """

    def __init__(self, what: str, path: str | Path, cause: BaseException, *,
                 step: int | None = None, advice: str | None = None) -> None:
        code, reason = os_error_of(cause) or (None, f"{type(cause).__name__}: {cause}")
        super().__init__(code, reason, str(path))
        self.what, self.path, self.step = what, Path(path), step
        self.advice = advice or (
            "free space on that disk or make it writable, then continue from the last "
            "checkpoint (ckpt_path='last')")

    @property
    def reason(self) -> str:
        """The message without the advice: what, where and the OS error."""
        code = f"[Errno {self.errno}] " if self.errno else ""
        return f"could not write {self.what} to {self.path}: {code}{self.strerror}"

    def __str__(self) -> str:
        return f"{self.reason}. The run stops here; {self.advice}"


@contextlib.contextmanager
def writing(what: str, path: str | Path, *, step: int | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`RunDirWriteError`.

    The original traceback (deep in a file library) adds nothing to the message, so
    it is not chained; the ``errno`` is kept.
    """
    try:
        yield
    except RunDirWriteError:
        raise
    except OSError as exc:
        raise RunDirWriteError(what, path, exc, step=step) from None
