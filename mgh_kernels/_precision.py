"""Precision: the dtype each computation runs in, and autocast as PyTorch's fused ops follow it.

Scope: the rule the references and the PyTorch paths compute by (float64 inputs in float64,
everything else in float32), the precision the Triton kernels ask of ``tl.dot``, and autocast.

Autocast follows PyTorch's rule for its lower-precision ops (SDPA, matmul): inside
``torch.autocast`` for the inputs' device type, floating-point inputs other than float64 are cast
once to the autocast dtype and the op runs with autocast off, so its own float32 arithmetic stays
float32; outside autocast, inputs of mixed dtypes are an error (``_validation.check_same_dtype``).
Autocast is followed on CPU and CUDA only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype eager code computes in for inputs of ``dtype``: float64 for float64 (so tests can
    measure a kernel's error against a float64 truth), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def exp_floor(dtype: torch.dtype) -> float:
    """The least exponent whose exp is a normal ``dtype`` number. The PyTorch paths clamp
    max-subtracted logits to it before ``exp_``: the CPU's vectorised exp is tens of times slower
    where its result underflows (masked scores, or any 87 below the row's maximum in float32), and
    the clamped terms add under 1e-37 to a softmax sum of at least 1."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: true float32 products ("ieee", not
    TF32) for float32, Triton's default for half precision."""
    return "ieee" if dtype == torch.float32 else None


def autocast_dtype(t) -> torch.dtype | None:
    """The dtype autocast gives lower-precision ops on the device of the tensor ``t``, or None where
    it is off (and for anything not a tensor, which the argument checks then refuse)."""
    kind = t.device.type if isinstance(t, torch.Tensor) else None
    if kind in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _castable(t, device_type: str) -> bool:
    # autocast's own rule: floating-point tensors on its device, float64 excepted
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.device.type == device_type
        and t.dtype != torch.float64
    )


def cast_dtype(t: torch.Tensor, amp: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` computes in: ``amp`` (an autocast dtype) where autocast casts ``t``, else its own."""
    return amp if amp is not None and _castable(t, t.device.type) else t.dtype


def autocast_inputs(amp: torch.dtype | None, *tensors):
    """``tensors`` cast to ``amp`` as autocast casts the inputs of its lower-precision ops (None
    and non-tensors pass through; ``amp`` None returns them unchanged)."""
    if amp is None:
        return tensors
    return tuple(t.to(amp) if _castable(t, t.device.type) else t for t in tensors)


def autocast_off(device: torch.device):
    """A context in which autocast is off for ``device``'s type (the fused ops' bodies run in it)."""
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
