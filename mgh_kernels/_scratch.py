"""Per-thread scratch buffers that the CPU paths reuse from one call to the next.

A fresh tensor of a few MiB is fresh pages: glibc returns large blocks to the OS when they are
freed, so every call would fault its working memory in again, page by page, which can cost as
much as the GEMM that fills the block. The CPU sweeps (``attention/cpu_flash.py``,
``infonce/torch_path.py``) therefore take their blocks from here.

Rules for callers: a scratch tensor lives until the same thread asks for the same name again, so it
never leaves the function that asked for it (not returned, not saved for backward), and holds
garbage when handed out (write it in full, e.g. a GEMM with ``beta=0`` or ``out=``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

KEEP_ELEMENTS = 1 << 22
"""Largest buffer kept per (name, dtype) and thread (16 MiB in float32); larger requests get fresh
memory each time."""

_local = threading.local()


def scratch(name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` and ``dtype`` on ``device``, the calling thread's reused
    buffer ``name`` when the device is the CPU and it holds at most ``KEEP_ELEMENTS``, else new."""
    count = math.prod(shape)
    if torch.device(device).type != "cpu" or count > KEEP_ELEMENTS:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < count:
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            buffer = buffers[(name, dtype)] = torch.empty(count, dtype=dtype)
    return buffer[:count].view(shape)


def release() -> None:
    """Frees the calling thread's scratch buffers (they are made again on the next call)."""
    _local.__dict__.pop("buffers", None)
