"""Which code runs a fused op, and where kernel outputs are allocated; shared by every fused op.

* CUDA tensors: the Triton kernels (``"triton"``).
* CPU tensors with ``TRITON_INTERPRET=1`` set before import: the same kernels under Triton's
  interpreter (``"triton-interpreter"``; it has no bfloat16, so float16 and float32 only).
* Anything else: the op's memory-frugal PyTorch path (``"torch-chunked"``).
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON, INTERPRETER, CHUNKED = "triton", "triton-interpreter", "torch-chunked"


def select(t: torch.Tensor) -> str:
    """The path for an op whose main input is ``t``."""
    if t.is_cuda:
        return TRITON
    if t.device.type == "cpu" and INTERPRETED and t.dtype in (torch.float16, torch.float32):
        return INTERPRETER
    return CHUNKED


def check_kernel_dtype(name: str, t: torch.Tensor, backend: str) -> None:
    if backend != CHUNKED and t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16 or float32 on {t.device.type}, got {t.dtype}")


def new_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)
