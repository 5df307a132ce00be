"""Folders written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(path, markers=()) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; on success it replaces ``path``.

    If the block raises, the temporary folder is removed and ``path`` is left as it was (absent,
    or the previous folder): a failed save never leaves a half-written model behind. An existing
    ``path`` is replaced only if it is empty or holds one of the files ``markers`` (a model folder
    written before): any other folder is refused with a ValueError, never deleted.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir() or (any(path.iterdir()) and not any((path / m).is_file() for m in markers)):
            raise ValueError(
                f"output: {path} exists and is not a model folder written before; "
                "choose a new folder (nothing was written)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_folder"]
