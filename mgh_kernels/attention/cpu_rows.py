"""The row passes of the CPU sweeps (``cpu_flash``) over a block of scores [n, rows, keys].

float32 blocks take the native library (``csrc/cpu_sweep.c`` through ``_native``), which reads each
row once for its max and once more, still in cache, for the exponentials and their sum; otherwise
(float64, ``MGH_NATIVE=0``, no compiler) the same arithmetic runs as PyTorch ops, one pass over the
block per op. Both clamp the shifted scores at ``floor`` (``_precision.exp_floor``) before exp.
"""

from __future__ import annotations

import torch

from .. import _native


def _native_for(*tensors: torch.Tensor):
    """The library when every tensor is a contiguous float32 CPU tensor and it loads, else None."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return _native.library()


def softmax_(s: torch.Tensor, floor: float, top: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """In place: s = exp(max(s - top, floor)) with top [n, rows, 1] the row max of s, then total
    [n, rows, 1] the row sums of the new s; ``top`` and ``total`` are written, s is returned. As
    ``torch.softmax`` before its division, with the clamp."""
    lib = _native_for(s, top, total)
    if lib is not None:
        lib.mgh_softmax_rows_f32(s.data_ptr(), s.numel() // s.shape[-1], s.shape[-1], floor, top.data_ptr(),
                                 total.data_ptr(), torch.get_num_threads())
        return s
    torch.amax(s, dim=-1, keepdim=True, out=top)
    s.sub_(top).clamp_min_(floor).exp_()
    torch.sum(s, dim=-1, keepdim=True, out=total)
    return s


def exp_shifted_(s: torch.Tensor, shift: torch.Tensor, floor: float) -> torch.Tensor:
    """In place: s = exp(max(s - shift, floor)), shift [n, rows, 1] at least each row's max (the
    log-sum-exp); returns s."""
    shift = shift.contiguous()
    lib = _native_for(s, shift)
    if lib is not None:
        lib.mgh_exp_shifted_rows_f32(s.data_ptr(), s.numel() // s.shape[-1], s.shape[-1], shift.data_ptr(), floor,
                                     torch.get_num_threads())
        return s
    return s.sub_(shift).clamp_min_(floor).exp_()
