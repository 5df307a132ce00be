"""Row passes of the CPU paths over a block of scores or logits [..., cols]: the softmax's max,
clamped exponentials and row sums (the attention sweeps of ``attention/cpu_flash``, the loss of
``infonce/torch_path``), and exponentials shifted by a given log-sum-exp (the attention backward).

float32 blocks take the native library (``csrc/cpu_sweep.c`` through ``_native``), which reads each
row once for its max and once more, still in cache, for the exponentials and their sum; otherwise
(float64, ``MGH_NATIVE=0``, no compiler) the same arithmetic runs as PyTorch ops, one pass over the
block per op. Shifted values are clamped at ``floor`` (``_precision.exp_floor``) before exp.
"""

from __future__ import annotations

import torch

from . import _native


def _native_for(*tensors: torch.Tensor):
    """The library when every tensor is a contiguous float32 CPU tensor and it loads, else None."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return _native.library()


def softmax_(
    s: torch.Tensor,
    floor: float,
    top: torch.Tensor,
    total: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: float | None = None,
    store: bool = True,
) -> torch.Tensor:
    """In place over the rows of s [..., cols]: x = s * scale (``scale`` [cols], one per column, or
    None), top = ``shift`` if given else each row's max of x, s = exp(max(x - top, floor)), total =
    the row sums of the new s; ``top`` and ``total`` [..., 1] are written, s is returned. As
    ``torch.softmax`` before its division, with the clamp. A ``shift`` must bound every x from
    above and leave none more than -floor below it (the PyTorch ops then skip the clamp).
    ``store=False`` allows s to keep its values (the native pass then only reads it)."""
    extra = () if scale is None else (scale,)
    lib = _native_for(s, top, total, *extra)
    if lib is not None:
        lib.mgh_softmax_rows_f32(
            s.data_ptr(),
            s.numel() // s.shape[-1],
            s.shape[-1],
            None if scale is None else scale.data_ptr(),
            shift is not None,
            0.0 if shift is None else shift,
            floor,
            store,
            top.data_ptr(),
            total.data_ptr(),
            torch.get_num_threads(),
        )
        return s
    if shift is None:
        if scale is not None:
            s.mul_(scale)
        torch.amax(s, dim=-1, keepdim=True, out=top)
        s.sub_(top).clamp_min_(floor)
    else:  # no x - shift below the floor: one pass scales and shifts
        top.fill_(shift)
        if scale is None:
            s.sub_(shift)
        else:
            torch.addcmul(top.neg(), s, scale, out=s)
    s.exp_()
    torch.sum(s, dim=-1, keepdim=True, out=total)
    return s


def exp_shifted_(s: torch.Tensor, shift: torch.Tensor, floor: float) -> torch.Tensor:
    """In place: s = exp(max(s - shift, floor)), shift [..., 1] at least each row's max (the
    log-sum-exp); returns s."""
    shift = shift.contiguous()
    lib = _native_for(s, shift)
    if lib is not None:
        lib.mgh_exp_shifted_rows_f32(
            s.data_ptr(), s.numel() // s.shape[-1], s.shape[-1], shift.data_ptr(), floor, torch.get_num_threads()
        )
        return s
    return s.sub_(shift).clamp_min_(floor).exp_()
