"""The backward kernels of ``ata_attention``: exact gradients through both outputs.

With ``dc`` the gradient of the column sums and ``g_j = dc_j / Hq``, the gradient of the
probabilities is ``dP_ij = dO_i . V_j + g_j``, so the softmax backward ``dS_ij = P_ij (dP_ij -
delta_i)`` needs ``delta_i = dO_i . O_i + sum_j P_ij g_j``. Three kernels, each re-computing the
probabilities from the forward's log-sum-exp (log2 units, [B, Hq, L]):

* ``_bwd_delta_kernel``: delta per query (the second term re-streams the keys, only when ``dc``
  is given);
* ``_bwd_dkdv_kernel``: dK and dV of one key block, summed over the query heads that share it
  (``_dkdv_step`` per query tile, shared with the varlen kernel);
* ``_bwd_dq_kernel``: dQ of one query block (``_dq_step`` per key tile, shared with the varlen
  kernel).

Deterministic: each program owns its outputs, no atomics. Conventions in ``masking.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import LOG2E, cdiv, new_output, run
from .masking import (
    constexprs,
    key_bias,
    key_program,
    keys_seen,
    load_rows,
    load_transposed,
    load_valid,
    mask_args,
    query_program,
    recomputed_probabilities,
    store_rows,
    strides,
)


@triton.jit
def _key_tile(k_ptr, mask_ptr, smn, skn, skd, start_n, offs_d, d_in, L, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys start_n .. start_n + BLOCK_N of one sequence and kv head, for a query block's loop:
    (offs_n, real keys within L, their bias, kt [BLOCK_D, BLOCK_N]); padded keys load as zeros, so
    whatever they hold (NaN, inf) cannot reach a real row."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    bias = key_bias(mask_ptr, smn, offs_n, L, HAS_MASK, True)
    col_ok = bias == 0
    return offs_n, col_ok, bias, load_transposed(k_ptr, offs_n, offs_d, skn, skd, col_ok, d_in)


@triton.jit
def _column_gradient(dc_ptr, offs_n, col_in, inv_heads):
    """g_j = dc_j / Hq for keys offs_n of one sequence (``dc_ptr``: its row of the float32 column
    sums' gradient); 0 where ``col_in`` is False (padded keys: the gradient there may hold anything)."""
    return tl.load(dc_ptr + offs_n, mask=col_in, other=0.0) * inv_heads


@triton.jit
def _row_statistics(LSE, DELTA, bh, L, offs_m, row_in):
    """(lse, delta) [BLOCK_M] of queries offs_m of one sequence and head (bh = b * H + h)."""
    lse = tl.load(LSE + bh * L + offs_m, mask=row_in, other=float("inf"))
    return lse, tl.load(DELTA + bh * L + offs_m, mask=row_in, other=0.0)


@triton.jit
def _query_block(
    X,
    sxb,
    sxh,
    sxm,
    sxd,
    DOUT,
    sdb,
    sdh,
    sdm,
    sdd,
    MASK,
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
    """The query block of a delta or dQ program, and its rows of X (O or Q) and of dO, zeros at
    padded queries (whatever they hold): (b * H + h, b, h, kv head, offs_m, offs_m < L, the real
    queries among them, offs_d, offs_d < D, x, do)."""
    pid_bh, b, h, hk, offs_m, row_in = query_program(H, GROUP, L, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    q_valid = load_valid(MASK + b * smb, smn, offs_m, row_in, HAS_MASK)
    x = load_rows(X + b * sxb + h * sxh, offs_m, offs_d, sxm, sxd, q_valid, d_in)
    do = load_rows(DOUT + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, q_valid, d_in)
    return pid_bh, b, h, hk, offs_m, row_in, q_valid, offs_d, d_in, x, do


@triton.jit
def _dkdv_step(
    k,
    v,
    q,
    do,
    lse,
    delta,
    bias,
    g,
    offs_m,
    offs_n,
    qk_scale,
    dk,
    dv,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query tile's share of a key block's gradients: the probabilities re-computed transposed,
    P^T [BLOCK_N, BLOCK_M] from the rows' ``lse`` and the keys' ``bias``; dV += P^T dO; dK += dS^T Q
    with dS^T = P^T (V dO^T + g - delta), unscaled. Returns (dk, dv) [BLOCK_N, BLOCK_D] float32."""
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
    return dk, dv


@triton.jit
def _column_gradient_term(
    q,
    lse,
    k_ptr,
    mask_ptr,
    smn,
    skn,
    skd,
    dc_ptr,
    inv_heads,
    offs_m,
    offs_d,
    d_in,
    L,
    qk_scale,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """delta's second term, sum_j P_ij g_j over the keys the query block sees (``k_ptr``,
    ``mask_ptr`` and ``dc_ptr`` offset to one sequence and kv head), re-computing P from ``lse``:
    [BLOCK_M] float32."""
    pg = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, keys_seen(L, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n, col_in, bias, kt = _key_tile(
            k_ptr, mask_ptr, smn, skn, skd, start_n, offs_d, d_in, L, HAS_MASK, BLOCK_N
        )
        p = recomputed_probabilities(q, kt, bias, lse, offs_m, offs_n, qk_scale, CAUSAL, PRECISION)
        pg += tl.sum(p * _column_gradient(dc_ptr, offs_n, col_in, inv_heads)[None, :], 1)
    return pg


@triton.jit
def _dq_step(
    q,
    do,
    kt,
    vt,
    bias,
    lse,
    delta,
    dc_ptr,
    inv_heads,
    offs_m,
    offs_n,
    col_in,
    qk_scale,
    dq,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile's share of a query block's dQ: the probabilities P re-computed from the rows'
    ``lse`` and the keys' ``bias``; dQ += dS K with dS = P (dO V^T + g - delta), unscaled (g from
    ``dc_ptr`` when HAS_DC). Returns dq [BLOCK_M, BLOCK_D] float32."""
    p = recomputed_probabilities(q, kt, bias, lse, offs_m, offs_n, qk_scale, CAUSAL, PRECISION)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    if HAS_DC:
        dp += _column_gradient(dc_ptr, offs_n, col_in, inv_heads)[None, :]
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)


@triton.jit
def _bwd_delta_kernel(
    Q,
    K,
    OUT,
    DOUT,
    MASK,
    LSE,
    DC,
    DELTA,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    sob,
    soh,
    som,
    sod,
    sdb,
    sdh,
    sdm,
    sdd,
    smb,
    smn,
    H,
    GROUP,
    L,
    D,
    qk_scale,
    inv_heads,
    HAS_MASK: tl.constexpr,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = dO_i . O_i (+ sum_j P_ij dc_j / Hq when the column sums have a gradient)."""
    pid_bh, b, h, hk, offs_m, row_in, q_valid, offs_d, d_in, o, do = _query_block(
        OUT, sob, soh, som, sod, DOUT, sdb, sdh, sdm, sdd, MASK, smb, smn, H, GROUP, L, D, HAS_MASK, BLOCK_M, BLOCK_D
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DC:
        q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, q_valid, d_in)
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_in, other=float("inf"))
        delta += _column_gradient_term(
            q,
            lse,
            K + b * skb + hk * skh,
            MASK + b * smb,
            smn,
            skn,
            skd,
            DC + b * L,
            inv_heads,
            offs_m,
            offs_d,
            d_in,
            L,
            qk_scale,
            HAS_MASK,
            CAUSAL,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
        )
    tl.store(DELTA + pid_bh * L + offs_m, tl.where(q_valid, delta, 0.0), mask=row_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOUT,
    MASK,
    LSE,
    DELTA,
    DC,
    DK,
    DV,
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
    sdb,
    sdh,
    sdm,
    sdd,
    smb,
    smn,
    H,
    HKV,
    GROUP,
    L,
    D,
    qk_scale,
    scale,
    inv_heads,
    HAS_MASK: tl.constexpr,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads that share it."""
    pid_bk, b, hk, offs_n, col_in = key_program(HKV, L, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    bias = key_bias(MASK + b * smb, smn, offs_n, L, HAS_MASK, True)
    col_ok = bias == 0  # padded keys load as zeros, whatever they hold
    k = load_rows(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, col_ok, d_in)
    v = load_rows(V + b * svb + hk * svh, offs_n, offs_d, svn, svd, col_ok, d_in)
    g = tl.zeros([BLOCK_N], tl.float32)
    if HAS_DC:
        g = _column_gradient(DC + b * L, offs_n, col_ok, inv_heads)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (tl.program_id(0) * BLOCK_N // BLOCK_M) * BLOCK_M
    for gi in range(0, GROUP):
        h = hk * GROUP + gi
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < L
            lse, delta = _row_statistics(LSE, DELTA, b * H + h, L, offs_m, row_in)
            row_ok = row_in & (lse < float("inf"))  # padded queries (lse +inf) load as zeros
            q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, row_ok, d_in)
            do = load_rows(DOUT + b * sdb + h * sdh, offs_m, offs_d, sdm, sdd, row_ok, d_in)
            dk, dv = _dkdv_step(
                k, v, q, do, lse, delta, bias, g, offs_m, offs_n, qk_scale, dk, dv, HAS_DC, CAUSAL, PRECISION
            )
    store_rows(DK + pid_bk * L * D, dk * scale, offs_n, offs_d, D, col_in, d_in)
    store_rows(DV + pid_bk * L * D, dv, offs_n, offs_d, D, col_in, d_in)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DOUT,
    MASK,
    LSE,
    DELTA,
    DC,
    DQ,
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
    sdb,
    sdh,
    sdm,
    sdd,
    smb,
    smn,
    H,
    GROUP,
    L,
    D,
    qk_scale,
    scale,
    inv_heads,
    HAS_MASK: tl.constexpr,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one head, summed over key blocks."""
    pid_bh, b, h, hk, offs_m, row_in, _, offs_d, d_in, q, do = _query_block(
        Q, sqb, sqh, sqm, sqd, DOUT, sdb, sdh, sdm, sdd, MASK, smb, smn, H, GROUP, L, D, HAS_MASK, BLOCK_M, BLOCK_D
    )
    lse, delta = _row_statistics(LSE, DELTA, pid_bh, L, offs_m, row_in)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, keys_seen(L, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n, col_in, bias, kt = _key_tile(
            K + b * skb + hk * skh, MASK + b * smb, smn, skn, skd, start_n, offs_d, d_in, L, HAS_MASK, BLOCK_N
        )
        vt = load_transposed(V + b * svb + hk * svh, offs_n, offs_d, svn, svd, col_in, d_in)
        dq = _dq_step(
            q,
            do,
            kt,
            vt,
            bias,
            lse,
            delta,
            DC + b * L,
            inv_heads,
            offs_m,
            offs_n,
            col_in,
            qk_scale,
            dq,
            HAS_DC,
            CAUSAL,
            PRECISION,
        )
    store_rows(DQ + pid_bh * L * D, dq * scale, offs_m, offs_d, D, row_in, d_in)


def backward(q, k, v, out, lse, bias, dout, dcolsum, causal: bool, scale: float, cfg: dict):
    """(dq, dk, dv) in the inputs' dtypes, contiguous, with tiles ``cfg`` (``tiles.backward_tiles``).

    ``lse``: [B, Hq, L] float32 in log2 units, contiguous; ``bias``: the key padding bias [B, L] or
    None; ``dout`` None is a zero gradient of the output; ``dcolsum`` None or empty (the column
    sums were not asked for) is none for the column sums."""
    dout = torch.zeros_like(out) if dout is None else dout
    if dcolsum is not None and dcolsum.numel() == 0:
        dcolsum = None
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    mask_arg, smb, smn = mask_args(q, bias)
    has_dc = dcolsum is not None
    dc = dcolsum.to(torch.float32).contiguous() if has_dc else lse
    qk_scale = scale * LOG2E
    options = constexprs(q, bias, causal, cfg, HAS_DC=has_dc)
    delta = new_output((batch, hq, length), torch.float32, q.device)
    grid_m = (cdiv(length, cfg["BLOCK_M"]), batch * hq)
    run(
        _bwd_delta_kernel,
        grid_m,
        q,
        k,
        out,
        dout,
        mask_arg,
        lse,
        dc,
        delta,
        *strides(q),
        *strides(k),
        *strides(out),
        *strides(dout),
        smb,
        smn,
        hq,
        group,
        length,
        dim,
        qk_scale,
        1.0 / hq,
        **options,
    )
    dk = new_output((batch, hkv, length, dim), k.dtype, k.device)
    dv = new_output((batch, hkv, length, dim), v.dtype, v.device)
    run(
        _bwd_dkdv_kernel,
        (cdiv(length, cfg["BLOCK_N"]), batch * hkv),
        q,
        k,
        v,
        dout,
        mask_arg,
        lse,
        delta,
        dc,
        dk,
        dv,
        *strides(q),
        *strides(k),
        *strides(v),
        *strides(dout),
        smb,
        smn,
        hq,
        hkv,
        group,
        length,
        dim,
        qk_scale,
        scale,
        1.0 / hq,
        **options,
    )
    dq = new_output((batch, hq, length, dim), q.dtype, q.device)
    run(
        _bwd_dq_kernel,
        grid_m,
        q,
        k,
        v,
        dout,
        mask_arg,
        lse,
        delta,
        dc,
        dq,
        *strides(q),
        *strides(k),
        *strides(v),
        *strides(dout),
        smb,
        smn,
        hq,
        group,
        length,
        dim,
        qk_scale,
        scale,
        1.0 / hq,
        **options,
    )
    return dq, dk, dv
