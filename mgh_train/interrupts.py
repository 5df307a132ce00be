"""Ctrl-C (SIGINT) and SIGTERM (what schedulers send before killing a job) during training: finish
the current step, write a checkpoint, say where it is and how to resume, and exit 130 or 143.

    with handling(log):                     # around a whole run (main thread; elsewhere a no-op)
        ...                                 # before the loop a signal stops at once (nothing to lose)
        deferring(resume_hint)              # from the loop's start: a signal only sets a flag
        for step in ...:
            signum = requested(ranks)       # after each step: the signal any rank received, or 0
            ... saved(checkpoint)           # after each checkpoint
            if signum: save a checkpoint; raise stopped(signum, step, checkpoint, resume_hint)
        immediate()                         # after the loop (its last checkpoint is written)

A second signal while the step finishes stops at once, losing the work since the last checkpoint.
:class:`Interrupted` derives from ``KeyboardInterrupt`` (as Python's own Ctrl-C), so ``except
Exception`` blocks do not swallow it; the command line prints its one line and exits with
:attr:`Interrupted.exit_status` (128 + the signal number, the shell's convention). With several
processes the flag is combined over the ranks after every step (one small all-reduce over gloo,
off the training device), so every rank stops after the same step and writes the same checkpoint.
DataLoader workers ignore both signals (:func:`quiet_worker`): the main process shuts them down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM; ``checkpoint``: what it wrote (or None), ``step``: the
    last step done (None: before training began)."""

    def __init__(self, message: str, *, signum: int, step: int | None = None, checkpoint=None):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Handler:
    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.phase = "before"  # before the loop, in it (signals deferred), after it
        self.received = 0
        self.last_checkpoint = None
        self.resume_hint = ""
        self.previous: dict = {}
        self.group = None  # gloo group for combining the flag where the default group is NCCL

    def __call__(self, signum, frame):
        name = signal.Signals(signum).name
        if self.phase == "loop" and not self.received:
            self.received = signum
            _write_stderr(
                f"{name} received: finishing the current step, then saving a checkpoint "
                f"({name} again stops at once, losing the work since the last checkpoint)\n"
            )
            return
        kept = (
            f"the last checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "no checkpoint was written"
        )
        if self.phase == "before":
            what = f"interrupted by {name} before training began; nothing was lost"
        elif self.phase == "loop":
            what = f"interrupted by a second {name} during a step, without saving it; {kept}"
        else:
            what = f"interrupted by {name} after training, before the model was saved; {kept}"
        if self.last_checkpoint is not None and self.resume_hint:
            what += "; " + self.resume_hint
        raise Interrupted(what, signum=signum, checkpoint=self.last_checkpoint)


_active: list = []


def _write_stderr(text: str) -> None:
    try:  # not print(): a handler may run while the main thread is inside a print to the same stream
        os.write(2, text.encode())
    except OSError:
        pass


@contextlib.contextmanager
def handling(log: Callable[[str], None] = print):
    """Install the SIGINT and SIGTERM handlers for the block (only in the main thread: elsewhere,
    and in a block nested in another, signals keep their handling)."""
    if threading.current_thread() is not threading.main_thread() or _active:
        yield None
        return
    handler = _Handler(log)
    for signum in SIGNALS:
        handler.previous[signum] = signal.signal(signum, handler)
    _active.append(handler)
    try:
        yield handler
    finally:
        _active.remove(handler)
        for signum, previous in handler.previous.items():
            signal.signal(signum, previous)


def deferring(resume_hint: str = "") -> None:
    """From now on a first signal only sets the flag :func:`requested` reads (``resume_hint``: how
    to resume, said when a second signal stops the run)."""
    if _active:
        _active[-1].phase, _active[-1].resume_hint = "loop", resume_hint


def saved(checkpoint) -> None:
    """The run wrote ``checkpoint`` (named if a later signal stops it)."""
    if _active:
        _active[-1].last_checkpoint = checkpoint


def immediate() -> None:
    """After the loop: a signal stops at once (the run's last checkpoint is written)."""
    if _active:
        _active[-1].phase = "after"


def requested(ranks=None) -> int:
    """The signal received since :func:`deferring` (0: none), on this rank or, with several ranks,
    on any of them (collective: every rank calls it after every step)."""
    handler = _active[-1] if _active else None
    if handler is None:  # signals are not ours to handle here (not the main thread)
        return 0
    if ranks is None or not ranks.distributed:
        return handler.received
    import torch
    import torch.distributed as dist

    if handler.group is None:
        handler.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    flag = torch.tensor([handler.received], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=handler.group)
    return int(flag.item())


def stopped(signum: int, step: int, checkpoint, resume_hint: str) -> Interrupted:
    """The :class:`Interrupted` a run raises after saving ``checkpoint`` at ``step`` on ``signum``."""
    name = signal.Signals(signum).name
    return Interrupted(
        f"interrupted by {name} after step {step}: checkpoint saved to {checkpoint}; {resume_hint}",
        signum=signum,
        step=step,
        checkpoint=checkpoint,
    )


def quiet_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and SIGTERM (a Ctrl-C reaches the
    whole process group); the main process finishes its step and shuts the workers down."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


__all__ = ["Interrupted", "deferring", "handling", "immediate", "quiet_worker", "requested", "saved", "stopped"]
