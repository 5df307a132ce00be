"""Which code runs a fused op, in which precision, and where kernel outputs are allocated.

* CUDA tensors: the Triton kernels (``"triton"``).
* CPU tensors with ``TRITON_INTERPRET=1`` set before import: the same kernels under Triton's
  interpreter (``"triton-interpreter"``; it has no bfloat16, so float16 and float32 only).
* Anything else: the op's memory-frugal PyTorch path (``"torch-chunked"``).

Autocast: the fused ops follow PyTorch's rule for its lower-precision ops (SDPA, matmul). Inside
``torch.autocast`` for the inputs' device type, floating-point inputs other than float64 are cast
once to the autocast dtype and the op runs with autocast off; outside autocast, inputs of mixed
dtypes are an error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON, INTERPRETER, CHUNKED = "triton", "triton-interpreter", "torch-chunked"
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def select(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> str:
    """The path for an op whose main input is ``t``, computing in ``dtype`` (default ``t.dtype``)."""
    dtype = dtype or t.dtype
    if t.is_cuda:
        return TRITON
    if t.device.type == "cpu" and INTERPRETED and dtype in (torch.float16, torch.float32):
        return INTERPRETER
    return CHUNKED


def check_kernel_dtype(name: str, dtype: torch.dtype, device: torch.device, backend: str) -> None:
    if backend != CHUNKED and dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16 or float32 on {device.type}, got {dtype}")


def new_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype autocast gives lower-precision ops on the device of the tensor ``t``, or None where
    it is off (and for anything not a tensor, which the argument checks then refuse)."""
    kind = t.device.type if isinstance(t, torch.Tensor) else None
    if kind in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _castable(t, device_type: str) -> bool:
    # autocast's own rule: floating-point tensors on its device, float64 excepted
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64)


def cast_dtype(t: torch.Tensor, amp: Optional[torch.dtype]) -> torch.dtype:
    """The dtype ``t`` computes in: ``amp`` (an autocast dtype) where autocast casts ``t``, else its own."""
    return amp if amp is not None and _castable(t, t.device.type) else t.dtype


def autocast_inputs(amp: Optional[torch.dtype], *tensors):
    """``tensors`` cast to ``amp`` as autocast casts the inputs of its lower-precision ops (None
    and non-tensors pass through; ``amp`` None returns them unchanged)."""
    if amp is None:
        return tensors
    return tuple(t.to(amp) if _castable(t, t.device.type) else t for t in tensors)


def autocast_off(device: torch.device):
    """A context in which autocast is off for ``device``'s type (the fused ops' bodies run in it,
    so their own float32 arithmetic stays float32)."""
    if device.type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


_AUTOCAST_LIBRARY = torch.library.Library("mgh", "FRAGMENT")


def register_autocast(qualname: str, cast: Sequence[int]) -> None:
    """Give the custom op ``qualname`` ("mgh::name") autocast's behaviour for lower-precision ops,
    on CPU and CUDA: the positional arguments at ``cast`` are cast to the autocast dtype in force
    at the call (read at run time, unlike ``torch.library.register_autocast``'s fixed dtype), the
    others are left as they are, and the op runs with autocast off."""
    name = qualname.split("::", 1)[1]
    overload = getattr(torch.ops.mgh, name).default

    def kernel_for(device_type: str):
        def kernel(*args):
            amp = torch.get_autocast_dtype(device_type)
            args = list(args)
            for i in cast:
                if _castable(args[i], device_type):
                    args[i] = args[i].to(amp)
            with torch.autocast(device_type, enabled=False):
                return overload(*args)

        return kernel

    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _AUTOCAST_LIBRARY.impl(name, kernel_for(device_type), key)
