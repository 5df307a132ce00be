"""The column-sum pass: each key's received attention, re-computed from the flash pass's
log-sum-exp.

``column_sums`` runs one program per key block and kv head. It loops over the query heads that
share the kv head and over their query blocks, re-computes each [BLOCK_M, BLOCK_N] tile of
probabilities from the rows' log-sum-exp (one FFMA and one exponential per score), accumulates the
tiles whole and reduces across rows once at the end. The result is one partial per kv head,
summed over kv heads by one PyTorch op in a fixed order: deterministic, no atomics.

It reads either our flash pass's log-sum-exp (log2 units, ``lse_scale`` 1) or cuDNN's (natural
log, [B, H, L, 1] in the query's layout, ``lse_scale`` log2(e)) through its strides. The pass is
bound by its exponentials as much as by QK^T (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import LOG2E, cdiv, new_output, run
from .masking import constexprs, key_program, load_rows, load_valid, mask_args, strides, within, zero_above_diagonal


@triton.jit
def _colsum_kernel(
    Q,
    K,
    MASK,
    LSE,
    PART,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    smb,
    smn,
    slb,
    slh,
    slm,
    H,
    HKV,
    GROUP,
    L,
    D,
    qk_scale,
    lse_scale,
    inv_heads,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Column sums of one key block of one kv head over every query of the heads that share it,
    re-computing the probabilities from the log-sum-exp (LSE [B, Hq, L] with strides slb, slh, slm;
    times ``lse_scale`` gives log2 units), over the number of query heads (``inv_heads`` = 1 / Hq)."""
    pid_n = tl.program_id(0)
    pid_bk, b, hk, offs_n, col_in = key_program(HKV, L, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    # Padded keys load as zeros (NaN or inf there stays in their own columns, dropped below).
    key_valid = load_valid(MASK + b * smb, smn, offs_n, col_in, HAS_MASK)
    kt = tl.load(
        K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=key_valid[None, :] & d_in[:, None],
        other=0.0,
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
                col += _colsum_tile(
                    q_ptr,
                    lse_ptr,
                    slm,
                    lse_scale,
                    kt,
                    offs_n,
                    start_m,
                    sqm,
                    sqd,
                    L,
                    D,
                    qk_scale,
                    True,
                    True,
                    EVEN_D,
                    PRECISION,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                )
        for start_m in range(above, inner, BLOCK_M):
            col += _colsum_tile(
                q_ptr,
                lse_ptr,
                slm,
                lse_scale,
                kt,
                offs_n,
                start_m,
                sqm,
                sqd,
                L,
                D,
                qk_scale,
                False,
                False,
                EVEN_D,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
        for start_m in range(inner, L, BLOCK_M):  # the last, partial query block
            col += _colsum_tile(
                q_ptr,
                lse_ptr,
                slm,
                lse_scale,
                kt,
                offs_n,
                start_m,
                sqm,
                sqd,
                L,
                D,
                qk_scale,
                False,
                True,
                EVEN_D,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
    # Padded keys: dropped here, once per column, not per score (their scores may exceed the row's
    # log-sum-exp, which covers valid keys only, and sum to inf in their own columns; where, not a
    # product, gives them 0).
    tl.store(PART + pid_bk * L + offs_n, tl.where(key_valid, tl.sum(col, 0) * inv_heads, 0.0), mask=col_in)


@triton.jit
def _colsum_tile(
    q_ptr,
    lse_ptr,
    slm,
    lse_scale,
    kt,
    offs_n,
    start_m,
    sqm,
    sqd,
    L,
    D,
    qk_scale,
    CAUSAL: tl.constexpr,
    BOUNDED: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] probabilities of queries start_m .. start_m + BLOCK_M of one head for the
    key block ``kt`` [BLOCK_D, BLOCK_N], from their log-sum-exp. Padded and out-of-range queries
    have lse = +inf, so they load as zeros and their probabilities are exactly 0. CAUSAL masks the
    keys after each query (tiles on the diagonal only); BOUNDED: the block may reach past L;
    EVEN_D: BLOCK_D == D."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = within(offs_m, L, BOUNDED)
    lse = tl.load(lse_ptr + offs_m * slm, mask=row_in, other=float("inf")) * lse_scale
    # padded queries (lse +inf) load as zeros: NaN or inf there must not reach the column sums
    q = load_rows(q_ptr, offs_m, offs_d, sqm, sqd, row_in & (lse < float("inf")), within(offs_d, D, not EVEN_D))
    p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - lse[:, None])
    return zero_above_diagonal(p, offs_m, offs_n, CAUSAL)


def column_sums(q, k, bias, lse, causal: bool, scale: float, cfg: dict, lse_scale: float = 1.0):
    """``_colsum_kernel`` with tiles ``cfg`` (``tiles.colsum_tiles``): the column sums [B, L]
    float32 from the saved lse ([B, Hq, L] or [B, Hq, L, 1], any strides; times ``lse_scale`` in
    log2 units)."""
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    mask_arg, smb, smn = mask_args(q, bias)
    part = new_output((batch, hkv, length), torch.float32, q.device)
    run(
        _colsum_kernel,
        (cdiv(length, cfg["BLOCK_N"]), batch * hkv),
        q,
        k,
        mask_arg,
        lse,
        part,
        *strides(q),
        *strides(k),
        smb,
        smn,
        *lse.stride()[:3],
        hq,
        hkv,
        hq // hkv,
        length,
        dim,
        scale * LOG2E,
        lse_scale,
        1.0 / hq,
        **constexprs(q, bias, causal, cfg, EVEN_D=dim == cfg["BLOCK_D"]),
    )
    return part.sum(dim=1)
