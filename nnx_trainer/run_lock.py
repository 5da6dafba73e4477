"""One run directory, one run: an exclusive OS lock on ``run_dir/.lock``.

Every fit, validate, test and predict call holds the lock of its run directory from
before anything is read from or written into it until its plugins have torn down
(``on_run_end``). A second launch into the same directory, in any process on any host
that sees the same file system, is refused at once with :class:`RunDirInUse`, naming
the holder (host, PID, since when, what it runs) and the fix, having touched nothing:
not the config, not a checkpoint, not a log line.

The lock is ``flock(2)`` on an open file, so the operating system releases it when the
holder's process dies, however it dies: ``kill -9`` leaves no stale lock to clear by
hand. The file's content (JSON: ``host``, ``pid``, ``since``, ``stage``) is written
after the lock is held and only informs the refusal message; a file left behind by a
killed run is harmless (the next holder rewrites it). ``flock`` is per open file, not
per process: two Trainers in one process exclude each other too. On Linux NFS ``flock``
is carried by NFS byte-range locks, so hosts sharing a run directory exclude each other;
a file system without ``flock`` support (Lustre mounted without ``-o flock``) gets a
warning and the run goes on unlocked rather than not at all.

A holder removes the file on release while still holding the lock; a launcher that
opened the old file just before that and then gets the lock notices the file is gone
(another inode, or none, at the path) and starts over, so two runs never hold two
different lock files of one directory. A run directory that this run created and that
holds nothing else when it ends (a start refused by a bad option, say) is removed
again, so a failed start leaves no empty run directory behind.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"
# flock(2) errors meaning "not supported here" rather than "held by another".
_NO_FLOCK = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})
log = logging.getLogger("nnx_trainer")
__all__ = ["LOCK_NAME", "RunDirInUse", "RunDirLock"]


class RunDirInUse(ValueError):
    """The run directory is held by another live run (the message names it and the fix)."""


class RunDirLock:
    """The exclusive lock of one run directory, held between :meth:`acquire` and
    :meth:`release`.

    :param run_dir: the run directory (created by :meth:`acquire` when missing).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories acquire made, outermost last

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, stage: str = "fit") -> None:
        """Take the lock, or raise :class:`RunDirInUse` without changing anything.

        :param stage: what the holder runs, recorded for the refusal message of others.
        """
        if self._fd is not None:
            return
        self._created = _missing_dirs(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    log.warning(
                        "cannot lock %s: its file system does not support flock (%s, e.g. "
                        "Lustre mounted without -o flock); running without the lock, so a "
                        "second launch into %s would not be refused", self.path,
                        os.strerror(exc.errno), self.run_dir)
                    return
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirInUse(refusal(self.run_dir, holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed that file as it released: retry
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                  "stage": stage}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError:
            os.close(fd)  # a full or read-only disk: fail here, holding nothing
            raise
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (removing its file first); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)  # while still locked: see the module docstring
            for directory in self._created:  # innermost first; only while empty
                directory.rmdir()
        except OSError:
            pass  # a directory in use, or a failing disk: the lock still goes with the fd
        finally:
            self._created = []
            os.close(fd)


def refusal(run_dir: Path, holder: dict | None) -> str:
    """The message of a refused launch: who holds ``run_dir`` and what to do."""
    if holder:
        who = (f"{holder.get('stage', 'a run')} in PID {holder.get('pid', '?')} on host "
               f"{holder.get('host', '?')}, running since {holder.get('since', '?')}")
    else:
        who = "just starting: its host and PID are not recorded yet"
    return (f"run directory {run_dir} is in use by another run ({who}; lock file "
            f"{run_dir / LOCK_NAME}). Nothing was written. Wait until that run ends, or "
            "choose another run directory (--run-dir, Trainer(run_dir=...)); the lock "
            "goes away with its process, even a killed one")


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    path = path.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read_holder(fd: int) -> dict | None:
    """The holder's record in the lock file, or None while it has not written it yet."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        record = json.loads(text)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
