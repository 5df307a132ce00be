"""The tile choices of the attention kernels: which tiles each kernel launches with, and which
sequences take the one-sweep forward.

Scope: plain Python (no triton import), functions of the device type, head dim, dtype and length
only, so they can be read and tested anywhere. Every name here is documented configuration:
assign a function of the same signature (or edit ``SHORT_MAX_LENGTH``) to override a choice, as
``benchmarks/sweep_attention.py`` and the tests do; the launchers look these names up at each call.

Each function returns the keyword arguments of one kernel launch: ``BLOCK_M`` (queries per
tile), ``BLOCK_N`` (keys per tile), ``BLOCK_D`` (the head dim padded to a power of two, at least
16), and on CUDA ``num_warps`` and ``num_stages``. Under Triton's interpreter (CPU tensors) the
tiles are small: it runs one program at a time. The GPU values are the fastest of a sweep on an
H100 (bf16, L 512-8192), see ``benchmarks/RESULTS.md``.

float32 keeps small tiles on GPU: its "ieee" dots do not use tensor cores, and the half-precision
tiles spill registers there (ptxas for sm_90).

Example::

    from mgh_kernels.attention import tiles
    tiles.SHORT_MAX_LENGTH["half"] = 0            # causal half precision: always the two-pass forward
    default = tiles.flash_tiles
    tiles.flash_tiles = lambda device, head_dim, dtype: dict(default(device, head_dim, dtype), BLOCK_N=32)

The analogue of FlagAttention's overridable ``get_fwd_config``.
"""

from __future__ import annotations

import torch

from .._launch import next_power_of_2

__all__ = ["SHORT_MAX_LENGTH", "backward_tiles", "colsum_tiles", "flash_tiles", "one_sweep_tiles"]

SHORT_MAX_LENGTH = {"interpreter": 64, "half": 256, "half-bidirectional": 128, "float32": 0}
"""Longest sequence (L rounded up to a power of two) that takes the one-sweep forward, by case:
under the interpreter, half precision causal, half precision bidirectional, float32 on GPU (0:
never). Longer ones take the two-pass forward (flash pass, then the column-sum pass). The limit is
what one program keeps on chip: up to four chunks of probabilities beside the output accumulator;
the half-precision values are where the one sweep stopped beating the two passes on an H100."""


def _head_tile(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def flash_tiles(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the flash forward (``forward._fwd_kernel``); the column-sum pass and the backward
    start from these."""
    block_d = _head_tile(head_dim)
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=1)


def colsum_tiles(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the column-sum pass (``colsum._colsum_kernel``): BLOCK_N keys per program, BLOCK_M
    queries per step."""
    cfg = dict(flash_tiles(device, head_dim, dtype))
    if device.type == "cuda" and dtype != torch.float32 and cfg["BLOCK_D"] <= 128:
        block_n, stages = (64, 3) if cfg["BLOCK_D"] <= 64 else (128, 2)
        cfg.update(BLOCK_M=64, BLOCK_N=block_n, num_warps=4, num_stages=stages)
    return cfg


def one_sweep_tiles(
    device: torch.device, head_dim: int, dtype: torch.dtype, length: int, causal: bool = True
) -> dict | None:
    """Tiles of the one-sweep forward (``forward._fwd_short_kernel``), or None where the sequence is
    too long for it (``SHORT_MAX_LENGTH``) and the two-pass forward runs: up to ``CHUNKS`` = 4
    chunks of BLOCK_N keys. Head dims above 128 and float32 on GPU keep the two-pass forward (a
    whole row of probabilities on chip spills there)."""
    block_l = max(16, next_power_of_2(length))
    block_d = _head_tile(head_dim)
    if device.type != "cuda":
        block_n = max(16, block_l // 4)
        limit = SHORT_MAX_LENGTH["interpreter"]
        return (
            dict(BLOCK_M=16, BLOCK_N=block_n, CHUNKS=block_l // block_n, BLOCK_D=block_d) if block_l <= limit else None
        )
    limit = SHORT_MAX_LENGTH["float32" if dtype == torch.float32 else "half" if causal else "half-bidirectional"]
    block_n = min(block_l, 128)
    if block_l > limit or block_l > 4 * block_n or block_d > 128:
        return None
    return dict(BLOCK_M=64, BLOCK_N=block_n, CHUNKS=block_l // block_n, BLOCK_D=block_d, num_warps=4, num_stages=1)


def backward_tiles(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the three backward kernels (``backward``): half precision on GPU, the sweep's
    fastest up to head dim 128."""
    cfg = flash_tiles(device, head_dim, dtype)
    if device.type == "cuda" and dtype != torch.float32:
        if cfg["BLOCK_D"] <= 128:
            cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg.update(BLOCK_M=64, BLOCK_N=32)
    return cfg
