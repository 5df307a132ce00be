"""The Triton kernels of ``ata_attention_varlen``: packed sequences in flash-attention's varlen
layout, each attending only to itself.

Layout: q [total, Hq, D], k and v [total, Hkv, D] (any strides), ``CU`` the int32 cumulative
lengths [n + 1] on the same device. A program owns one block of one sequence and head: grid
(cdiv(max_seqlen, BLOCK), n * heads); it reads its sequence's start and length from ``CU`` and does
nothing when its block starts past the sequence's end. The log-sum-exp and the backward's delta
are [Hq, total] float32 (log2 units); the column sums come as one partial per kv head [Hkv, total],
summed afterwards in a fixed order (deterministic, no atomics).

The kernels are siblings of the padded ones (``forward.py``, ``colsum.py``, ``backward.py``) and
share their per-tile steps (``_online_softmax_step``, ``_colsum_tile``, ``_key_tile``,
``_column_gradient``, ``_column_gradient_term``, ``_dkdv_step``, ``_dq_step``, ``masking.py``):
within a sequence they are the padded kernels without a key padding mask, at the sequence's offset.
Each program starts with ``_query_block`` or ``_key_block``: its sequence's place in the packed
rows, and its block within it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import LOG2E, cdiv, new_output, run
from .._precision import dot_precision
from .backward import _column_gradient, _column_gradient_term, _dkdv_step, _dq_step, _key_tile
from .colsum import _colsum_tile
from .forward import _online_softmax_step
from .masking import key_bias, keys_seen, load_rows, load_transposed


@triton.jit
def _sequence(CU, s):
    """(start, length) of sequence ``s``."""
    start = tl.load(CU + s)
    return start, tl.load(CU + s + 1) - start


@triton.jit
def _query_block(X, sxt, sxh, sxd, CU, H, GROUP, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program over query block ``program_id(0)`` of sequence and head ``program_id(1)`` (s * H + h):
    (the sequence's start in the packed rows, its length L, h, the kv head, offs_m within the
    sequence, offs_m < L, offs_d, offs_d < D, x: the block's rows of X [total, H, D] (Q or O) at
    head h, zero past L). The program has work while ``program_id(0) * BLOCK_M < L``."""
    s, h = tl.program_id(1) // H, tl.program_id(1) % H
    start, L = _sequence(CU, s)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in, d_in = offs_m < L, offs_d < D
    x = load_rows(X + start * sxt + h * sxh, offs_m, offs_d, sxt, sxd, row_in, d_in)
    return start, L, h, h // GROUP, offs_m, row_in, offs_d, d_in, x


@triton.jit
def _key_block(CU, HKV, D, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program over key block ``program_id(0)`` of sequence and kv head ``program_id(1)``
    (s * HKV + hk): (the sequence's start, its length L, hk, offs_n within the sequence, offs_n < L,
    offs_d, offs_d < D, the first query block that sees a key of the block: 0, or causal, the one
    holding its first key). The program has work while ``program_id(0) * BLOCK_N < L``."""
    s, hk = tl.program_id(1) // HKV, tl.program_id(1) % HKV
    start, L = _sequence(CU, s)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    lo = 0
    if CAUSAL:
        lo = (tl.program_id(0) * BLOCK_N // BLOCK_M) * BLOCK_M
    return start, L, hk, offs_n, offs_n < L, offs_d, offs_d < D, lo


@triton.jit
def _store_tile(ptr, value, offs, offs_d, stride_row, stride_d, rows_in, d_in):
    tl.store(
        ptr + offs[:, None] * stride_row + offs_d[None, :] * stride_d,
        value.to(ptr.dtype.element_ty),
        mask=rows_in[:, None] & d_in[None, :],
    )


@triton.jit
def _varlen_fwd_kernel(
    Q,
    K,
    V,
    CU,
    OUT,
    LSE,
    sqt,
    sqh,
    sqd,
    skt,
    skh,
    skd,
    svt,
    svh,
    svd,
    sot,
    soh,
    sod,
    H,
    GROUP,
    TOTAL,
    D,
    qk_scale,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Flash attention of one query block of one sequence and head: out and the log-sum-exp."""
    start, L, h, hk, offs_m, row_in, offs_d, d_in, q = _query_block(Q, sqt, sqh, sqd, CU, H, GROUP, D, BLOCK_M, BLOCK_D)
    if tl.program_id(0) * BLOCK_M < L:
        k_ptr, v_ptr = K + start * skt + hk * skh, V + start * svt + hk * svh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        inner = (L // BLOCK_N) * BLOCK_N  # key tiles before it: within L and (causal) below the diagonal
        if CAUSAL:
            inner = (tl.program_id(0) * BLOCK_M // BLOCK_N) * BLOCK_N
        for start_n in range(0, inner, BLOCK_N):
            _, m_i, l_i, acc = _online_softmax_step(
                q,
                offs_m,
                k_ptr,
                v_ptr,
                k_ptr,
                skt,
                skd,
                svt,
                svd,
                0,
                start_n,
                L,
                D,
                qk_scale,
                m_i,
                l_i,
                acc,
                False,
                False,
                False,
                EVEN_D,
                PRECISION,
                BLOCK_N,
                BLOCK_D,
            )
        for start_n in range(inner, keys_seen(L, BLOCK_M, CAUSAL), BLOCK_N):
            _, m_i, l_i, acc = _online_softmax_step(
                q,
                offs_m,
                k_ptr,
                v_ptr,
                k_ptr,
                skt,
                skd,
                svt,
                svd,
                0,
                start_n,
                L,
                D,
                qk_scale,
                m_i,
                l_i,
                acc,
                False,
                CAUSAL,
                True,
                EVEN_D,
                PRECISION,
                BLOCK_N,
                BLOCK_D,
            )
        inv_l = 1.0 / tl.where(row_in, l_i, 1.0)  # every real query sees at least itself
        _store_tile(OUT + start * sot + h * soh, acc * inv_l[:, None], offs_m, offs_d, sot, sod, row_in, d_in)
        tl.store(LSE + h * TOTAL + start + offs_m, m_i + tl.log2(tl.where(row_in, l_i, 1.0)), mask=row_in)


@triton.jit
def _varlen_colsum_kernel(
    Q,
    K,
    CU,
    LSE,
    PART,
    sqt,
    sqh,
    sqd,
    skt,
    skh,
    skd,
    H,
    HKV,
    GROUP,
    TOTAL,
    D,
    qk_scale,
    inv_heads,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Column sums of one key block of one sequence and kv head over the queries of that sequence
    and of every query head sharing the kv head, from the log-sum-exp; PART [Hkv, total]."""
    start, L, hk, offs_n, col_in, offs_d, d_in, lo = _key_block(CU, HKV, D, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    if tl.program_id(0) * BLOCK_N < L:
        kt = load_transposed(K + start * skt + hk * skh, offs_n, offs_d, skt, skd, col_in, d_in)
        col = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_ptr, lse_ptr = Q + start * sqt + h * sqh, LSE + h * TOTAL + start
            for start_m in range(lo, L, BLOCK_M):
                col += _colsum_tile(
                    q_ptr,
                    lse_ptr,
                    1,
                    1.0,
                    kt,
                    offs_n,
                    start_m,
                    sqt,
                    sqd,
                    L,
                    D,
                    qk_scale,
                    CAUSAL,
                    True,
                    EVEN_D,
                    PRECISION,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                )
        tl.store(PART + hk * TOTAL + start + offs_n, tl.sum(col, 0) * inv_heads, mask=col_in)


@triton.jit
def _varlen_delta_kernel(
    Q,
    K,
    OUT,
    DOUT,
    CU,
    LSE,
    DC,
    DELTA,
    sqt,
    sqh,
    sqd,
    skt,
    skh,
    skd,
    sot,
    soh,
    sod,
    sdt,
    sdh,
    sdd,
    H,
    GROUP,
    TOTAL,
    D,
    qk_scale,
    inv_heads,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = dO_i . O_i (+ sum_j P_ij dc_j / Hq over the keys of i's sequence)."""
    start, L, h, hk, offs_m, row_in, offs_d, d_in, o = _query_block(
        OUT, sot, soh, sod, CU, H, GROUP, D, BLOCK_M, BLOCK_D
    )
    if tl.program_id(0) * BLOCK_M < L:
        do = load_rows(DOUT + start * sdt + h * sdh, offs_m, offs_d, sdt, sdd, row_in, d_in)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DC:
            k_ptr = K + start * skt + hk * skh
            q = load_rows(Q + start * sqt + h * sqh, offs_m, offs_d, sqt, sqd, row_in, d_in)
            lse = tl.load(LSE + h * TOTAL + start + offs_m, mask=row_in, other=float("inf"))
            delta += _column_gradient_term(
                q,
                lse,
                k_ptr,
                k_ptr,
                0,
                skt,
                skd,
                DC + start,
                inv_heads,
                offs_m,
                offs_d,
                d_in,
                L,
                qk_scale,
                False,
                CAUSAL,
                PRECISION,
                BLOCK_M,
                BLOCK_N,
            )
        tl.store(DELTA + h * TOTAL + start + offs_m, delta, mask=row_in)


@triton.jit
def _varlen_dkdv_kernel(
    Q,
    K,
    V,
    DOUT,
    CU,
    LSE,
    DELTA,
    DC,
    DK,
    DV,
    sqt,
    sqh,
    sqd,
    skt,
    skh,
    skd,
    svt,
    svh,
    svd,
    sdt,
    sdh,
    sdd,
    sgt,
    sgh,
    H,
    HKV,
    GROUP,
    TOTAL,
    D,
    qk_scale,
    scale,
    inv_heads,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block of one sequence and kv head, summed over the query heads sharing it
    (DK, DV contiguous [total, Hkv, D]: row stride ``sgt``, head stride ``sgh``)."""
    start, L, hk, offs_n, col_in, offs_d, d_in, lo = _key_block(CU, HKV, D, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    if tl.program_id(0) * BLOCK_N < L:
        k = load_rows(K + start * skt + hk * skh, offs_n, offs_d, skt, skd, col_in, d_in)
        v = load_rows(V + start * svt + hk * svh, offs_n, offs_d, svt, svd, col_in, d_in)
        bias = key_bias(K, 0, offs_n, L, False, True)
        g = tl.zeros([BLOCK_N], tl.float32)
        if HAS_DC:
            g = _column_gradient(DC + start, offs_n, col_in, inv_heads)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for gi in range(0, GROUP):
            h = hk * GROUP + gi
            for start_m in range(lo, L, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_in = offs_m < L
                q = load_rows(Q + start * sqt + h * sqh, offs_m, offs_d, sqt, sqd, row_in, d_in)
                do = load_rows(DOUT + start * sdt + h * sdh, offs_m, offs_d, sdt, sdd, row_in, d_in)
                lse = tl.load(LSE + h * TOTAL + start + offs_m, mask=row_in, other=float("inf"))
                delta = tl.load(DELTA + h * TOTAL + start + offs_m, mask=row_in, other=0.0)
                dk, dv = _dkdv_step(
                    k, v, q, do, lse, delta, bias, g, offs_m, offs_n, qk_scale, dk, dv, HAS_DC, CAUSAL, PRECISION
                )
        _store_tile(DK + start * sgt + hk * sgh, dk * scale, offs_n, offs_d, sgt, 1, col_in, d_in)
        _store_tile(DV + start * sgt + hk * sgh, dv, offs_n, offs_d, sgt, 1, col_in, d_in)


@triton.jit
def _varlen_dq_kernel(
    Q,
    K,
    V,
    DOUT,
    CU,
    LSE,
    DELTA,
    DC,
    DQ,
    sqt,
    sqh,
    sqd,
    skt,
    skh,
    skd,
    svt,
    svh,
    svd,
    sdt,
    sdh,
    sdd,
    H,
    GROUP,
    TOTAL,
    D,
    qk_scale,
    scale,
    inv_heads,
    HAS_DC: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one sequence and head (DQ contiguous [total, Hq, D])."""
    start, L, h, hk, offs_m, row_in, offs_d, d_in, q = _query_block(Q, sqt, sqh, sqd, CU, H, GROUP, D, BLOCK_M, BLOCK_D)
    if tl.program_id(0) * BLOCK_M < L:
        do = load_rows(DOUT + start * sdt + h * sdh, offs_m, offs_d, sdt, sdd, row_in, d_in)
        lse = tl.load(LSE + h * TOTAL + start + offs_m, mask=row_in, other=float("inf"))
        delta = tl.load(DELTA + h * TOTAL + start + offs_m, mask=row_in, other=0.0)
        k_ptr, v_ptr = K + start * skt + hk * skh, V + start * svt + hk * svh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, keys_seen(L, BLOCK_M, CAUSAL), BLOCK_N):
            offs_n, col_in, bias, kt = _key_tile(k_ptr, k_ptr, 0, skt, skd, start_n, offs_d, d_in, L, False, BLOCK_N)
            vt = load_transposed(v_ptr, offs_n, offs_d, svt, svd, col_in, d_in)
            dq = _dq_step(
                q,
                do,
                kt,
                vt,
                bias,
                lse,
                delta,
                DC + start,
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
        _store_tile(DQ + start * H * D + h * D, dq * scale, offs_m, offs_d, H * D, 1, row_in, d_in)


# ---- launchers --------------------------------------------------------------------------------


def _options(
    q, causal: bool, cfg: dict, keep=("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"), **more
) -> dict:
    return dict(CAUSAL=causal, PRECISION=dot_precision(q.dtype), **{k: v for k, v in cfg.items() if k in keep}, **more)


def forward(q, k, v, cu, max_seqlen: int, causal: bool, scale: float, cfg: dict):
    """``_varlen_fwd_kernel`` with tiles ``cfg`` (``tiles.flash_tiles``): (out [total, Hq, D] in q's
    dtype, lse [Hq, total] float32 in log2 units)."""
    total, hq, dim = q.shape
    out = new_output((total, hq, dim), q.dtype, q.device)
    lse = new_output((hq, total), torch.float32, q.device)
    run(
        _varlen_fwd_kernel,
        (cdiv(max_seqlen, cfg["BLOCK_M"]), (cu.numel() - 1) * hq),
        q,
        k,
        v,
        cu,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        hq,
        hq // k.shape[1],
        total,
        dim,
        scale * LOG2E,
        **_options(q, causal, cfg, EVEN_D=dim == cfg["BLOCK_D"]),
    )
    return out, lse


def column_sums(q, k, cu, max_seqlen: int, lse, causal: bool, scale: float, cfg: dict):
    """``_varlen_colsum_kernel`` with tiles ``cfg`` (``tiles.colsum_tiles``): colsum [total] float32."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    part = new_output((hkv, total), torch.float32, q.device)
    run(
        _varlen_colsum_kernel,
        (cdiv(max_seqlen, cfg["BLOCK_N"]), (cu.numel() - 1) * hkv),
        q,
        k,
        cu,
        lse,
        part,
        *q.stride(),
        *k.stride(),
        hq,
        hkv,
        hq // hkv,
        total,
        dim,
        scale * LOG2E,
        1.0 / hq,
        **_options(q, causal, cfg, EVEN_D=dim == cfg["BLOCK_D"]),
    )
    return part.sum(dim=0)


def backward(q, k, v, cu, max_seqlen: int, out, lse, dout, dcolsum, causal: bool, scale: float, cfg: dict):
    """(dq, dk, dv), contiguous, in the inputs' dtypes, with tiles ``cfg`` (``tiles.backward_tiles``);
    ``dout`` None is a zero gradient of the output, ``dcolsum`` None none for the column sums."""
    dout = torch.zeros_like(out) if dout is None else dout
    total, hq, dim = q.shape
    hkv = k.shape[1]
    group, n = hq // hkv, cu.numel() - 1
    has_dc = dcolsum is not None
    dc = dcolsum.to(torch.float32).contiguous() if has_dc else lse
    qk_scale = scale * LOG2E
    options = _options(q, causal, cfg, HAS_DC=has_dc)
    delta = new_output((hq, total), torch.float32, q.device)
    grid_m = (cdiv(max_seqlen, cfg["BLOCK_M"]), n * hq)
    run(
        _varlen_delta_kernel,
        grid_m,
        q,
        k,
        out,
        dout,
        cu,
        lse,
        dc,
        delta,
        *q.stride(),
        *k.stride(),
        *out.stride(),
        *dout.stride(),
        hq,
        group,
        total,
        dim,
        qk_scale,
        1.0 / hq,
        **options,
    )
    dk = new_output((total, hkv, dim), k.dtype, k.device)
    dv = new_output((total, hkv, dim), v.dtype, v.device)
    run(
        _varlen_dkdv_kernel,
        (cdiv(max_seqlen, cfg["BLOCK_N"]), n * hkv),
        q,
        k,
        v,
        dout,
        cu,
        lse,
        delta,
        dc,
        dk,
        dv,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        hkv * dim,
        dim,
        hq,
        hkv,
        group,
        total,
        dim,
        qk_scale,
        scale,
        1.0 / hq,
        **options,
    )
    dq = new_output((total, hq, dim), q.dtype, q.device)
    run(
        _varlen_dq_kernel,
        grid_m,
        q,
        k,
        v,
        dout,
        cu,
        lse,
        delta,
        dc,
        dq,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *dout.stride(),
        hq,
        group,
        total,
        dim,
        qk_scale,
        scale,
        1.0 / hq,
        **options,
    )
    return dq, dk, dv
