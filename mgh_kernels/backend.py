"""Which code runs a fused op: the Triton kernels, Triton's interpreter, or the PyTorch path.

* CUDA tensors: the Triton kernels (``"triton"``).
* CPU tensors with ``TRITON_INTERPRET=1`` set before ``mgh_kernels`` is imported: the same kernels
  under Triton's interpreter (``"triton-interpreter"``, what the CPU tests run). The interpreter has
  no bfloat16, so only float16 and float32 take it.
* Anything else, and every tensor where triton is not installed (macOS, Windows): the op's
  memory-frugal PyTorch path (``"torch-chunked"``). It handles a chunk of queries at a time (at most
  ``CHUNK_ELEMENTS`` scores or logits) and re-computes the chunk in backward, so it never holds the
  whole L x L attention or B x N logit matrix.

``use_backend("torch")`` runs the PyTorch path inside a ``with`` block (and may set its chunk size);
``use_backend("triton")`` refuses to fall back to it. Each op records the path its latest call
took: ``mgh_kernels.attention.last_backend()``, ``mgh_kernels.infonce.last_backend()``.

Caveat: the forced choice is a process-wide setting (torch.compile guards on it), not a per-thread
one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.utils.checkpoint

from ._precision import cast_dtype

__all__ = ["CHUNK_ELEMENTS", "INTERPRETER", "TORCH", "TRITON", "LastPath", "chunk_elements", "select", "use_backend"]

TRITON, INTERPRETER, TORCH = "triton", "triton-interpreter", "torch-chunked"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        return False


TRITON_AVAILABLE = _installed("triton")
"""Whether triton can be imported here; without it every call takes the PyTorch path."""
INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels were defined under Triton's interpreter (read once, at import)."""
CHUNK_ELEMENTS = 1 << 22
"""The PyTorch path's default chunk: scores (attention) or logits (InfoNCE) per chunk, 16 MiB in float32."""

_forced: str | None = None
_chunk_elements = CHUNK_ELEMENTS


@contextlib.contextmanager
def use_backend(name: str = "auto", *, chunk_elements: int | None = None):
    """Choose the path of every fused op called inside the ``with`` block.

    Args:
        name: ``"torch"``: the PyTorch path for every tensor (a user's CPU run, or a comparison with
            the kernels); ``"triton"``: the Triton kernels (interpreted where ``TRITON_INTERPRET=1``
            was set), and a ``ValueError`` where they cannot run the inputs instead of the
            PyTorch path; ``"auto"``: the default choice (see the module docstring).
        chunk_elements: the PyTorch path's chunk size in scores or logits (default
            ``CHUNK_ELEMENTS``); smaller chunks hold less memory and launch more ops.

    Example::

        with mgh_kernels.use_backend("torch"):
            out, colsum = ata_attention(q, k, v)     # attention.last_backend() == "torch-chunked"

    Like ``torch.nn.attention.sdpa_kernel`` for SDPA's backends, but process-wide, and restored on
    leaving the block.
    """
    global _forced, _chunk_elements
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"name: expected 'auto', 'torch' or 'triton', got {name!r}")
    if name == "triton" and not TRITON_AVAILABLE:
        raise ValueError("name: 'triton' needs the triton package, which is not installed here")
    if chunk_elements is not None and (
        isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1
    ):
        raise ValueError(f"chunk_elements: expected a positive integer, got {chunk_elements!r}")
    saved = _forced, _chunk_elements
    _forced = None if name == "auto" else name
    _chunk_elements = chunk_elements or _chunk_elements
    try:
        yield
    finally:
        _forced, _chunk_elements = saved


def chunk_elements() -> int:
    """The PyTorch path's chunk size in force (see :func:`use_backend`)."""
    return _chunk_elements


def _natural(t: torch.Tensor, dtype: torch.dtype) -> str:
    if not TRITON_AVAILABLE:
        return TORCH
    if t.is_cuda:
        return TRITON
    if t.device.type == "cpu" and INTERPRETED and dtype in (torch.float16, torch.float32):
        return INTERPRETER
    return TORCH


def select(t: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """The path for an op whose main input is ``t``, computing in ``dtype`` (default ``t.dtype``):
    ``TRITON``, ``INTERPRETER`` or ``TORCH``, as the module docstring and :func:`use_backend` say."""
    dtype = dtype or t.dtype
    if _forced == "torch":
        return TORCH
    natural = _natural(t, dtype)
    if natural == TORCH and _forced == "triton":
        raise ValueError(
            f"q: the Triton kernels cannot run {dtype} tensors on {t.device.type} here, and use_backend('triton') "
            "refuses the PyTorch path (they run on CUDA, and float16/float32 on the CPU with TRITON_INTERPRET=1 "
            "set before import)"
        )
    return natural


class LastPath:
    """The path the latest call of one op took: ``backend`` (``TRITON``, ``INTERPRETER`` or
    ``TORCH``; None before the first call) and, for attention, ``forward`` (which forward kernel
    ran). Read through the op's ``last_backend()`` / ``last_forward()``."""

    def __init__(self) -> None:
        self.backend: str | None = None
        self.forward: str | None = None


class Dispatch(NamedTuple):
    """What :func:`dispatch` decided for one call."""

    backend: str
    dtype: torch.dtype  # the dtype the op computes in, after autocast's cast
    compiling: bool  # torch.compile is tracing the call: the kernels run behind custom ops


def dispatch(
    op: str,
    q: torch.Tensor,
    amp: torch.dtype | None,
    record: LastPath,
    log: logging.Logger,
    describe: Callable[[], str],
) -> Dispatch:
    """The preamble every fused op runs after checking its arguments: the compute dtype under
    autocast (``amp``), the path, a check that the path takes that dtype, the record of the path,
    and a debug log line naming the shapes (``describe()``), not while torch.compile traces (a
    logging call is a graph break, and formatting symbolic sizes would specialise them)."""
    dtype = cast_dtype(q, amp)
    backend = select(q, dtype)
    if backend != TORCH and dtype not in KERNEL_DTYPES:
        raise ValueError(f"q: expected float16, bfloat16 or float32 on {q.device.type}, got {dtype}")
    record.backend = backend
    compiling = torch.compiler.is_compiling()
    if not compiling and log.isEnabledFor(logging.DEBUG):
        log.debug("%s: %s path for %s %s", op, backend, describe(), dtype)
    return Dispatch(backend, dtype, compiling)


def chunked(fn, chunks, inputs) -> list:
    """The PyTorch path's loop: ``fn(*args)`` for each ``args`` of ``chunks``, each under activation
    checkpointing when a gradient of ``inputs`` will be taken (the chunk's scores are re-computed in
    backward instead of stored)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if not grad:
        return [fn(*args) for args in chunks]
    return [torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) for args in chunks]
