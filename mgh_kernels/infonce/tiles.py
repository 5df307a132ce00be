"""The tile choices of the InfoNCE kernels, and the device figures the planner reads.

Scope: plain Python (no triton import). ``kernel_tiles`` is documented configuration: the
launchers look it up at each call, so assigning a function of the same signature overrides it (as
``benchmarks/sweep_infonce.py`` and the tests do).

Example::

    from mgh_kernels.infonce import tiles
    default = tiles.kernel_tiles
    tiles.kernel_tiles = lambda device, dim, dtype: {**default(device, dim, dtype), "GROUP_M": 4}

The analogue of FlagAttention's overridable ``get_fwd_config``.
"""

from __future__ import annotations

import torch

from .._launch import next_power_of_2

__all__ = ["kernel_tiles"]

H100 = dict(sms=132, cache_bytes=50 << 20)
"""An H100's SM count and L2 size: the figures used where no GPU is visible (compile checks on meta
tensors)."""


def kernel_tiles(device: torch.device, dim: int, dtype: torch.dtype) -> dict:
    """Every InfoNCE kernel's tiles for embeddings of ``dim`` in ``dtype`` on ``device``:

    * ``BLOCK_M`` x ``BLOCK_N`` x ``BLOCK_D``: the logit-gradient kernel's tile (queries x
      candidates x chunk of D), ``BLOCK_N_FWD`` the forward's candidates per tile (same BLOCK_M and
      BLOCK_D), ``num_warps``, ``num_stages`` for both;
    * ``BLOCK_DO``: the chunk of D of the row-wise kernels (norms, projection, "own");
      ``BLOCK_ROWS``, ``OWN_ROWS``: their rows, which hold float32 [rows, BLOCK_DO] tiles;
    * ``GROUP_M``: query blocks per group of the logit-gradient kernel's tiles (a GEMM's swizzle);
    * ``sms``, ``cache_bytes``: the device's SM count and L2 size, for ``planner.forward_splits``.

    Small tiles under the interpreter. On a GPU, half precision takes 128 x 128 x 64 tiles with 8
    warps and 3 stages (Triton's H100 matmul tiles; chosen from static measures, not yet timed on a
    GPU), float32 64 x 64 x 32 with 2 stages ("ieee" dots without tensor cores)."""
    if device.type != "cuda":  # cache_bytes: nominal (the split rules are tested at an H100's figures)
        block_do = max(16, min(64, next_power_of_2(dim)))
        return dict(
            BLOCK_M=16,
            BLOCK_N=16,
            BLOCK_D=16,
            BLOCK_DO=block_do,
            BLOCK_N_FWD=16,
            BLOCK_ROWS=16,
            OWN_ROWS=16,
            GROUP_M=2,
            num_warps=4,
            num_stages=1,
            sms=2,
            cache_bytes=16 << 10,
        )
    block_do = max(16, min(256, next_power_of_2(dim)))
    figures = dict(H100)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        figures = dict(
            sms=props.multi_processor_count, cache_bytes=getattr(props, "L2_cache_size", H100["cache_bytes"])
        )
    if dtype == torch.float32:
        return dict(
            BLOCK_M=64,
            BLOCK_N=64,
            BLOCK_D=32,
            BLOCK_DO=block_do,
            BLOCK_N_FWD=64,
            BLOCK_ROWS=16,
            OWN_ROWS=32,
            GROUP_M=8,
            num_warps=8,
            num_stages=2,
            **figures,
        )
    # The forward's 128 x 128 (like the logit gradients'): each warpgroup's wgmma is then m64n128,
    # which leaves the SM's shared-memory bandwidth room for the next stage's copies, and the query
    # block is re-read once per 128 candidates; the spill it costs is outside the loop over D.
    return dict(
        BLOCK_M=128,
        BLOCK_N=128,
        BLOCK_D=64,
        BLOCK_DO=block_do,
        BLOCK_N_FWD=128,
        BLOCK_ROWS=32,
        OWN_ROWS=64,
        GROUP_M=8,
        num_warps=8,
        num_stages=3,
        **figures,
    )
