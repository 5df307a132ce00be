"""Helpers for testing the fused ops and code built on them: poisoned outputs, recorded launches.

Scope: observation only; what runs is unchanged (apart from NaN in memory a kernel was going to
overwrite). Both context managers are process-wide and may be nested. To force a path use
:func:`mgh_kernels.use_backend`; to change tiles, the documented settings of
``mgh_kernels.attention.tiles`` and ``mgh_kernels.infonce.tiles``.
"""

from __future__ import annotations

import contextlib

import torch

from . import _launch
from ._launch import Launch

__all__ = ["Launch", "poisoned_outputs", "recorded_launches"]


@contextlib.contextmanager
def poisoned_outputs():
    """Every kernel output allocated inside the block starts filled with NaN (integers: their
    largest value), so an element a kernel forgets to write fails a comparison. Yields the list of
    the allocated shapes, in order (e.g. to check that no L x L buffer was allocated).

    Example::

        with mgh_kernels.testing.poisoned_outputs() as shapes:
            out, colsum = ata_attention(q, k, v)
        assert all(math.prod(s) < L * L for s in shapes)

    The analogue of filling ``torch.empty``'s memory with NaN (``torch.use_deterministic_algorithms``
    with ``torch.utils.deterministic.fill_uninitialized_memory``), for the kernels' own outputs.
    """
    shapes = []

    def poisoned(shape, dtype, device):
        shapes.append(tuple(shape))
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, fill, dtype=dtype, device=device)

    saved = _launch.allocator
    _launch.allocator = poisoned
    try:
        yield shapes
    finally:
        _launch.allocator = saved


@contextlib.contextmanager
def recorded_launches(run: bool = True):
    """Record every Triton kernel launch inside the block. Yields a list that receives one
    :class:`Launch` per launch, in order: ``launch.name`` (the kernel's name), ``launch.arguments``
    (by parameter name, constexpr tiles included), ``launch.grid``, ``launch.kwargs``.

    Args:
        run: launch the kernels too (default); False records them only (e.g. to compile them ahead
            of time from a forward and backward run on ``meta`` tensors).

    Example::

        with mgh_kernels.testing.recorded_launches() as launches:
            ata_attention(q, k, v)
        print([launch.name for launch in launches])   # ['_fwd_kernel', '_colsum_kernel'] ...

    Like ``torch.profiler`` for the kernels' names and arguments, without a profiler or a device.
    """
    records = []
    entry = (records, run)
    _launch.recorders.append(entry)
    try:
        yield records
    finally:
        _launch.recorders[:] = [other for other in _launch.recorders if other is not entry]
