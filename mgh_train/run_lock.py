"""One run per run folder at a time: an exclusive lock on ``<output>/.lock`` held for the run's life.

    with holding():                 # around a whole run: every lock taken inside is released on exit
        take(cfg.output)            # ValueError naming the holder (pid, host, start) if another run has it

The lock is ``fcntl.flock`` on an open file: the kernel releases it when the process ends however it
ends (exit, exception, SIGKILL), so a lock left behind by a killed run never blocks the next one
(its file stays, unlocked, and is taken over). A run that ends removes the file, so a finished
run folder holds no trace of it. Only one process of a multi-process run
(rank 0) takes it. On a system without ``fcntl`` (Windows) nothing is locked. Network file systems
that do not implement ``flock`` across hosts lock per host only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"

_held: list = []  # stack of lists of open lock files, one per active holding() block


class RunFolderLock:
    """The lock of one run folder, taken (an open file holding ``flock(LOCK_EX)``) or not."""

    def __init__(self, output):
        self.output = Path(output)
        self.path = self.output / LOCK_NAME
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunFolderLock:
        """Take the lock without waiting; ValueError naming the holder if another process has it."""
        if fcntl is None or self.held:
            return self
        self.output.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = describe_holder(handle.read())
                handle.close()
                raise ValueError(
                    f"output: {self.output} is in use by another run ({holder}); wait for it to end, "
                    "or choose another --output"
                ) from None
            if _same_file(handle, self.path):
                break
            handle.close()  # the holder removed the file as we opened it: lock the one there now
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            )
            + "\n"
        )
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (a process waiting on the old file sees it is gone)."""
        if self._file is not None:
            try:
                if _same_file(self._file, self.path):
                    self.path.unlink()
            except OSError:
                pass
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            finally:
                self._file.close()
                self._file = None


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def describe_holder(text: str) -> str:
    """ "pid N on host H, started T" from the lock file's text (what a holder wrote)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


@contextlib.contextmanager
def holding():
    """Release every lock :func:`take` takes inside this block when it ends, however it ends."""
    locks: list = []
    _held.append(locks)
    try:
        yield locks
    finally:
        _held.remove(locks)
        for lock in reversed(locks):
            lock.release()


def take(output) -> RunFolderLock | None:
    """Lock ``output`` for the innermost :func:`holding` block (ValueError if another run holds it).
    Taking a folder this process already holds in that block again is a no-op."""
    if not _held:
        raise RuntimeError("run_lock.take() outside a holding() block would never release the lock")
    locks = _held[-1]
    path = Path(output).resolve()
    for lock in locks:
        if lock.output.resolve() == path:
            return lock
    lock = RunFolderLock(output).acquire()
    locks.append(lock)
    return lock


__all__ = ["LOCK_NAME", "RunFolderLock", "describe_holder", "holding", "take"]
