"""Launching the Triton kernels: tile arithmetic, output allocation and the launch itself.

Scope: host-side only, and no triton import (the kernel objects come from the kernel files), so
the tile choices and the planner that use ``cdiv`` and ``next_power_of_2`` run without triton.
Every kernel launch (``run``) and every kernel output (``new_output``) passes through here, which
lets :mod:`mgh_kernels.testing` poison the outputs with NaN and record the launches, and lets
``tests/gpu_compile.py`` capture launches on meta tensors without running them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

LOG2E = 1.4426950408889634
"""log2(e): the attention kernels keep scores and log-sum-exps in log2 units (exp2 is the GPU's
native exponential), so the softmax scale reaches them as ``scale * LOG2E``."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers (``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1; ``triton.next_power_of_2``)."""
    return 1 << max(0, int(n) - 1).bit_length()


class Launch(NamedTuple):
    """One kernel launch as :func:`run` received it: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        """The kernel's function name, e.g. ``"_colsum_kernel"``."""
        return self.kernel.__name__

    @property
    def arguments(self) -> dict:
        """The kernel's arguments by parameter name (launch options such as num_warps excluded)."""
        names = list(self.kernel.arg_names)
        named = dict(zip(names, self.args))
        named.update((key, value) for key, value in self.kwargs.items() if key in names)
        return named


# Set by mgh_kernels.testing: a function (shape, dtype, device) -> tensor replacing torch.empty, and
# (records, run) pairs that receive every launch (run False: record it, do not launch it).
allocator: Callable | None = None
recorders: list = []


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a kernel to write (every kernel output is allocated here)."""
    if allocator is not None:
        return allocator(tuple(shape), dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def run(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, seen first by any recorder."""
    launch = True
    for records, execute in recorders:
        records.append(Launch(kernel, grid, args, kwargs))
        launch = launch and execute
    if launch:
        kernel[grid](*args, **kwargs)
