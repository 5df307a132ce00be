"""The InfoNCE kernels' planner: how the forward splits the candidates and how the backward
chunks its logit gradients, within a memory budget.

Scope: plain Python on sizes (no triton, no tensors), so every rule here is tested directly.
``backward_plan`` and ``candidate_splits`` are looked up at each call by the launchers, so a test
or a sweep may replace them with functions of the same signature.

The budget: the loss never stores the B x N logit matrix (N = B(1 + K) candidates); the eager loss
holds about 12 bytes per logit at its peak (bf16 and float32 logits, log-softmax, gradient). The
backward's scratch (a workspace of logit gradients E and, in one mode, a float32 accumulator of
dq) stays within ``SCRATCH_PER_LOGIT`` bytes per logit, or ``SCRATCH_FLOOR`` for problems too
small to be worth splitting; E itself within ``WORKSPACE_BYTES``.
"""

from __future__ import annotations

from typing import NamedTuple

from .._launch import cdiv

__all__ = [
    "CHUNK_COLUMNS",
    "MIN_CHUNK",
    "SCRATCH_FLOOR",
    "SCRATCH_PER_LOGIT",
    "WORKSPACE_BYTES",
    "BackwardPlan",
    "backward_plan",
    "candidate_splits",
    "forward_splits",
]

SCRATCH_PER_LOGIT = 1
"""Bytes of backward scratch per logit of the B x N matrix (a twelfth of the eager loss's peak)."""
SCRATCH_FLOOR = 1 << 20
"""The scratch any problem may use (1 MiB)."""
WORKSPACE_BYTES = 256 << 20
"""The largest workspace of logit gradients E (256 MiB)."""
CHUNK_COLUMNS = 4096
"""Candidate columns per chunk in the accumulating mode: the float32 accumulation of dq per chunk
(12 bytes per element of dq) stays small beside the chunk's GEMM (2 x 4096 FLOP per element)."""
MIN_CHUNK = 512
"""Fewer candidate columns (or partial-product rows) than this are not worth an accumulator."""


class BackwardPlan(NamedTuple):
    """How the "global" backward computes E = sigma dz rq rc / tau and its two products.

    * "one-pass": E whole ([B, N], ``columns`` = N); dC = E^T Q per source, dq = E C.
    * "accumulate": E in chunks of ``columns`` candidates; per chunk dC = E^T Q and dq += E C into
      a float32 [B, D] accumulator, each half-precision partial product ``partial_rows`` rows at a
      time (its temporary is partial_rows x D).
    * "sweeps": no accumulator: E in chunks of ``columns`` candidates for dC (the column sweep),
      then re-computed in chunks of ``rows`` queries for dq = E C (the row sweep): one more logit
      GEMM than the other modes, no [B, D] float32 buffer. When only one side needs a gradient
      (frozen candidates, or a frozen query encoder), the other sweep is skipped (0) and no
      logit GEMM is repeated.

    Example: ``backward_plan(4096, 4 * 4096, 4096, 2)`` -> mode "sweeps" (bf16, B4096 K3 D4096:
    the float32 accumulator alone, 4 B D bytes, is the whole budget).
    """

    mode: str
    columns: int
    rows: int
    partial_rows: int
    workspace_elements: int  # of E: the largest chunk
    scratch_bytes: int  # workspace, accumulator and partial product together


def backward_plan(
    batch: int, candidates: int, dim: int, elem: int, need_q: bool = True, need_c: bool = True
) -> BackwardPlan:
    """The cheapest mode whose scratch fits the budget: one pass, else the float32 accumulator with
    chunks as large as fit, else sweeps. ``elem``: bytes per element of the inputs (E's dtype);
    ``need_q`` / ``need_c``: whether dq / the candidates' gradients are wanted (at least one)."""
    budget = max(SCRATCH_FLOOR, SCRATCH_PER_LOGIT * batch * candidates)
    e_budget = min(budget, WORKSPACE_BYTES)
    whole = batch * candidates
    if whole * elem <= e_budget:
        return BackwardPlan("one-pass", candidates, batch, 0, whole, whole * elem)
    if not (need_q and need_c):  # one sweep along the side that is wanted
        return _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c)
    spare = budget - 4 * batch * dim  # after the accumulator
    most_columns = min(candidates, CHUNK_COLUMNS, WORKSPACE_BYTES // (batch * elem))
    least_partial = 0 if elem == 4 else min(batch, MIN_CHUNK)  # float32 E: addmm_ into acc, no temporary
    if (batch * min(most_columns, MIN_CHUNK) + least_partial * dim) * elem <= spare:
        # columns first (each chunk is a pass over the accumulator), the partial product the rest
        columns = min(most_columns, (spare - least_partial * dim * elem) // (batch * elem))
        partial = 0 if elem == 4 else min(batch, (spare - batch * columns * elem) // (dim * elem))
        return BackwardPlan(
            "accumulate",
            columns,
            0,
            partial,
            batch * columns,
            4 * batch * dim + (batch * columns + partial * dim) * elem,
        )
    return _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c)


def _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c):
    """ "sweeps": the largest chunks of E within ``e_budget`` bytes, by columns (dC) and rows (dq)."""
    columns = max(1, min(candidates, e_budget // (batch * elem))) if need_c else 0
    rows = max(1, min(batch, e_budget // (candidates * elem))) if need_q else 0
    workspace = max(batch * columns, rows * candidates)
    return BackwardPlan("sweeps", columns, rows, 0, workspace, workspace * elem)


def candidate_splits(
    row_blocks: int, candidates: int, block_n: int, sms: int, row_block_bytes: int, cache_bytes: int
) -> int:
    """Programs per query block in the "global" forward (splits of the candidates), the most of:

    * occupancy: enough programs for two waves of the device's SMs;
    * locality: each program re-reads its query block (``row_block_bytes``, BLOCK_M x D) for every
      candidate tile, and the split varies fastest over the programs, so about sms / splits query
      blocks are in use at once; they should take at most a quarter of the L2 cache
      (``cache_bytes``), or every candidate tile costs a query block's worth of HBM traffic;

    but at most the number that leaves each program four candidate tiles."""
    most = max(1, cdiv(candidates, 4 * block_n))
    occupancy = cdiv(2 * sms, row_blocks)
    locality = cdiv(sms, max(1, (cache_bytes // 4) // row_block_bytes))
    return max(1, min(most, max(occupancy, locality)))


def forward_splits(batch: int, candidates: int, dim: int, elem: int, cfg: dict):
    """(splits, candidates per split, a multiple of the forward's tile) for the "global" forward
    with tiles ``cfg`` (``tiles.kernel_tiles``: BLOCK_M, BLOCK_N_FWD, sms, cache_bytes)."""
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N_FWD"]
    splits = candidate_splits(
        cdiv(batch, block_m), candidates, block_n, cfg["sms"], block_m * dim * elem, cfg["cache_bytes"]
    )
    per_split = cdiv(cdiv(candidates, splits), block_n) * block_n
    return cdiv(candidates, per_split), per_split
