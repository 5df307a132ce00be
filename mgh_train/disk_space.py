"""A full disk while a checkpoint is written: one line, no partial checkpoint, the last good one kept.

    with saving(output, step, embedder):     # around save_checkpoint(output, step=step, ...)
        save_checkpoint(...)

Before writing, the free space of ``output`` is compared with the checkpoint's likely size: the
newest checkpoint's files (rounded up to 4 KiB blocks), or, before the first, three times the
trainable weights (the weights and AdamW's two moments). Too little, and nothing is written. A write
that still fails for want of space (``ENOSPC``/``EDQUOT``, or ``torch.save``'s
``[enforce fail at inline_container.cc] unexpected pos`` with the disk found full) removes the
temporary ``step-N.tmp`` folder. Both end in :class:`DiskFull`, whose message starts ``no space left
on device while saving step N; the last good checkpoint is step M``; ``--resume latest`` then takes
step M (the checkpoints written before are untouched).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

BLOCK = 4096
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(RuntimeError):
    """No room for a checkpoint; ``step``: the one not written, ``last_good``: the newest intact
    checkpoint folder (None: there is none)."""

    def __init__(self, message: str, *, step: int, last_good: Path | None):
        super().__init__(message)
        self.step, self.last_good = step, last_good


def _checkpoints(output: Path) -> list:
    from .checkpoints import list_checkpoints

    return list_checkpoints(output)


def _on_disk(folder: Path) -> int:
    return sum(-(-p.stat().st_size // BLOCK) * BLOCK for p in folder.rglob("*") if p.is_file())


def estimate(output: Path, embedder=None) -> int:
    """Bytes the next checkpoint of ``output`` likely takes (0: unknown)."""
    found = _checkpoints(output)
    if found:
        return _on_disk(found[-1])
    if embedder is None:
        return 0
    trainable = sum(p.numel() * p.element_size() for p in embedder.parameters() if p.requires_grad)
    return 3 * trainable


def message(output: Path, step: int, need: int | None = None) -> DiskFull:
    """The :class:`DiskFull` of a save of ``step`` into ``output``."""
    found = _checkpoints(output)
    last = found[-1] if found else None
    from .checkpoints import step_of

    kept = (
        (f"the last good checkpoint is step {step_of(last)} ({last}); free some space and resume with --resume latest")
        if last is not None
        else "no checkpoint was written before it; free some space"
    )
    free = shutil.disk_usage(output).free
    room = f" ({_mb(free)} free in {output}, about {_mb(need)} needed)" if need else f" ({_mb(free)} free in {output})"
    return DiskFull(f"no space left on device while saving step {step}; {kept}{room}", step=step, last_good=last)


def _mb(size: int) -> str:
    return f"{size / 2**20:.2f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"


def is_disk_full(error: BaseException, output: Path, need: int) -> bool:
    """Whether ``error`` (raised while writing into ``output``) comes from a full disk."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    if isinstance(error, RuntimeError) and ("inline_container" in str(error) or "write failed" in str(error)):
        return shutil.disk_usage(output).free < max(need, BLOCK)  # torch.save's writer does not say why
    return False


@contextlib.contextmanager
def saving(output, step: int, embedder=None):
    """Around the save of checkpoint ``step`` into ``output``: refuse it before writing where the
    disk has too little room, and turn a write that fails for want of space into :class:`DiskFull`
    after removing ``checkpoints/step-N.tmp``."""
    output = Path(output)
    need = estimate(output, embedder)
    if need and shutil.disk_usage(output).free < need:
        raise message(output, step, need)
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error, output, need):
            raise
        shutil.rmtree(output / "checkpoints" / f"step-{step:07d}.tmp", ignore_errors=True)
        raise message(output, step, need) from None


__all__ = ["DiskFull", "estimate", "is_disk_full", "message", "saving"]
