"""The precision a run computes in: the base weights' dtype, autocast, and the gradient scaler.

    precision = resolve(torch.device("cuda"))      # the defaults: bf16 weights under bf16 autocast
    with precision.autocast():
        embeddings = embedder(features)
    print(precision.describe())

Defaults, by device:

* CUDA with bfloat16 (Ampere and newer): the frozen base weights in bfloat16 and the model run
  under bfloat16 autocast; LoRA weights stay float32 (peft keeps adapters float32 beside half-
  precision bases), so the optimizer updates float32 weights. Frozen float32 weights would be
  re-cast to bfloat16 by autocast in every forward (it caches casts only of weights that take
  gradients), at twice the memory.
* CUDA without bfloat16: the same in float16, with a gradient scaler (``torch.amp.GradScaler``).
* CPU (and other devices): float32 weights, no autocast: the CPU's bfloat16 matmuls are slower
  than float32 ones on most CPUs and the CPU path is also the reference run.

``--bf16`` / ``--no-bf16``, ``--fp16`` and ``--dtype`` override the defaults on any device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run computes on ``device``.

    Attributes:
        device: where the model runs.
        weights: dtype of the frozen base weights (LoRA weights are float32 whatever this is).
        autocast: the autocast dtype, or None for no autocast.
        scaler: whether float16 autocast's gradient scaler runs (``torch.amp.GradScaler``).
    """

    device: torch.device
    weights: torch.dtype
    autocast: torch.dtype | None = None
    scaler: bool = False

    def autocast_context(self):
        """``torch.autocast`` in this precision (a no-op context without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler when this precision needs one, else None."""
        return torch.amp.GradScaler(self.device.type) if self.scaler else None

    @property
    def weights_name(self) -> str:
        return _name(self.weights)

    def describe(self) -> str:
        """One line saying what runs, e.g. "base weights bfloat16, LoRA float32, autocast bfloat16 on cuda"."""
        amp = f"autocast {_name(self.autocast)}" if self.autocast is not None else "no autocast"
        scaler = " with a gradient scaler" if self.scaler else ""
        return f"base weights {self.weights_name}, LoRA float32, {amp}{scaler} on {self.device.type}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (every CPU autocast does; CUDA from Ampere)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def resolve(
    device: torch.device, *, bf16: bool | None = None, fp16: bool = False, dtype: str | None = None
) -> Precision:
    """The precision for ``device`` from the user's choices (None: the device's default).

    Args:
        bf16: bfloat16 autocast on (True) or off (False); None: on for CUDA with bfloat16, off
            elsewhere.
        fp16: float16 autocast with a gradient scaler (the default on CUDA without bfloat16).
        dtype: the base weights' dtype ("float32", "bfloat16", "float16"); None: the autocast
            dtype on CUDA, float32 elsewhere.

    Raises:
        ValueError: naming the option, for contradictory or unsupported choices.
    """
    device = torch.device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(fp16, bool) or (bf16 is not None and not isinstance(bf16, bool)):
        raise ValueError(f"bf16, fp16: expected True or False, got bf16={bf16!r}, fp16={fp16!r}")
    if fp16 and bf16:
        raise ValueError("fp16: expected at most one of --bf16 and --fp16, got both")
    if bf16 and not bf16_supported(device):
        raise ValueError(f"bf16: this {device.type} device has no bfloat16 support; use --fp16 instead")
    amp = _autocast_dtype(device, bf16, fp16)
    if amp is not None and device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16: autocast runs on cuda and cpu only, got device {device.type}")
    if dtype is not None:
        weights = DTYPES[dtype]
    else:
        weights = amp if (amp is not None and device.type == "cuda") else torch.float32
    # float16's narrow range needs the scaler on gradients; CPU autocast has one too
    return Precision(device=device, weights=weights, autocast=amp, scaler=amp == torch.float16)


def _autocast_dtype(device: torch.device, bf16: bool | None, fp16: bool) -> torch.dtype | None:
    """float16 when asked; on CUDA by default bfloat16 where it has it, else float16; None: no autocast."""
    if fp16:
        return torch.float16
    if bf16 is None and device.type == "cuda":
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    return torch.bfloat16 if bf16 else None


__all__ = ["DTYPES", "Precision", "bf16_supported", "resolve"]
