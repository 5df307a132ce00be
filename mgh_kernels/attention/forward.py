"""The forward kernels of ``ata_attention``: the flash pass, and the one-sweep forward of short
sequences.

* ``_fwd_kernel`` (flash pass): flash attention per query block; writes the output and the row
  log-sum-exp. The column sums then come from ``colsum.py``'s pass, which re-computes the
  probabilities from that log-sum-exp. Where PyTorch's cuDNN attention takes the inputs, its
  forward replaces this pass (``cudnn.py``).
* ``_fwd_short_kernel`` (one sweep): for sequences of at most four key chunks
  (``tiles.one_sweep_tiles``), a flash pass that keeps each chunk's probabilities on chip until the
  row's softmax normaliser is known, then sums them down the columns into a per-query-block partial
  ([B * Hq, L / BLOCK_M, L] float32, reduced in a fixed order): one QK^T and one exponential per
  score, where the two passes take two of each.

Caveats: head dims up to 256 (one BLOCK_D tile); the one sweep's chunks are unrolled by hand (a
Triton loop cannot keep a list of tiles), so it takes at most four. Conventions in ``masking.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import LOG2E, cdiv, new_output, run
from .masking import (
    constexprs,
    key_bias,
    keys_seen,
    load_rows,
    load_transposed,
    load_valid,
    mask_args,
    query_program,
    strides,
    within,
)


@triton.jit
def _query_block(
    Q,
    MASK,
    sqb,
    sqh,
    sqm,
    sqd,
    smb,
    smn,
    H,
    GROUP,
    L,
    D,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The forward programs' query block: (b, h, hk, offs_m, q [BLOCK_M, BLOCK_D], q_valid)."""
    _, b, h, hk, offs_m, row_in = query_program(H, GROUP, L, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_valid = load_valid(MASK + b * smb, smn, offs_m, row_in, HAS_MASK)
    # padded queries load as zeros: whatever they hold (NaN, inf) stays out of every sum
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, q_valid, offs_d < D)
    return b, h, hk, offs_m, q, q_valid


@triton.jit
def _online_softmax_step(
    q,
    offs_m,
    K,
    V,
    MASK,
    skn,
    skd,
    svn,
    svd,
    smn,
    start,
    L,
    D,
    qk_scale,
    m_i,
    l_i,
    acc,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOUNDED: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    col_in = within(offs_n, L, BOUNDED)
    d_in = within(offs_d, D, not EVEN_D)
    bias = key_bias(MASK, smn, offs_n, L, HAS_MASK, BOUNDED)
    if HAS_MASK:  # padded keys load as zeros: NaN or inf there cannot reach a real row's sums
        col_in = bias == 0
    kt = load_transposed(K, offs_n, offs_d, skn, skd, col_in, d_in)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if HAS_MASK or BOUNDED:
        s += bias[None, :]
    if CAUSAL:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(V, offs_n, offs_d, svn, svd, col_in, d_in)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return p, m_new, l_i, acc


@triton.jit
def _store_out_lse(
    OUT,
    LSE,
    b,
    h,
    offs_m,
    q_valid,
    m_i,
    l_i,
    acc,
    sob,
    soh,
    som,
    sod,
    H,
    L,
    D,
    BLOCK_D: tl.constexpr,
):
    """Normalise and store the output (zero for padded rows and rows that saw no key) and the
    log-sum-exp (+inf for those rows); returns 1 / l per row (0 for those rows)."""
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < L
    row_ok = q_valid & (l_i > 0)
    inv_l = tl.where(row_ok, 1.0 / tl.where(row_ok, l_i, 1.0), 0.0)
    tl.store(
        OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
        mask=row_in[:, None] & (offs_d < D)[None, :],
    )
    lse = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * H + h) * L + offs_m, lse, mask=row_in)
    return inv_l


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    MASK,
    OUT,
    LSE,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    smb,
    smn,
    H,
    GROUP,
    L,
    D,
    qk_scale,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Flash attention of one query block of one head: out and the log-sum-exp."""
    b, h, hk, offs_m, q, q_valid = _query_block(
        Q,
        MASK,
        sqb,
        sqh,
        sqm,
        sqd,
        smb,
        smn,
        H,
        GROUP,
        L,
        D,
        HAS_MASK,
        BLOCK_M,
        BLOCK_D,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptr, v_ptr, mask_ptr = K + b * skb + hk * skh, V + b * svb + hk * svh, MASK + b * smb
    # Key tiles before ``inner`` lie within L and, causal, before the block's first query: no bound
    # checks, no causal mask. The rest (the diagonal, or the last partial tile) are checked.
    inner = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        inner = (tl.program_id(0) * BLOCK_M // BLOCK_N) * BLOCK_N
    hi = keys_seen(L, BLOCK_M, CAUSAL)
    for start_n in range(0, inner, BLOCK_N):
        _, m_i, l_i, acc = _online_softmax_step(
            q,
            offs_m,
            k_ptr,
            v_ptr,
            mask_ptr,
            skn,
            skd,
            svn,
            svd,
            smn,
            start_n,
            L,
            D,
            qk_scale,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            False,
            False,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
        )
    for start_n in range(inner, hi, BLOCK_N):
        _, m_i, l_i, acc = _online_softmax_step(
            q,
            offs_m,
            k_ptr,
            v_ptr,
            mask_ptr,
            skn,
            skd,
            svn,
            svd,
            smn,
            start_n,
            L,
            D,
            qk_scale,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            CAUSAL,
            True,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
        )
    _store_out_lse(OUT, LSE, b, h, offs_m, q_valid, m_i, l_i, acc, sob, soh, som, sod, H, L, D, BLOCK_D)


@triton.jit
def _chunk_unless_masked(
    q,
    offs_m,
    K,
    V,
    MASK,
    skn,
    skd,
    svn,
    svd,
    smn,
    L,
    D,
    qk_scale,
    hi,
    start,
    m_i,
    l_i,
    acc,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``_online_softmax_step`` over the chunk at ``start`` unless it starts at or past ``hi`` (under
    causal masking, past the block's last query): then its probabilities are zero and its max -inf,
    so it adds no column sum. Returns (p, the chunk's max, m_i, l_i, acc)."""
    p = tl.zeros([q.shape[0], BLOCK_N], V.dtype.element_ty)
    m_chunk = tl.full([q.shape[0]], float("-inf"), tl.float32)
    if start < hi:
        p, m_chunk, l_i, acc = _online_softmax_step(
            q,
            offs_m,
            K,
            V,
            MASK,
            skn,
            skd,
            svn,
            svd,
            smn,
            start,
            L,
            D,
            qk_scale,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            CAUSAL,
            True,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
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
    Q,
    K,
    V,
    MASK,
    OUT,
    LSE,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    smb,
    smn,
    H,
    GROUP,
    L,
    D,
    qk_scale,
    PART,
    inv_heads,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Short sequences (L <= CHUNKS * BLOCK_N): out, lse and column sums in one sweep.

    A flash-attention pass over at most four key chunks that keeps each chunk's probabilities on
    chip (in the P @ V dtype, as the output uses them) with the running max they were taken at.
    Once the row's softmax normaliser is known they are rescaled and summed down the columns into
    PART[b * H + h, pid_m, :] (reduced over query blocks and heads afterwards, in a fixed order).
    """
    b, h, hk, offs_m, q, q_valid = _query_block(
        Q,
        MASK,
        sqb,
        sqh,
        sqm,
        sqd,
        smb,
        smn,
        H,
        GROUP,
        L,
        D,
        HAS_MASK,
        BLOCK_M,
        BLOCK_D,
    )
    k_ptr = K + b * skb + hk * skh
    v_ptr = V + b * svb + hk * svh
    mask_ptr = MASK + b * smb
    hi = keys_seen(L, BLOCK_M, CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p0, m0, l_i, acc = _online_softmax_step(  # every block sees the first chunk
        q,
        offs_m,
        k_ptr,
        v_ptr,
        mask_ptr,
        skn,
        skd,
        svn,
        svd,
        smn,
        0,
        L,
        D,
        qk_scale,
        m_i,
        l_i,
        acc,
        HAS_MASK,
        CAUSAL,
        True,
        EVEN_D,
        PRECISION,
        BLOCK_N,
        BLOCK_D,
    )
    m_i = m0
    if CHUNKS > 1:
        p1, m1, m_i, l_i, acc = _chunk_unless_masked(
            q,
            offs_m,
            k_ptr,
            v_ptr,
            mask_ptr,
            skn,
            skd,
            svn,
            svd,
            smn,
            L,
            D,
            qk_scale,
            hi,
            BLOCK_N,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            CAUSAL,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
        )
    if CHUNKS > 2:
        p2, m2, m_i, l_i, acc = _chunk_unless_masked(
            q,
            offs_m,
            k_ptr,
            v_ptr,
            mask_ptr,
            skn,
            skd,
            svn,
            svd,
            smn,
            L,
            D,
            qk_scale,
            hi,
            2 * BLOCK_N,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            CAUSAL,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
        )
    if CHUNKS > 3:
        p3, m3, m_i, l_i, acc = _chunk_unless_masked(
            q,
            offs_m,
            k_ptr,
            v_ptr,
            mask_ptr,
            skn,
            skd,
            svn,
            svd,
            smn,
            L,
            D,
            qk_scale,
            hi,
            3 * BLOCK_N,
            m_i,
            l_i,
            acc,
            HAS_MASK,
            CAUSAL,
            EVEN_D,
            PRECISION,
            BLOCK_N,
            BLOCK_D,
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


# ---- launchers --------------------------------------------------------------------------------


def _launch_args(q, k, v, bias, out, lse, scale):
    """The arguments both forward kernels start with, up to ``qk_scale``."""
    batch, hq, length, dim = q.shape
    mask_arg, smb, smn = mask_args(q, bias)
    return (
        q,
        k,
        v,
        mask_arg,
        out,
        lse,
        *strides(q),
        *strides(k),
        *strides(v),
        *strides(out),
        smb,
        smn,
        hq,
        hq // k.shape[1],
        length,
        dim,
        scale * LOG2E,
    )


def flash_forward(q, k, v, bias, causal: bool, scale: float, cfg: dict):
    """``_fwd_kernel`` with tiles ``cfg`` (``tiles.flash_tiles``): (out [B, Hq, L, D] in q's dtype,
    lse [B, Hq, L] float32 in log2 units). ``bias``: the key padding bias [B, L] or None."""
    batch, hq, length, dim = q.shape
    out = new_output((batch, hq, length, dim), q.dtype, q.device)
    lse = new_output((batch, hq, length), torch.float32, q.device)
    run(
        _fwd_kernel,
        (cdiv(length, cfg["BLOCK_M"]), batch * hq),
        *_launch_args(q, k, v, bias, out, lse, scale),
        **constexprs(q, bias, causal, cfg, EVEN_D=dim == cfg["BLOCK_D"]),
    )
    return out, lse


def one_sweep_forward(q, k, v, bias, causal: bool, scale: float, cfg: dict):
    """``_fwd_short_kernel`` with tiles ``cfg`` (``tiles.one_sweep_tiles``): (out, lse, colsum
    [B, L] float32)."""
    batch, hq, length, dim = q.shape
    out = new_output((batch, hq, length, dim), q.dtype, q.device)
    lse = new_output((batch, hq, length), torch.float32, q.device)
    n_blocks = cdiv(length, cfg["BLOCK_M"])
    part = new_output((batch * hq, n_blocks, length), torch.float32, q.device)
    run(
        _fwd_short_kernel,
        (n_blocks, batch * hq),
        *_launch_args(q, k, v, bias, out, lse, scale),
        part,
        1.0 / hq,
        **constexprs(q, bias, causal, cfg, EVEN_D=dim == cfg["BLOCK_D"]),
    )
    return out, lse, part.view(batch, hq * n_blocks, length).sum(dim=1)
