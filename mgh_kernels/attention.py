"""Flash attention that also emits per-key column sums (the weights of ATA pooling).

``ata_attention(q, k, v, ...)`` returns the attention output and, for each key, the attention it
receives: the sum over valid queries of the softmax probabilities, averaged over query heads, with
the exact semantics of ``reference.attention_with_colsum`` and without ever storing an L x L matrix.

Algorithm (Triton; every kernel streams tiles and keeps O(L) statistics):

* forward: a flash-attention pass per query block gives the output and the row log-sum-exp.
  Where PyTorch's cuDNN attention takes the inputs (CUDA, half precision, no padding mask; GQA
  where PyTorch's cuDNN gate accepts it) that pass is cuDNN's, which returns the log-sum-exp too
  (``FLASH_PASS``; our Triton pass took 1.2-1.5x cuDNN's time on an H100). Then a column-sum pass
  per key block (one program per kv head, looping over the query heads that share it and over
  query blocks) re-computes the probabilities from the log-sum-exp and sums them down the
  columns (bound by its exponentials as much as by QK^T: the tile setting ``FMA_EXP`` moves a
  share of them onto the FMA units, off by default until a GPU sweep times it). Each program owns
  its outputs: results are deterministic, no atomics.
  Short sequences (``SHORT_MAX_LENGTH``) instead take one sweep per query block that keeps its
  probabilities on chip until the softmax normaliser is known, then sums their columns into a
  per-block partial ([B * Hq, L / BLOCK_M, L] float32, reduced in a fixed order): one QK^T and one
  exponential per score instead of two.
* backward, exact through both outputs. With ``dc`` the gradient of the column sums and
  ``g_j = dc_j / Hq``, the gradient of the probabilities is ``dP_ij = dO_i . V_j + g_j``, so the
  softmax backward ``dS_ij = P_ij (dP_ij - delta_i)`` needs ``delta_i = dO_i . O_i + sum_j P_ij g_j``.
  A pre-pass computes delta (the second term re-streams the keys, only when ``dc`` is given), then
  one kernel per key block accumulates dK and dV over its query heads, and one per query block
  accumulates dQ (deterministic, no atomics).

Dispatch (see ``mgh_kernels._backend``), visible through ``last_backend()`` (the forward taken:
``last_forward()``) and a debug log line: Triton on CUDA, Triton's interpreter on CPU under
``TRITON_INTERPRET=1`` (the tests' path), otherwise a memory-frugal PyTorch path that processes a
block of queries of one sequence at a time (never L x L for the whole batch), re-computing the
block in backward. While ``torch.compile`` traces a call, the kernels run behind the custom ops
``mgh::ata_attention_forward`` and ``mgh::ata_attention_backward`` (opaque to dynamo).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.utils.checkpoint
import triton
import triton.language as tl

from . import _backend
from ._validation import check_attention_args, checks_values

__all__ = ["ata_attention", "last_backend", "last_forward"]

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

_last_backend: Optional[str] = None
_last_forward: Optional[str] = None


def last_backend() -> Optional[str]:
    """Which path the latest ``ata_attention`` call took: "triton", "triton-interpreter" or
    "torch-chunked" (None before the first call)."""
    return _last_backend


def last_forward() -> Optional[str]:
    """Which forward the latest kernel call took: "one-sweep" (``_fwd_short_kernel``),
    "triton-flash" (``_fwd_kernel``) or "cudnn-flash" (PyTorch's cuDNN attention), the two flash
    passes followed by the column-sum pass when the column sums are asked for; None before the
    first call and after a call on the "torch-chunked" path."""
    return _last_forward


# --------------------------------------------------------------------------------------------
# Triton kernels. Tiles: queries [BLOCK_M, BLOCK_D], keys/values [BLOCK_N, BLOCK_D]. Scores are
# kept in log2 units (qk_scale = scale * log2(e)), and so is the saved log-sum-exp. Padded
# queries get lse = +inf, which makes every re-computed probability of theirs exactly 0. MASK, the
# key padding mask, is an additive float32 bias [B, L]: 0 for a real token, -inf for padding (the
# forward adds a key tile's bias to its scores as loaded; a uint8 mask took a load, a compare and
# a select per key, and pushed the forward to 255 registers and a spill: RESULTS.md).
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_valid(mask_ptr, stride_mn, offs, in_range, HAS_MASK: tl.constexpr):
    """[len(offs)] bool: within range and, with a mask, a real token (bias 0)."""
    if HAS_MASK:
        return (tl.load(mask_ptr + offs * stride_mn, mask=in_range, other=float("-inf")) == 0) & in_range
    return in_range


@triton.jit
def _causal(p, offs_m, offs_n, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] probabilities p with the keys after each query zeroed when CAUSAL."""
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    return p


@triton.jit
def _within(offs, n, BOUNDED: tl.constexpr):
    """offs < n, or a constant True where the caller knows the whole tile is within n (the
    compiler then drops the load's predicates: no bound checks in the hot loop)."""
    if BOUNDED:
        return offs < n
    return tl.full(offs.shape, True, tl.int1)


@triton.jit
def _key_bias(mask_ptr, stride_mn, offs_n, L, HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr):
    """[BLOCK_N] float32: 0 for a key within L (and valid under the mask), -inf otherwise: the
    mask's bias as loaded. Added to the scaled scores, it masks the keys with one FFMA per score
    (scale and bias) where a per-score compare and select took three to four instructions (the
    forward issues about as many instructions per tile as its tensor cores take cycles; SASS
    counts in benchmarks/RESULTS.md)."""
    if HAS_MASK:
        return tl.load(mask_ptr + offs_n * stride_mn, mask=_within(offs_n, L, BOUNDED), other=float("-inf"))
    return tl.where(_within(offs_n, L, BOUNDED), 0.0, float("-inf"))


@triton.jit
def _query_block(
    Q, MASK, sqb, sqh, sqm, sqd, smb, smn, H, GROUP, L, D,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The forward programs' query block: (b, h, hk, offs_m, q [BLOCK_M, BLOCK_D], q_valid)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < L
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_in[:, None] & (offs_d < D)[None, :], other=0.0,
    )
    q_valid = _load_valid(MASK + b * smb, smn, offs_m, row_in, HAS_MASK)
    return b, h, h // GROUP, offs_m, q, q_valid


@triton.jit
def _online_softmax_step(
    q, offs_m, K, V, MASK, skn, skd, svn, svd, smn, start, L, D, qk_scale, m_i, l_i, acc,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BOUNDED: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One flash-attention step over keys [start, start + BLOCK_N) of one sequence and kv head
    (K, V, MASK already offset to it). CAUSAL: apply the causal mask to this tile (only tiles that
    straddle the diagonal need it; the callers pass False for those wholly below it). BOUNDED:
    the tile may reach past L (False: the caller knows it does not). EVEN_D: BLOCK_D == D.

    Returns the step's probabilities relative to the running max ``m`` after it, in the dtype the
    P @ V product uses, then ``m``, the running sum ``l`` and the running output ``acc``.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = _within(offs_n, L, BOUNDED)
    d_in = _within(offs_d, D, not EVEN_D)
    kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=col_in[None, :] & d_in[:, None], other=0.0)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if HAS_MASK or BOUNDED:
        s += _key_bias(MASK, smn, offs_n, L, HAS_MASK, BOUNDED)[None, :]
    if CAUSAL:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=col_in[:, None] & d_in[None, :], other=0.0)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return p, m_new, l_i, acc


@triton.jit
def _store_out_lse(
    OUT, LSE, b, h, offs_m, q_valid, m_i, l_i, acc, sob, soh, som, sod, H, L, D, BLOCK_D: tl.constexpr,
):
    """Normalise and store the output (zero for padded rows and rows that saw no key) and the
    log-sum-exp (+inf for those rows); returns 1 / l per row (0 for those rows)."""
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < L
    row_ok = q_valid & (l_i > 0)
    inv_l = tl.where(row_ok, 1.0 / tl.where(row_ok, l_i, 1.0), 0.0)
    tl.store(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        (acc * inv_l[:, None]).to(OUT.dtype.element_ty), mask=row_in[:, None] & (offs_d < D)[None, :],
    )
    lse = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * H + h) * L + offs_m, lse, mask=row_in)
    return inv_l


@triton.jit
def _fwd_kernel(
    Q, K, V, MASK, OUT, LSE,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
    H, GROUP, L, D, qk_scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Flash attention of one query block of one head: out and the log-sum-exp."""
    b, h, hk, offs_m, q, q_valid = _query_block(
        Q, MASK, sqb, sqh, sqm, sqd, smb, smn, H, GROUP, L, D, HAS_MASK, BLOCK_M, BLOCK_D,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptr, v_ptr, mask_ptr = K + b * skb + hk * skh, V + b * svb + hk * svh, MASK + b * smb
    # Key tiles before ``inner`` lie within L and, causal, before the block's first query: no bound
    # checks, no causal mask. The rest (the diagonal, or the last partial tile) are checked.
    inner = (L // BLOCK_N) * BLOCK_N
    hi = L
    if CAUSAL:
        inner = (tl.program_id(0) * BLOCK_M // BLOCK_N) * BLOCK_N
        hi = tl.minimum(L, (tl.program_id(0) + 1) * BLOCK_M)
    for start_n in range(0, inner, BLOCK_N):
        _, m_i, l_i, acc = _online_softmax_step(
            q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, start_n, L, D, qk_scale, m_i, l_i, acc,
            HAS_MASK, False, False, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )
    for start_n in range(inner, hi, BLOCK_N):
        _, m_i, l_i, acc = _online_softmax_step(
            q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, start_n, L, D, qk_scale, m_i, l_i, acc,
            HAS_MASK, CAUSAL, True, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )
    _store_out_lse(OUT, LSE, b, h, offs_m, q_valid, m_i, l_i, acc, sob, soh, som, sod, H, L, D, BLOCK_D)


@triton.jit
def _chunk_unless_masked(
    q, offs_m, K, V, MASK, skn, skd, svn, svd, smn, L, D, qk_scale, hi, start, m_i, l_i, acc,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``_online_softmax_step`` over the chunk at ``start`` unless it starts at or past ``hi`` (under
    causal masking, past the block's last query): then its probabilities are zero and its max -inf,
    so it adds no column sum. Returns (p, the chunk's max, m_i, l_i, acc)."""
    p = tl.zeros([q.shape[0], BLOCK_N], V.dtype.element_ty)
    m_chunk = tl.full([q.shape[0]], float("-inf"), tl.float32)
    if start < hi:
        p, m_chunk, l_i, acc = _online_softmax_step(
            q, offs_m, K, V, MASK, skn, skd, svn, svd, smn, start, L, D, qk_scale, m_i, l_i, acc,
            HAS_MASK, CAUSAL, True, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )
        m_i = m_chunk
    return p, m_chunk, m_i, l_i, acc


@triton.jit
def _short_colsum(PART, p, m_chunk, m_final, inv_l, inv_heads, start, L, BLOCK_N: tl.constexpr):
    """Column sums over a query block of one chunk's probabilities, rescaled to the final max and
    normalised, over the number of query heads: sum_i p_ij 2^(m_chunk_i - m_i) / l_i / Hq (zero
    for rows the chunk gave no key)."""
    m_final = tl.where(m_final == float("-inf"), 0.0, m_final)  # then inv_l is 0 too
    w = tl.exp2(m_chunk - m_final) * (inv_l * inv_heads)
    offs_n = start + tl.arange(0, BLOCK_N)
    tl.store(PART + offs_n, tl.sum(p.to(tl.float32) * w[:, None], 0), mask=offs_n < L)


@triton.jit
def _fwd_short_kernel(
    Q, K, V, MASK, OUT, LSE, PART,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
    H, GROUP, L, D, qk_scale, inv_heads,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Short sequences (L <= CHUNKS * BLOCK_N): out, lse and column sums in one sweep.

    A flash-attention pass over at most four key chunks that keeps each chunk's probabilities on
    chip (in the P @ V dtype, as the output uses them) with the running max they were taken at.
    Once the row's softmax normaliser is known they are rescaled and summed down the columns into
    PART[b * H + h, pid_m, :] (reduced over query blocks and heads afterwards, in a fixed order).
    One exponential per score, where the two-pass forward re-computes QK^T and every exponential.
    The chunks are unrolled by hand: a Triton loop cannot keep a list of tiles.
    """
    b, h, hk, offs_m, q, q_valid = _query_block(
        Q, MASK, sqb, sqh, sqm, sqd, smb, smn, H, GROUP, L, D, HAS_MASK, BLOCK_M, BLOCK_D,
    )
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    mask_ptr = MASK + b * smb
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (tl.program_id(0) + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p0, m0, l_i, acc = _online_softmax_step(  # every block sees the first chunk
        q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, 0, L, D, qk_scale, m_i, l_i, acc,
        HAS_MASK, CAUSAL, True, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
    )
    m_i = m0
    if CHUNKS > 1:
        p1, m1, m_i, l_i, acc = _chunk_unless_masked(
            q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, L, D, qk_scale, hi, BLOCK_N,
            m_i, l_i, acc, HAS_MASK, CAUSAL, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )
    if CHUNKS > 2:
        p2, m2, m_i, l_i, acc = _chunk_unless_masked(
            q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, L, D, qk_scale, hi, 2 * BLOCK_N,
            m_i, l_i, acc, HAS_MASK, CAUSAL, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )
    if CHUNKS > 3:
        p3, m3, m_i, l_i, acc = _chunk_unless_masked(
            q, offs_m, k_ptr, v_ptr, mask_ptr, skn, skd, svn, svd, smn, L, D, qk_scale, hi, 3 * BLOCK_N,
            m_i, l_i, acc, HAS_MASK, CAUSAL, EVEN_D, PRECISION, BLOCK_N, BLOCK_D,
        )

    inv_l = _store_out_lse(OUT, LSE, b, h, offs_m, q_valid, m_i, l_i, acc, sob, soh, som, sod, H, L, D, BLOCK_D)
    part = PART + ((b * H + h) * tl.num_programs(0) + tl.program_id(0)) * L
    _short_colsum(part, p0, m0, m_i, inv_l, inv_heads, 0, L, BLOCK_N)
    if CHUNKS > 1:
        _short_colsum(part, p1, m1, m_i, inv_l, inv_heads, BLOCK_N, L, BLOCK_N)
    if CHUNKS > 2:
        _short_colsum(part, p2, m2, m_i, inv_l, inv_heads, 2 * BLOCK_N, L, BLOCK_N)
    if CHUNKS > 3:
        _short_colsum(part, p3, m3, m_i, inv_l, inv_heads, 3 * BLOCK_N, L, BLOCK_N)


@triton.jit
def _colsum_kernel(
    Q, K, MASK, LSE, PART,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smn, slb, slh, slm,
    H, HKV, GROUP, L, D, qk_scale, lse_scale, inv_heads,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    FMA_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Column sums of one key block of one kv head over every query of the heads that share it,
    re-computing the probabilities from the log-sum-exp (LSE [B, Hq, L] with strides slb, slh, slm;
    times ``lse_scale`` gives log2 units: 1 for ours, log2(e) for cuDNN's natural log), over the
    number of query heads (``inv_heads`` = 1 / Hq). Whole tiles add into a [BLOCK_M, BLOCK_N]
    accumulator, reduced across rows once at the end: with the same tiles, a cross-thread reduction
    per query block instead took 1.1-1.6x the time at head dim 128 on an H100
    (benchmarks/sweep_attention.py; within 15% either way at head dim 64)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = offs_n < L
    d_in = offs_d < D
    kt = tl.load(
        K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=col_in[None, :] & d_in[:, None], other=0.0,
    )
    col = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # Query blocks from ``lo`` may see a key of the block, from ``above`` on they see all of them
    # (causal); those before ``inner`` lie within L: no causal mask or bound checks from ``above``
    # to ``inner``.
    lo = 0
    above = 0
    inner = (L // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        above = tl.minimum(tl.cdiv(pid_n * BLOCK_N + BLOCK_N - 1, BLOCK_M) * BLOCK_M, L)
    inner = tl.maximum(inner, above)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_ptr, lse_ptr = Q + b * sqb + h * sqh, LSE + b * slb + h * slh
        if CAUSAL:  # the query blocks on the diagonal
            for start_m in range(lo, above, BLOCK_M):
                col += _colsum_tile(q_ptr, lse_ptr, slm, lse_scale, kt, offs_n, start_m, sqm, sqd, L, D, qk_scale,
                                    True, True, EVEN_D, PRECISION, FMA_EXP, BLOCK_M, BLOCK_N, BLOCK_D)
        for start_m in range(above, inner, BLOCK_M):
            col += _colsum_tile(q_ptr, lse_ptr, slm, lse_scale, kt, offs_n, start_m, sqm, sqd, L, D, qk_scale,
                                False, False, EVEN_D, PRECISION, FMA_EXP, BLOCK_M, BLOCK_N, BLOCK_D)
        for start_m in range(inner, L, BLOCK_M):  # the last, partial query block
            col += _colsum_tile(q_ptr, lse_ptr, slm, lse_scale, kt, offs_n, start_m, sqm, sqd, L, D, qk_scale,
                                False, True, EVEN_D, PRECISION, FMA_EXP, BLOCK_M, BLOCK_N, BLOCK_D)
    # Padded keys: dropped here, once per column, not per score (their scores may exceed the row's
    # log-sum-exp, which covers valid keys only, and sum to inf in their own columns; where, not a
    # product, gives them 0).
    key_valid = _load_valid(MASK + b * smb, smn, offs_n, col_in, HAS_MASK)
    tl.store(PART + pid_bk * L + offs_n, tl.where(key_valid, tl.sum(col, 0) * inv_heads, 0.0), mask=col_in)


@triton.jit
def _colsum_tile(
    q_ptr, lse_ptr, slm, lse_scale, kt, offs_n, start_m, sqm, sqd, L, D, qk_scale, CAUSAL: tl.constexpr,
    BOUNDED: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, FMA_EXP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] probabilities of queries start_m .. start_m + BLOCK_M of one head for the
    key block ``kt`` [BLOCK_D, BLOCK_N], from their log-sum-exp: one FFMA and one exponential per
    score (``FMA_EXP``: see ``_exp2_shared``). Padded and out-of-range queries have lse = +inf, so
    their probabilities are exactly 0 (by the polynomial too);
    CAUSAL masks the keys after each query (tiles on the diagonal only); BOUNDED: the block may
    reach past L; EVEN_D: BLOCK_D == D."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = _within(offs_m, L, BOUNDED)
    q = tl.load(q_ptr + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_in[:, None] & _within(offs_d, D, not EVEN_D)[None, :], other=0.0)
    lse = tl.load(lse_ptr + offs_m * slm, mask=row_in, other=float("inf")) * lse_scale
    p = _exp2_shared(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None], FMA_EXP, BLOCK_M, BLOCK_N)
    return _causal(p, offs_m, offs_n, CAUSAL)


# 2**f on [-0.5, 0.5] with p(0) = 1: a degree-3 fit of least maximum relative error (1.0e-4,
# under float16's half ulp of 4.9e-4 and bfloat16's 3.9e-3).
EXP2_POLY = (0.6932829022407532, 0.2422109693288803, 0.05500893294811249)
_EXP2_C1, _EXP2_C2, _EXP2_C3 = (tl.constexpr(c) for c in EXP2_POLY)


@triton.jit
def _exp2_fma(x):
    """2**x for float32 x <= 127 on the FMA and integer units instead of the exponential unit
    (MUFU), relative error 1.0e-4 (``EXP2_POLY``) down to -126; x <= -127 (-inf included) gives
    exactly 0, as the MUFU does for -inf, and (-127, -126) a value under 2**-126; NaN stays NaN.
    Above 127 the result is garbage (inf, NaN or negative): callers must select such elements away
    with ``where`` (the column-sum pass does, for the padded, masked and out-of-range keys that
    can reach it), never multiply them.
    x = n + f with n the nearest integer: adding 1.5 * 2**23 rounds x to n in the sum's low
    mantissa bits (an FADD: a float-to-integer conversion would take the MUFU's rate again), the
    polynomial gives 2**f in [0.7, 1.42], and n shifted into the exponent field scales it. From
    -127, f = 0 and the polynomial's 1.0 lands on exponent field 0."""
    x = tl.maximum(x, -127.0, propagate_nan=tl.PropagateNan.ALL)
    shifted = x + 12582912.0
    f = x - (shifted - 12582912.0)
    p = ((_EXP2_C3 * f + _EXP2_C2) * f + _EXP2_C1) * f + 1.0
    # The sum's bits are 0x4B400000 + n; shifted left by 23 the constant's bits leave the word.
    bits = p.to(tl.uint32, bitcast=True) + (shifted.to(tl.uint32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _column_pairs(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] -> its even and its odd columns, [BLOCK_M, BLOCK_N / 2] each."""
    return tl.split(tl.reshape(x, [BLOCK_M, BLOCK_N // 2, 2]))


@triton.jit
def _from_column_pairs(even, odd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.reshape(tl.join(even, odd), [BLOCK_M, BLOCK_N])


@triton.jit
def _row_halves(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] -> rows 0-7 and rows 8-15 of every 16, [BLOCK_M / 2, BLOCK_N] each."""
    rows = tl.permute(tl.reshape(x, [BLOCK_M // 16, 2, 8, BLOCK_N]), [0, 2, 3, 1])
    first, second = tl.split(rows)
    return tl.reshape(first, [BLOCK_M // 2, BLOCK_N]), tl.reshape(second, [BLOCK_M // 2, BLOCK_N])


@triton.jit
def _from_row_halves(first, second, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    first = tl.reshape(first, [BLOCK_M // 16, 8, BLOCK_N])
    second = tl.reshape(second, [BLOCK_M // 16, 8, BLOCK_N])
    return tl.reshape(tl.permute(tl.join(first, second), [0, 3, 1, 2]), [BLOCK_M, BLOCK_N])


@triton.jit
def _exp2_shared(x, FMA_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """2**x [BLOCK_M, BLOCK_N] with 1 / FMA_EXP of it by ``_exp2_fma`` (FMA_EXP 2: the odd
    columns; 4: the odd columns of rows 8-15 of every 16; 0: none), the rest by the exponential
    unit. The column-sum pass issues one MUFU exponential per score, and at 16 per clock per SM
    they take as long as the tile's QK^T at head dim 128 (twice as long at 64), while its issue
    slots are little more than half used (291 instructions per tile per warp against 512 MUFU
    clocks, bf16 D128). The polynomial's ~8 instructions cost about what the exponential did on
    the MUFU (8 clocks per warp instruction), but in those idle issue slots (the idea of
    FlashAttention-4): a quarter balances the two at about 400 clocks. The split is one a
    thread's registers already hold in the tensor cores' accumulator layouts (a thread owns
    column pairs 2c, 2c + 1 and rows r, r + 8): no data moves. Whether it pays is for a GPU to
    say (``sweep_attention.py``)."""
    tl.static_assert(FMA_EXP == 0 or FMA_EXP == 2 or FMA_EXP == 4, "FMA_EXP: expected 0, 2 or 4")
    tl.static_assert(FMA_EXP == 0 or (BLOCK_M % 16 == 0 and BLOCK_N % 2 == 0),
                     "FMA_EXP: needs BLOCK_M a multiple of 16 and BLOCK_N even")
    if FMA_EXP == 0:
        p = tl.exp2(x)
    else:
        even, odd = _column_pairs(x, BLOCK_M, BLOCK_N)
        if FMA_EXP == 2:
            odd = _exp2_fma(odd)
        else:
            upper, lower = _row_halves(odd, BLOCK_M, BLOCK_N // 2)
            odd = _from_row_halves(tl.exp2(upper), _exp2_fma(lower), BLOCK_M, BLOCK_N // 2)
        p = _from_column_pairs(tl.exp2(even), odd, BLOCK_M, BLOCK_N)
    return p


@triton.jit
def _bwd_delta_kernel(
    Q, K, OUT, DOUT, MASK, LSE, DC, DELTA,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, sob, soh, som, sod, sdb, sdh, sdm, sdd, smb, smn,
    H, GROUP, L, D, qk_scale, inv_heads,
    HAS_MASK: tl.constexpr, HAS_DC: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = dO_i . O_i (+ sum_j P_ij dc_j / Hq when the column sums have a gradient)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < L
    d_in = offs_d < D
    tile = row_in[:, None] & d_in[None, :]
    o = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=tile, other=0.0)
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=tile, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DC:
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=tile, other=0.0)
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_in, other=float("inf"))
        pg = tl.zeros([BLOCK_M], tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_in = offs_n < L
            kt = tl.load(
                K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=col_in[None, :] & d_in[:, None], other=0.0,
            )
            bias = _key_bias(MASK + b * smb, smn, offs_n, L, HAS_MASK, True)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale + bias[None, :]
            p = _causal(tl.exp2(s - lse[:, None]), offs_m, offs_n, CAUSAL)
            g = tl.load(DC + b * L + offs_n, mask=col_in, other=0.0) * inv_heads
            pg += tl.sum(p * g[None, :], 1)
        delta += pg
    q_valid = _load_valid(MASK + b * smb, smn, offs_m, row_in, HAS_MASK)
    tl.store(DELTA + pid_bh * L + offs_m, tl.where(q_valid, delta, 0.0), mask=row_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOUT, MASK, LSE, DELTA, DC, DK, DV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, smb, smn,
    H, HKV, GROUP, L, D, qk_scale, scale, inv_heads,
    HAS_MASK: tl.constexpr, HAS_DC: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads that share it."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = offs_n < L
    d_in = offs_d < D
    kv_tile = col_in[:, None] & d_in[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_tile, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_tile, other=0.0)
    bias = _key_bias(MASK + b * smb, smn, offs_n, L, HAS_MASK, True)
    g = tl.zeros([BLOCK_N], tl.float32)
    if HAS_DC:
        g = tl.load(DC + b * L + offs_n, mask=col_in, other=0.0) * inv_heads
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for gi in range(0, GROUP):
        h = hk * GROUP + gi
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < L
            q_tile = row_in[:, None] & d_in[None, :]
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_tile, other=0.0)
            do = tl.load(
                DOUT + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=q_tile, other=0.0
            )
            lse = tl.load(LSE + (b * H + h) * L + offs_m, mask=row_in, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * L + offs_m, mask=row_in, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]  # [BLOCK_N, BLOCK_M]
            pt = tl.exp2(st - lse[None, :])
            if CAUSAL:
                pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if HAS_DC:
                dpt += g[:, None]
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    tl.store(
        DK + pid_bk * L * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_tile
    )
    tl.store(DV + pid_bk * L * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_tile)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOUT, MASK, LSE, DELTA, DC, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, smb, smn,
    H, GROUP, L, D, qk_scale, scale, inv_heads,
    HAS_MASK: tl.constexpr, HAS_DC: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one head, summed over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < L
    d_in = offs_d < D
    q_tile = row_in[:, None] & d_in[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_tile, other=0.0)
    do = tl.load(DOUT + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=q_tile, other=0.0)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in = offs_n < L
        kv_t = col_in[None, :] & d_in[:, None]
        kt = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=kv_t, other=0.0)
        vt = tl.load(V + b * svb + hk * svh + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=kv_t, other=0.0)
        bias = _key_bias(MASK + b * smb, smn, offs_n, L, HAS_MASK, True)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale + bias[None, :]
        p = _causal(tl.exp2(s - lse[:, None]), offs_m, offs_n, CAUSAL)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if HAS_DC:
            dp += (tl.load(DC + b * L + offs_n, mask=col_in, other=0.0) * inv_heads)[None, :]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(
        DQ + pid_bh * L * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_tile
    )


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------


def _config(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the flash forward (``_fwd_kernel``): small under the interpreter (it runs one
    program at a time); on GPU the fastest of a sweep on an H100 (bf16, L 512-8192,
    ``benchmarks/sweep_attention.py``, RESULTS.md).

    float32 gets small tiles on GPU: its "ieee" dots do not use tensor cores, and the half-precision
    tiles spilled up to 17 KB of stack per thread (measured with ptxas for sm_90, no GPU needed).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=1)


def _colsum_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the column-sum pass (``_colsum_kernel``): BLOCK_N keys per program, BLOCK_M queries
    per step. Half precision on GPU: the sweep's fastest (with the 2-D accumulator, 1.2-2x faster
    than the forward's tiles; 128 keys per program at head dim 128). FMA_EXP: the share of the
    exponentials computed by a polynomial (``_exp2_shared``); 0, all on the exponential unit, until
    a GPU sweep shows otherwise (half precision only: the polynomial's 1e-4 is no float32 result)."""
    cfg = dict(_config(device, head_dim, dtype), FMA_EXP=0)
    if device.type == "cuda" and dtype != torch.float32 and cfg["BLOCK_D"] <= 128:
        block_n, stages = (64, 3) if cfg["BLOCK_D"] <= 64 else (128, 2)
        cfg.update(BLOCK_M=64, BLOCK_N=block_n, num_warps=4, num_stages=stages)
    return cfg


# Longest sequence (L rounded up to a power of two) that takes the one-sweep forward; longer ones
# take the two-pass forward (``_fwd_kernel`` then ``_colsum_kernel``). The limit is what a program
# can keep on chip: up to four chunks of probabilities beside the output accumulator. Measured on an
# H100 (bf16, RESULTS.md): at L=512 (4 chunks, which spill 0.26-1.6 KB per thread) the one sweep
# took 2-2.4x the two-pass time. At L=256 it was faster causal (it skips the masked chunks) and
# slower bidirectional (bench_attention, B64 H32 L256 D128 in one run: 2.92x cuDNN's forward
# against 2.46x for the two passes), so bidirectional sequences stop at 128 (not measured below 256).
SHORT_MAX_LENGTH = {"interpreter": 64, "half": 256, "half-bidirectional": 128, "float32": 0}


def _short_config(device: torch.device, head_dim: int, dtype: torch.dtype, length: int,
                  causal: bool = True) -> Optional[dict]:
    """Tiles of the one-sweep forward (``_fwd_short_kernel``), or None when L is too long for it.

    Up to four key chunks of BLOCK_N keys. float32 on GPU keeps the two-pass forward: its "ieee"
    dots use no tensor cores and need 32 x 32 tiles there to stay near spill-free, while a whole
    row held on chip spilled 14-26 KB per thread at 128 keys (ptxas, sm_90).
    """
    block_l = max(16, triton.next_power_of_2(length))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        block_n = max(16, block_l // 4)
        limit = SHORT_MAX_LENGTH["interpreter"]
        return dict(BLOCK_M=16, BLOCK_N=block_n, CHUNKS=block_l // block_n, BLOCK_D=block_d) if block_l <= limit else None
    limit = SHORT_MAX_LENGTH["float32" if dtype == torch.float32 else "half" if causal else "half-bidirectional"]
    block_n = min(block_l, 128)
    if block_l > limit or block_l > 4 * block_n or block_d > 128:
        return None
    return dict(BLOCK_M=64, BLOCK_N=block_n, CHUNKS=block_l // block_n, BLOCK_D=block_d, num_warps=4, num_stages=1)


def _bwd_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the three backward kernels; half precision on GPU: the sweep's fastest up to head
    dim 128 (1.3-1.8x faster than the earlier 8 warps and 2 stages)."""
    cfg = _config(device, head_dim, dtype)
    if device.type == "cuda" and dtype != torch.float32:
        if cfg["BLOCK_D"] <= 128:
            cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        else:
            cfg.update(BLOCK_M=64, BLOCK_N=32)
    return cfg


def _precision(dtype: torch.dtype) -> Optional[str]:
    # float32 inputs get true float32 products (not TF32); half inputs use Triton's default.
    return "ieee" if dtype == torch.float32 else None


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _mask_args(q, mask):
    """The mask pointer and its strides (any tensor and zero strides without a mask)."""
    return (mask, mask.stride(0), mask.stride(1)) if mask is not None else (q, 0, 0)


def _flags(q, mask, causal) -> dict:
    """The constexpr flags every kernel takes."""
    return dict(HAS_MASK=mask is not None, CAUSAL=causal, PRECISION=_precision(q.dtype))


def _launch_fwd(q, k, v, mask, causal, scale, cfg):
    """``_fwd_kernel`` with tiles ``cfg``: (out [B, Hq, L, D], lse [B, Hq, L] float32, log2 units)."""
    batch, hq, length, dim = q.shape
    mask_arg, smb, smn = _mask_args(q, mask)
    out = _backend.new_output((batch, hq, length, dim), q.dtype, q.device)
    lse = _backend.new_output((batch, hq, length), torch.float32, q.device)
    _fwd_kernel[(triton.cdiv(length, cfg["BLOCK_M"]), batch * hq)](
        q, k, v, mask_arg, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), smb, smn,
        hq, hq // k.shape[1], length, dim, scale * LOG2E,
        EVEN_D=dim == cfg["BLOCK_D"], **_flags(q, mask, causal), **cfg,
    )
    return out, lse


def _launch_colsum(q, k, mask, lse, causal, scale, cfg, lse_scale=1.0):
    """``_colsum_kernel`` with tiles ``cfg``: the column sums [B, L] float32 from the saved lse
    ([B, Hq, L] or [B, Hq, L, 1], any strides; times ``lse_scale`` in log2 units): one partial per
    kv head, summed over them by one PyTorch op (in a fixed order, no atomics)."""
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    mask_arg, smb, smn = _mask_args(q, mask)
    part = _backend.new_output((batch, hkv, length), torch.float32, q.device)
    _colsum_kernel[(triton.cdiv(length, cfg["BLOCK_N"]), batch * hkv)](
        q, k, mask_arg, lse, part,
        *_strides(q), *_strides(k), smb, smn, *lse.stride()[:3],
        hq, hkv, hq // hkv, length, dim, scale * LOG2E, lse_scale, 1.0 / hq,
        EVEN_D=dim == cfg["BLOCK_D"], **_flags(q, mask, causal), **cfg,
    )
    return part.sum(dim=1)


def _launch_short(q, k, v, mask, causal, scale, cfg):
    """``_fwd_short_kernel`` with tiles ``cfg`` (from ``_short_config``): (out, lse, colsum)."""
    batch, hq, length, dim = q.shape
    mask_arg, smb, smn = _mask_args(q, mask)
    out = _backend.new_output((batch, hq, length, dim), q.dtype, q.device)
    lse = _backend.new_output((batch, hq, length), torch.float32, q.device)
    n_blocks = triton.cdiv(length, cfg["BLOCK_M"])
    part = _backend.new_output((batch * hq, n_blocks, length), torch.float32, q.device)
    _fwd_short_kernel[(n_blocks, batch * hq)](
        q, k, v, mask_arg, out, lse, part,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), smb, smn,
        hq, hq // k.shape[1], length, dim, scale * LOG2E, 1.0 / hq,
        EVEN_D=dim == cfg["BLOCK_D"], **_flags(q, mask, causal), **cfg,
    )
    return out, lse, part.view(batch, hq * n_blocks, length).sum(dim=1)


# The flash pass (output and log-sum-exp) where PyTorch's cuDNN attention takes the inputs:
# "cudnn", or "triton" for ``_fwd_kernel`` everywhere. Measured on an H100 (bf16, RESULTS.md): our
# Triton pass alone took 1.19-1.54x cuDNN's forward and the column-sum pass 0.65-0.96x, so with
# cuDNN's pass the forward is expected at 1.65-1.96x cuDNN's, against 2.1-2.9x for our own passes.
# bench_attention.py times both side by side.
FLASH_PASS = "cudnn"
_CUDNN_REFUSED: set = set()  # input signatures cuDNN raised on: the Triton pass takes them


def _cudnn_eligible(q, mask) -> bool:
    """Our own conditions for cuDNN's flash pass: half precision and no padding mask (padded
    queries need our conventions: zero output, lse = +inf)."""
    return FLASH_PASS == "cudnn" and mask is None and q.dtype in (torch.float16, torch.bfloat16)


def _cudnn_accepts(q, k, v, causal) -> bool:
    """PyTorch's own gate for its cuDNN attention: CUDA tensors, cuDNN attention enabled, this
    shape, head dim and layout; kv heads fewer than query heads only where the gate takes GQA (it
    then hands K and V to cuDNN unrepeated, as SDPA does; older PyTorch refuses them); not under
    ``torch.use_deterministic_algorithms``."""
    cuda = torch.backends.cuda
    if not (q.is_cuda and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
            and hasattr(cuda, "can_use_cudnn_attention")):
        return False
    gqa = q.shape[1] != k.shape[1]
    try:
        params = cuda.SDPAParams(q, k, v, None, 0.0, causal, gqa)
    except TypeError:  # PyTorch before enable_gqa: six arguments, no GQA
        if gqa:
            return False
        params = cuda.SDPAParams(q, k, v, None, 0.0, causal)
    return cuda.cudnn_sdp_enabled() and cuda.can_use_cudnn_attention(params, False)


def _cudnn_attention(q, k, v, causal, scale):
    """PyTorch's cuDNN attention forward with its log-sum-exp (a private aten op): out [B, Hq, L, D]
    in q's dtype (any strides) and lse, natural log, float32, [B, Hq, L] (or [B, Hq, L, 1])."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale,
    )
    return result[0], result[1]


def _cudnn_flash_pass(q, k, v, causal, scale):
    """(out, lse) from cuDNN (lse in natural-log units, [B, H, L] or [B, H, L, 1], as cuDNN gives
    it: the column-sum pass reads it scaled, the backward converts it), or None where cuDNN refused
    the inputs (logged once per input signature; the Triton pass takes over). Out of memory and
    device errors are raised, not taken for a refusal."""
    signature = tuple((tuple(t.shape), tuple(t.stride())) for t in (q, k, v)) + (q.dtype, q.device, causal)
    if signature in _CUDNN_REFUSED:
        return None
    try:
        out, lse = _cudnn_attention(q, k, v, causal, scale)
    except (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError)):
        raise
    except RuntimeError as err:
        _CUDNN_REFUSED.add(signature)
        logger.warning("ata_attention: cuDNN's attention refused %s %s causal=%s (%s); using the Triton "
                       "flash pass for these inputs", list(q.shape), q.dtype, causal, " ".join(str(err).split()))
        return None
    return out, lse


def _forward(q, k, v, mask, causal, scale, return_colsum):
    """(out, lse, lse_scale, colsum or None): cuDNN's flash pass where it applies, else the
    one-sweep forward for short sequences, else our flash pass; then, when the column sums are
    wanted, the column-sum pass. ``lse * lse_scale`` is the log-sum-exp in log2 units (cuDNN's is
    kept in its natural log, no conversion op in the forward). Records the choice for
    ``last_forward()``."""
    global _last_forward
    dim, length = q.shape[3], q.shape[2]
    flash = None
    if _cudnn_eligible(q, mask) and _cudnn_accepts(q, k, v, causal):
        flash = _cudnn_flash_pass(q, k, v, causal, scale)
    lse_scale = 1.0
    if flash is not None:
        _last_forward = "cudnn-flash"
        (out, lse), lse_scale = flash, LOG2E
    else:
        short = _short_config(q.device, dim, q.dtype, length, causal) if return_colsum else None
        if short is not None:
            _last_forward = "one-sweep"
            out, lse, colsum = _launch_short(q, k, v, mask, causal, scale, short)
            return out, lse, lse_scale, colsum
        _last_forward = "triton-flash"
        out, lse = _launch_fwd(q, k, v, mask, causal, scale, _config(q.device, dim, q.dtype))
    if not return_colsum:
        return out, lse, lse_scale, None
    cfg = _colsum_config(q.device, dim, q.dtype)
    return out, lse, lse_scale, _launch_colsum(q, k, mask, lse, causal, scale, cfg, lse_scale)


def _padding_bias(mask: Optional[torch.Tensor], drop_unpadded: bool) -> Optional[torch.Tensor]:
    """The key padding mask as the kernels read it: [B, L] float32, 0 for a real token and -inf for
    padding; None for no mask, and with ``drop_unpadded`` for one that pads nothing (the unmasked
    kernels, and cuDNN's pass, give the same; finding out costs a host sync, so not with
    :func:`~mgh_kernels.trusted_inputs`)."""
    if mask is None or (drop_unpadded and checks_values() and bool(mask.all())):
        return None
    return torch.where(mask, 0.0, float("-inf")).to(torch.float32)


def _log2_lse(lse, lse_scale, shape):
    """The log-sum-exp as the backward kernels read it: [B, H, L] float32, log2 units, contiguous."""
    if lse_scale == 1.0:
        return lse
    return (lse.reshape(shape).float() * lse_scale).contiguous()


def _backward(q, k, v, out, lse, mask, dout, dcolsum, causal, scale, cfg=None):
    """(dq, dk, dv) through both outputs; ``cfg`` overrides the tiles (``_bwd_config``). ``dout``
    None is a zero gradient of the output; ``dcolsum`` None or empty (the column sums were not
    asked for) is none for the column sums."""
    dout = torch.zeros_like(out) if dout is None else dout
    if dcolsum is not None and dcolsum.numel() == 0:
        dcolsum = None
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cfg = cfg or _bwd_config(q.device, dim, q.dtype)
    mask_arg, smb, smn = _mask_args(q, mask)
    has_dc = dcolsum is not None
    dc = dcolsum.to(torch.float32).contiguous() if has_dc else lse
    qk_scale = scale * LOG2E
    common = dict(HAS_DC=has_dc, **_flags(q, mask, causal), **cfg)
    delta = _backend.new_output((batch, hq, length), torch.float32, q.device)
    grid_m = (triton.cdiv(length, cfg["BLOCK_M"]), batch * hq)
    _bwd_delta_kernel[grid_m](
        q, k, out, dout, mask_arg, lse, dc, delta,
        *_strides(q), *_strides(k), *_strides(out), *_strides(dout), smb, smn,
        hq, group, length, dim, qk_scale, 1.0 / hq, **common,
    )
    dk = _backend.new_output((batch, hkv, length, dim), k.dtype, k.device)
    dv = _backend.new_output((batch, hkv, length, dim), v.dtype, v.device)
    _bwd_dkdv_kernel[(triton.cdiv(length, cfg["BLOCK_N"]), batch * hkv)](
        q, k, v, dout, mask_arg, lse, delta, dc, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), smb, smn,
        hq, hkv, group, length, dim, qk_scale, scale, 1.0 / hq, **common,
    )
    dq = _backend.new_output((batch, hq, length, dim), q.dtype, q.device)
    _bwd_dq_kernel[grid_m](
        q, k, v, dout, mask_arg, lse, delta, dc, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), smb, smn,
        hq, group, length, dim, qk_scale, scale, 1.0 / hq, **common,
    )
    return dq, dk, dv


class _ATAAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; gradients flow through ``out`` and ``colsum``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, return_colsum):
        out, lse, lse_scale, colsum = _forward(q, k, v, mask, causal, scale, return_colsum)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.lse_scale = causal, scale, lse_scale
        if colsum is None:
            colsum = torch.zeros(0, device=q.device)
            ctx.mark_non_differentiable(colsum)
        return out, colsum

    @staticmethod
    def backward(ctx, dout, dcolsum):
        q, k, v, out, lse, mask = ctx.saved_tensors
        lse = _log2_lse(lse, ctx.lse_scale, q.shape[:3])
        dq, dk, dv = _backward(q, k, v, out, lse, mask, dout, dcolsum, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------------------------
# torch.compile: the same kernels behind opaque custom ops, so that dynamo never traces into the
# kernel launches (or, on CPU, into Triton's interpreter). Eager calls keep the autograd.Function:
# a custom op's dispatch costs about 20 us more per call (measured on a 2-core CPU), several per
# cent of the smallest forward that bench_attention.py times.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mgh::ata_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
                causal: bool, scale: float, return_colsum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, D] contiguous in q's dtype, colsum [B, L] float32 (empty [0] without
    ``return_colsum``), lse [B, Hq, L] float32 in log2 units, for the backward); key_bias as
    ``_padding_bias`` gives it."""
    out, lse, lse_scale, colsum = _forward(q, k, v, key_bias, causal, scale, return_colsum)
    if colsum is None:
        colsum = q.new_empty(0, dtype=torch.float32)
    # cuDNN's output may come in q's layout; the fake implementation promises a contiguous one
    # (a copy of the output there, which the eager path does not make).
    return out.contiguous(), colsum, _log2_lse(lse, lse_scale, q.shape[:3])


@_forward_op.register_fake
def _forward_op_shapes(q, k, v, key_bias, causal, scale, return_colsum):
    batch, hq, length, _ = q.shape
    colsum = q.new_empty((batch, length) if return_colsum else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), colsum, q.new_empty((batch, hq, length), dtype=torch.float32)


@torch.library.custom_op("mgh::ata_attention_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                 key_bias: Optional[torch.Tensor], dout: Optional[torch.Tensor], dcolsum: Optional[torch.Tensor],
                 causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype; lse as ``_forward_op`` gives it."""
    return _backward(q, k, v, out, lse, key_bias, dout, dcolsum, causal, scale)


@_backward_op.register_fake
def _backward_op_shapes(q, k, v, out, lse, key_bias, dout, dcolsum, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward_op(ctx, inputs, output):
    q, k, v, key_bias, causal, scale, _ = inputs
    out, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_bias)
    ctx.causal, ctx.scale = causal, scale


def _forward_op_gradients(ctx, dout, dcolsum, _):
    q, k, v, out, lse, key_bias = ctx.saved_tensors
    dq, dk, dv = _backward_op(q, k, v, out, lse, key_bias, dout, dcolsum, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_forward_op_gradients, setup_context=_save_for_backward_op)
_backend.register_autocast("mgh::ata_attention_forward", cast=(0, 1, 2))


# --------------------------------------------------------------------------------------------
# The memory-frugal PyTorch path (CPU without the interpreter, and bfloat16 on CPU)
# --------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22  # score elements per chunk (16 MiB in float32)


def _attend_rows(q_rows, k_b, v_b, valid_b, row_start, causal, scale):
    """One sequence, a block of query rows. q_rows [Hkv, G, C, D]; k_b, v_b [Hkv, L, D]; valid_b [L].

    Returns out [Hkv, G, C, D] and the block's colsum contribution [L], summed over heads.
    """
    compute = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    length = k_b.shape[1]
    rows = row_start + torch.arange(q_rows.shape[2], device=q_rows.device)
    scores = torch.matmul(q_rows.to(compute), k_b.to(compute).transpose(-1, -2)[:, None]) * scale
    allowed = valid_b[None, :].expand(rows.shape[0], length)
    if causal:
        allowed = allowed & (rows[:, None] >= torch.arange(length, device=q_rows.device)[None, :])
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padded rows: finite, zeroed below
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs * valid_b[rows].to(compute)[:, None]
    out = torch.matmul(probs, v_b.to(compute)[:, None])
    return out.to(q_rows.dtype), probs.sum(dim=(0, 1, 2))


def _chunked(q, k, v, mask, causal, scale, return_colsum):
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    chunk = max(1, _CHUNK_ELEMENTS // max(1, hq * length))
    valid = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=q.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs, colsums = [], []
    for b in range(batch):
        q_b = q[b].view(hkv, group, length, dim)
        row_outs, col = [], None
        for start in range(0, length, chunk):
            args = (q_b[:, :, start : start + chunk], k[b], v[b], valid[b], start, causal, scale)
            if grad:  # re-compute the block's probabilities in backward instead of storing them
                o, c = torch.utils.checkpoint.checkpoint(_attend_rows, *args, use_reentrant=False)
            else:
                o, c = _attend_rows(*args)
            row_outs.append(o)
            col = c if col is None else col + c
        outs.append(torch.cat(row_outs, dim=2).reshape(hq, length, dim))
        colsums.append(col / hq)
    out = torch.stack(outs)
    colsum = torch.stack(colsums) if return_colsum else None
    if colsum is not None and colsum.dtype != torch.float64:
        colsum = colsum.to(torch.float32)
    return out, colsum


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def ata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_colsum: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Self-attention that also returns each key's received attention, never storing L x L.

    Args:
        q: [B, Hq, L, D] queries; float16, bfloat16 or float32 on CUDA (float32 accumulation),
            any float dtype on CPU. Head dims up to 256, any L.
        k, v: [B, Hkv, L, D], same dtype and device; ``Hq`` a multiple of ``Hkv`` (GQA, handled in
            the kernel without repeating K/V). Under ``torch.autocast`` for their device type the
            three may differ in dtype (rotary embedding leaves q and k float32 beside a bfloat16
            v): as for PyTorch's SDPA, they are cast once to the autocast dtype, which ``out``
            then has.
        causal: query i sees keys j <= i; otherwise all keys.
        key_padding_mask: [B, L] bool or 0/1, True = real token (left or right padding).
        scale: softmax scale, default 1/sqrt(D).
        return_colsum: also compute the column sums (skip them for plain attention).

    Returns:
        ``out`` [B, Hq, L, D] in ``q.dtype`` (the autocast dtype under autocast; zero at padded
        queries) and ``colsum`` [B, L] float32 (sum over valid queries of the probabilities, averaged over heads; zero at padded
        keys), or ``None`` when ``return_colsum`` is False. Differentiable through both.

    Values are not checked (that would synchronise with the host on every call): NaN or infinity
    in ``q``, ``k`` or ``v`` gives NaN in the outputs of the rows it reaches. mgh's trainer stops
    at a non-finite loss and names the first parameter or layer output that went non-finite.
    """
    global _last_backend, _last_forward
    amp = _backend.autocast_dtype(q)
    mask, scale = check_attention_args(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                       amp=amp)
    if not isinstance(return_colsum, bool):
        raise ValueError(f"return_colsum: expected True or False, got {return_colsum!r}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim D <= {MAX_HEAD_DIM}, got shape {list(q.shape)}")
    dtype = _backend.cast_dtype(q, amp)
    backend = _backend.select(q, dtype)
    _backend.check_kernel_dtype("q", dtype, q.device, backend)
    if q.numel() == 0:
        raise ValueError(f"q: expected a non-empty tensor, got shape {list(q.shape)}")
    _last_backend = backend
    compiling = torch.compiler.is_compiling()
    if not compiling:  # a logging call is a graph break
        logger.debug("ata_attention: %s path for %s %s", backend, list(q.shape), dtype)
    if backend != _backend.CHUNKED and compiling:
        # the custom op's registered autocast rule casts q, k and v, as autocast does for SDPA
        key_bias = _padding_bias(mask, drop_unpadded=False)  # compiled: no host sync
        out, colsum, _ = _forward_op(q, k, v, key_bias, causal, scale, return_colsum)
        return out, (colsum if return_colsum else None)
    q, k, v = _backend.autocast_inputs(amp, q, k, v)
    with _backend.autocast_off(q.device):
        if backend == _backend.CHUNKED:
            _last_forward = None
            return _chunked(q, k, v, mask, causal, scale, return_colsum)
        key_bias = _padding_bias(mask, drop_unpadded=True)
        out, colsum = _ATAAttentionFunction.apply(q, k, v, key_bias, causal, scale, return_colsum)
    return out, (colsum if return_colsum else None)
