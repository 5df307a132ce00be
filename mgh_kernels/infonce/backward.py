"""The backward of ``infonce_loss``: logit gradients in a bounded workspace, GEMMs, projections.

"global" (three GEMMs' worth of work, four when memory is short): with ``w_i`` the upstream
gradient of query i's loss, ``dz_ij = w_i (p_ij - [j = pos(i)])``. ``_global_dlogits_kernel``
re-computes the logits tile by tile from the saved log-sum-exp (over the whole of D, once) and
writes ``E_ij = sigma dz_ij rq_i rc_j / tau`` for a chunk of E into a workspace. Then ``E^T @ Q``
is that chunk's candidate gradient and ``E @ C`` its part of the query gradient: GEMMs at cuBLAS
speed on a GPU. How E is chunked is ``planner.backward_plan``'s choice (the scratch stays within a
byte per logit of the B x N matrix the loss never stores). The logits are re-computed over the
whole of D in one kernel: per block of D, as flash attention can at D <= 256, each gradient would
cost D / 256 GEMMs. ``sigma``, a power of two computed on
the device (``_gradient_scale_kernel``, no host sync), keeps E in half precision's range at any
embedding norm; ``_unscale_project_kernel`` removes it and applies the normalisation's gradient,
``dx = (g - (g . x^) x^) / |x|``. Only the gradients autograd asks for are computed.

"own": ``_own_bwd_kernel`` writes each gradient block from the kept logits directly, the
normalisation's gradient included (its coefficient follows from the logits: no pass over D).

Deterministic: no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._launch import cdiv, new_output, run
from .._precision import dot_precision
from . import planner
from .logits import dots, logits, probabilities


@triton.jit
def _global_dlogits_kernel(
    Q,
    C,
    RQ,
    RC,
    LSE,
    TAIL,
    W,
    SIGMA,
    E,
    stride_q,
    stride_c,
    stride_e,
    B,
    NC,
    D,
    c0,
    pos_offset,
    inv_tau,
    IS_POS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One tile of E[i, j] = sigma * dz_ij * rq_i * rc_j / tau for candidates c0 .. c0 + NC of one
    source, re-computing the logits from the saved log-sum-exp (dz_ij = w_i (p_ij - [j = pos(i)])).

    With E, ``E @ C`` is sigma * rq_i * dL/dq^_i and ``E^T @ Q`` is sigma * rc_j * dL/dc^_j: the
    inverse norms are folded in, so the raw embeddings feed the GEMMs.

    Programs go through the tiles in groups of GROUP_M query blocks, column by column, so the
    programs running at once read GROUP_M query blocks and a few candidate blocks (a GEMM's L2
    swizzle): in row-block order they would read every query block for each candidate block."""
    blocks_m = tl.cdiv(B, BLOCK_M)
    tiles_per_group = GROUP_M * tl.cdiv(NC, BLOCK_N)
    first_m = (tl.program_id(0) // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    in_group = tl.program_id(0) % tiles_per_group
    pid_m = first_m + in_group % group_rows
    pid_n = in_group // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_m < B
    col_in = offs_n < NC
    cols = c0 + offs_n
    rq = tl.load(RQ + offs_m, mask=row_in, other=0.0)
    rc = tl.load(RC + cols, mask=col_in, other=0.0)
    w = tl.load(W + offs_m, mask=row_in, other=0.0)
    z = dots(Q, stride_q, offs_m, row_in, C, stride_c, cols, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    p = probabilities(logits(z, rq * inv_tau, rc), LSE, offs_m, row_in)
    scale = rq[:, None] * rc[None, :] * inv_tau
    if IS_POS:
        # p_target - 1 = -(1 - p_target), kept exact by the forward (the non-target sum).
        minus_tail = -tl.load(TAIL + offs_m, mask=row_in, other=0.0)
        p = tl.where(cols[None, :] == (offs_m + pos_offset)[:, None], minus_tail[:, None], p)
    e = (w * tl.load(SIGMA))[:, None] * p * scale
    tl.store(
        E + offs_m[:, None] * stride_e + offs_n[None, :],
        e.to(E.dtype.element_ty),
        mask=row_in[:, None] & col_in[None, :],
    )


@triton.jit
def _max_of(X, N, BLOCK: tl.constexpr):
    """max(X[0 .. N]) of a float32 vector of non-negative entries, one program (0 when N = 0)."""
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.load(X + offs, mask=offs < N, other=0.0))
    return tl.max(top, 0)


@triton.jit
def _gradient_scale_kernel(
    W, RQ, RP, RN, QMAX, PMAX, NMAX, SIGMA, B, NP, NN, log2_tau, HAS_MAX: tl.constexpr, BLOCK: tl.constexpr
):
    """SIGMA[0] = 2^-ceil(log2(max_i |W_i| RQ_i * max_j RC_j / tau)) (1 when every W_i is 0),
    raised with HAS_MAX by 2^s, s = -ceil(log2(max entry of the embeddings)) within [0, 12]
    (QMAX, PMAX, NMAX: each row's largest |entry|); see ``gradient_scale``. One program: the
    vectors are O(B(1 + K)) floats, streamed once."""
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        row_in = offs < B
        w = tl.load(W + offs, mask=row_in, other=0.0)
        top = tl.maximum(top, tl.abs(w) * tl.load(RQ + offs, mask=row_in, other=0.0))
    top = tl.max(top, 0)
    rc_max = tl.maximum(_max_of(RP, NP, BLOCK), _max_of(RN, NN, BLOCK))
    exponent = tl.where(top > 0, -tl.ceil(tl.log2(top) + tl.log2(rc_max) - log2_tau), 0.0)
    if HAS_MAX:
        inputs_max = tl.maximum(_max_of(QMAX, B, BLOCK), tl.maximum(_max_of(PMAX, NP, BLOCK), _max_of(NMAX, NN, BLOCK)))
        exponent += tl.minimum(tl.maximum(-tl.ceil(tl.log2(inputs_max)), 0.0), 12.0)
    tl.store(SIGMA, tl.exp2(tl.minimum(tl.maximum(exponent, -126.0), 126.0)))


@triton.jit
def _unscale_project_kernel(
    G,
    X,
    RX,
    SIGMA,
    OUT,
    stride_g,
    stride_x,
    stride_o,
    ROWS,
    D,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """OUT[r] = (G[r] - (G[r] . x^_r) x^_r) / sigma with x^_r = X[r] * RX[r] (G[r] / sigma without
    normalisation): from G = sigma * RX[r] * dL/dx^ (RX = 1 / |x|) to dL/dx, the normalisation's
    gradient. OUT may be G (each program reads its rows whole before it writes them)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < ROWS
    inv_sigma = 1.0 / tl.load(SIGMA)
    coef = tl.zeros([BLOCK_M], tl.float32)
    if NORMALIZE:
        rx = tl.load(RX + offs_m, mask=row_in, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            tile = row_in[:, None] & (offs_d < D)[None, :]
            g = tl.load(G + offs_m[:, None] * stride_g + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
            x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
            coef += tl.sum(g * x, 1)
        coef = coef * rx * rx
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tile = row_in[:, None] & (offs_d < D)[None, :]
        g = tl.load(G + offs_m[:, None] * stride_g + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        out = (g - coef[:, None] * x) * inv_sigma
        tl.store(OUT + offs_m[:, None] * stride_o + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=tile)


@triton.jit
def _own_bwd_kernel(
    Q,
    P,
    NEG,
    RQ,
    RP,
    RN,
    Z,
    LSE,
    TAIL,
    W,
    DQ,
    DP,
    DN,
    stride_q,
    stride_p,
    stride_n,
    B,
    K,
    D,
    inv_tau,
    tau,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """dL/dq, dL/dpos, dL/dneg for one block of rows and of D, in the inputs' dtype.

    With dz_c = w (p_c - [c = pos]) / tau and cos_c = tau z_c, the normalisation's gradient needs
    no pass over D: dL/dq = rq (sum_c dz_c c^_c - (sum_c dz_c cos_c) q^), since q^ . c^_c = cos_c,
    and dL/dc = rc dz_c (q^ - cos_c c^_c). Without normalisation rq = rc = 1 and the cos terms drop.
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < B
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    tile = row_in[:, None] & (offs_d < D)[None, :]
    rq = tl.load(RQ + offs_m, mask=row_in, other=0.0)
    w = tl.load(W + offs_m, mask=row_in, other=0.0) * inv_tau
    q_hat = tl.load(Q + offs_m[:, None] * stride_q + offs_d[None, :], mask=tile, other=0.0).to(tl.float32) * rq[:, None]
    # positive: dz = w (p - 1) = -w (1 - p)
    rc = tl.load(RP + offs_m, mask=row_in, other=0.0)
    dz = -w * tl.load(TAIL + offs_m, mask=row_in, other=0.0)
    c_hat = tl.load(P + offs_m[:, None] * stride_p + offs_d[None, :], mask=tile, other=0.0).to(tl.float32) * rc[:, None]
    g = dz[:, None] * c_hat
    along = tl.zeros([BLOCK_M], tl.float32)  # sum_c dz_c cos_c: the component of g along q^
    dc = q_hat
    if NORMALIZE:
        cos = tl.load(Z + offs_m * (K + 1), mask=row_in, other=0.0) * tau
        along = dz * cos
        dc = q_hat - cos[:, None] * c_hat
    tl.store(DP + offs_m[:, None] * D + offs_d[None, :], ((dz * rc)[:, None] * dc).to(DP.dtype.element_ty), mask=tile)
    for k in range(0, K):
        rows = offs_m * K + k
        rc = tl.load(RN + rows, mask=row_in, other=0.0)
        z = tl.load(Z + offs_m * (K + 1) + 1 + k, mask=row_in, other=0.0)
        dz = w * probabilities(z, LSE, offs_m, row_in)
        c_hat = (
            tl.load(NEG + rows[:, None] * stride_n + offs_d[None, :], mask=tile, other=0.0).to(tl.float32) * rc[:, None]
        )
        g += dz[:, None] * c_hat
        dc = q_hat
        if NORMALIZE:
            along += dz * z * tau
            dc = q_hat - (z * tau)[:, None] * c_hat
        tl.store(DN + rows[:, None] * D + offs_d[None, :], ((dz * rc)[:, None] * dc).to(DN.dtype.element_ty), mask=tile)
    if NORMALIZE:
        g -= along[:, None] * q_hat
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (g * rq[:, None]).to(DQ.dtype.element_ty), mask=tile)


# ---- launchers --------------------------------------------------------------------------------


def gradient_scale(w, rq, rp, rn, tau: float, maxima=None):
    """[1] float32 sigma = 2^-ceil(log2(max_i |w_i| rq_i * max_j rc_j / tau)), on the device (no host
    sync, one launch); 1 when every upstream gradient is 0. Computed in log space: the product may
    overflow. rc: the candidates' inverse norms ``rp`` and ``rn``.

    ``maxima`` (float16 inputs: each row's largest |entry| of q, pos and neg) raises sigma by a
    further 2^s, s = -ceil(log2(the largest of them)) within [0, 12]: the GEMM outputs E^T @ Q and
    E @ C have the embeddings' magnitude times E's, and with small embeddings they would fall into
    float16's subnormals; E stays below 2^12, far from float16's overflow."""
    sigma = new_output((1,), torch.float32, w.device)
    q_max, p_max, n_max = maxima if maxima is not None else (rq, rp, rn)
    run(
        _gradient_scale_kernel,
        (1,),
        w,
        rq,
        rp,
        rn,
        q_max,
        p_max,
        n_max,
        sigma,
        w.shape[0],
        rp.shape[0],
        rn.shape[0],
        math.log2(tau),
        HAS_MAX=maxima is not None,
        BLOCK=1024,
        num_warps=8,
    )
    return sigma


def project(g, x, rx, sigma, out, normalize: bool, cfg: dict):
    """``out = (g - (g . x^) x^) / sigma`` row-wise (see ``_unscale_project_kernel``)."""
    rows, dim = x.shape
    if rows:
        run(
            _unscale_project_kernel,
            (cdiv(rows, cfg["BLOCK_ROWS"]),),
            g,
            x,
            rx,
            sigma,
            out,
            g.stride(0),
            x.stride(0),
            out.stride(0),
            rows,
            dim,
            NORMALIZE=normalize,
            BLOCK_M=cfg["BLOCK_ROWS"],
            BLOCK_D=cfg["BLOCK_DO"],
            num_warps=4,
        )
    return out


def logit_gradients(
    q, rq, lse, tail, w, sigma, cand, rc, c0: int, e, is_pos: bool, pos_offset: int, tau: float, cfg: dict
):
    """E [rows, nc] (a view of the workspace) for the queries ``q`` [rows, D] (with their rq, lse,
    tail, w) and candidates c0 .. c0 + nc of one source; see ``_global_dlogits_kernel``."""
    rows, nc = e.shape
    run(
        _global_dlogits_kernel,
        (cdiv(rows, cfg["BLOCK_M"]) * cdiv(nc, cfg["BLOCK_N"]),),
        q,
        cand,
        rq,
        rc,
        lse,
        tail,
        w,
        sigma,
        e,
        q.stride(0),
        cand.stride(0),
        e.stride(0),
        rows,
        nc,
        q.shape[1],
        c0,
        pos_offset,
        1.0 / tau,
        IS_POS=is_pos,
        PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _query_grads(e, pos, neg, out):
    """out = E @ [pos; neg] for E [rows, NP + NN] (sigma rq dL/dq^ of those rows)."""
    n_pos = pos.shape[0]
    torch.mm(e[:, :n_pos], pos, out=out)
    if neg.shape[0]:
        out.addmm_(e[:, n_pos:], neg)


def _accumulate(acc, e, block, partial_rows: int):
    """acc += E @ block in float32; a half-precision product is rounded once per chunk, then summed
    in float32, ``partial_rows`` rows at a time (the size of its temporary)."""
    if e.dtype == torch.float32:
        acc.addmm_(e, block)
        return
    for r0 in range(0, e.shape[0], partial_rows):
        acc[r0 : r0 + partial_rows].add_(torch.mm(e[r0 : r0 + partial_rows], block))


def global_backward(
    q,
    pos,
    neg,
    rq,
    rp,
    rn,
    lse,
    tail,
    w,
    tau: float,
    normalize: bool,
    pos_offset: int,
    maxima,
    cfg: dict,
    needs=(True, True, True),
):
    """(dq, dpos, dneg) in the inputs' dtype, None where ``needs`` (q, pos, neg) is False: E
    re-computed chunk by chunk (``planner.backward_plan``), dC = E^T @ Q and dq = E @ C as GEMMs,
    then the normalisation's gradient."""
    batch, dim = q.shape
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    need_q, need_pos, need_neg = needs
    sigma = gradient_scale(w, rq, rp, rn, tau, maxima)
    dpos = new_output(tuple(pos.shape), pos.dtype, q.device) if need_pos else None
    dneg = new_output(tuple(neg.shape), neg.dtype, q.device) if need_neg else None
    gq = new_output((batch, dim), q.dtype, q.device) if need_q else None
    plan = planner.backward_plan(batch, n_pos + n_neg, dim, q.element_size(), need_q, need_pos or need_neg)
    workspace = new_output((plan.workspace_elements,), q.dtype, q.device)
    whole = workspace.view(batch, n_pos + n_neg) if plan.mode == "one-pass" else None
    acc = torch.zeros(batch, dim, dtype=torch.float32, device=q.device) if plan.mode == "accumulate" else None
    dq_from_columns = need_q and plan.mode != "sweeps"
    sources = [(pos, rp, dpos, True, 0), (neg, rn, dneg, False, n_pos)]
    for cand, rc, grad, is_pos, first in sources if plan.columns else ():  # the column sweep
        if grad is None and not dq_from_columns:
            continue
        for c0 in range(0, cand.shape[0], plan.columns):
            nc = min(plan.columns, cand.shape[0] - c0)
            e = whole[:, first + c0 : first + c0 + nc] if whole is not None else workspace[: batch * nc].view(batch, nc)
            logit_gradients(q, rq, lse, tail, w, sigma, cand, rc, c0, e, is_pos, pos_offset, tau, cfg)
            if grad is not None:
                torch.mm(e.t(), q, out=grad[c0 : c0 + nc])  # sigma rc_j dL/dc^_j, rows c0 .. c0 + nc
            if acc is not None:
                _accumulate(acc, e, cand[c0 : c0 + nc], plan.partial_rows)
        if grad is not None and cand.shape[0]:
            project(grad, cand, rc, sigma, grad, normalize, cfg)
    if not need_q:
        return None, dpos, dneg
    if whole is not None:
        _query_grads(whole, pos, neg, gq)
    elif acc is None:  # the row sweep: E (again), a block of queries at a time
        for r0 in range(0, batch, plan.rows):
            r1 = min(batch, r0 + plan.rows)
            e = workspace[: (r1 - r0) * (n_pos + n_neg)].view(r1 - r0, n_pos + n_neg)
            rows = [t[r0:r1] for t in (q, rq, lse, tail, w)]
            for cand, rc, _, is_pos, first in sources:
                if cand.shape[0]:
                    logit_gradients(
                        *rows,
                        sigma,
                        cand,
                        rc,
                        0,
                        e[:, first : first + cand.shape[0]],
                        is_pos,
                        pos_offset + r0,
                        tau,
                        cfg,
                    )
            _query_grads(e, pos, neg, gq[r0:r1])
    dq = project(gq if acc is None else acc, q, rq, sigma, gq, normalize, cfg)
    return dq, dpos, dneg


def own_backward(q, pos, neg, rq, rp, rn, lse, tail, logits_, w, tau: float, normalize: bool, cfg: dict):
    """(dq, dpos, dneg) in the inputs' dtype for "own" candidates, from the forward's kept logits
    ``logits_`` [B, 1 + K]; see ``_own_bwd_kernel``."""
    batch, dim = q.shape
    dq, dpos, dneg = (new_output(tuple(x.shape), x.dtype, x.device) for x in (q, pos, neg))
    # Elementwise work on several float32 tiles at once: half the rows of the GEMM-like kernels
    # (at 64 rows it needs more than the 255 registers a thread has on sm_90).
    rows = max(16, cfg["OWN_ROWS"] // 2)
    run(
        _own_bwd_kernel,
        (cdiv(batch, rows), cdiv(dim, cfg["BLOCK_DO"])),
        q,
        pos,
        neg,
        rq,
        rp,
        rn,
        logits_,
        lse,
        tail,
        w,
        dq,
        dpos,
        dneg,
        q.stride(0),
        pos.stride(0),
        neg.stride(0),
        batch,
        logits_.shape[1] - 1,
        dim,
        1.0 / tau,
        tau,
        NORMALIZE=normalize,
        BLOCK_M=rows,
        BLOCK_DO=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"],
    )
    return dq, dpos, dneg
