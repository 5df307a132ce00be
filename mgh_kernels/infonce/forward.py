"""The forward kernels of ``infonce_loss``: inverse norms, the "global" statistics over candidate
splits, and the "own" logits.

The inputs are never normalised in memory: a logit is ``z_ij = (q_i . c_j) * rq_i * rc_j / tau``
with ``rq``, ``rc`` the inverse norms from ``_row_norms_kernel`` (which reads each input in its
own dtype: no float32 copy).

* "global" (one GEMM's worth of dot products): programs over (query block, split of the
  candidates) stream candidate tiles and keep, per query, a running max, sum of exp, non-target
  sum and the positive's logit (``_global_fwd_kernel``); the splits' partial statistics (O(B) per
  split) are then folded, with each query's loss, by ``_combine_splits_kernel``. Splitting keeps
  the GPU busy when B / BLOCK_M is small (flash-decoding); the split varies fastest over the
  programs, so those running at once share their query blocks in the L2 cache
  (``planner.candidate_splits`` decides how many).
* "own": each query's 1 + K logits row-wise, all kept ([B, 1 + K] float32) for the backward.

Each writes, per query, the log-sum-exp as [B, 2] (``logits.probabilities``), ``1 - p_positive``
(the "tail", summed from the non-targets so it keeps its digits when the positive dominates) and
the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import cdiv, new_output, run
from .._precision import dot_precision
from . import planner
from .logits import dots, logits


@triton.jit
def _row_norms_kernel(
    X,
    RX,
    AMAX,
    stride_x,
    ROWS,
    D,
    NORMALIZE: tl.constexpr,
    WANT_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """RX[r] = 1 / max(|X[r]|, 1e-12) (F.normalize's clamp; 1 without normalisation) and, with
    WANT_MAX, AMAX[r] = max_d |X[r, d]|: float32, read in the input's dtype (no float32 copy)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < ROWS
    squares = tl.zeros([BLOCK_M], tl.float32)
    amax = tl.zeros([BLOCK_M], tl.float32)
    if NORMALIZE or WANT_MAX:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(
                X + offs_m[:, None] * stride_x + offs_d[None, :],
                mask=row_in[:, None] & (offs_d < D)[None, :],
                other=0.0,
            ).to(tl.float32)
            squares += tl.sum(x * x, 1)
            if WANT_MAX:
                amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
    if NORMALIZE:
        rx = 1.0 / tl.maximum(tl.sqrt(squares), 1e-12)
    else:
        rx = tl.full([BLOCK_M], 1.0, tl.float32)
    tl.store(RX + offs_m, rx, mask=row_in)
    if WANT_MAX:
        tl.store(AMAX + offs_m, amax, mask=row_in)


@triton.jit
def _online_logsumexp(m_i, l_i, o_i, z, is_target):
    """Fold a [BLOCK_M, BLOCK_N] tile of logits into each row's running max, sum of exp, and sum
    of exp over the non-target candidates (so 1 - p_target = o / l keeps its precision when the
    target dominates, where exp(z_t - lse) - 1 would cancel)."""
    m_new = tl.maximum(m_i, tl.max(z, 1))
    alpha = tl.exp(m_i - m_new)
    e = tl.exp(z - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(e, 1), o_i * alpha + tl.sum(tl.where(is_target, 0.0, e), 1)


@triton.jit
def _global_fwd_kernel(
    Q,
    P,
    NEG,
    RQ,
    RP,
    RN,
    M_PART,
    L_PART,
    O_PART,
    POS_PART,
    stride_q,
    stride_p,
    stride_n,
    B,
    NP,
    NN,
    D,
    pos_offset,
    inv_tau,
    cols_per_split,
    SPLITS,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial statistics of one query block over one split of the candidates (positives, then
    negatives, numbered 0 .. NP + NN): running max, sum of exp, non-target sum, positive logit."""
    split = tl.program_id(0) % SPLITS
    pid = tl.program_id(0) // SPLITS
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, NP + NN)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < B
    rq = tl.load(RQ + offs_m, mask=row_in, other=0.0) * inv_tau
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    o_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, tl.minimum(hi, NP), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_in = offs_n < tl.minimum(hi, NP)
        rc = tl.load(RP + offs_n, mask=col_in, other=0.0)
        z = dots(Q, stride_q, offs_m, row_in, P, stride_p, offs_n, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        z = tl.where(col_in[None, :], logits(z, rq, rc), float("-inf"))
        target = offs_n[None, :] == (offs_m + pos_offset)[:, None]
        pos += tl.sum(tl.where(target, z, 0.0), 1)
        m_i, l_i, o_i = _online_logsumexp(m_i, l_i, o_i, z, target)
    for start in range(tl.maximum(lo, NP) - NP, hi - NP, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_in = offs_n < hi - NP
        rc = tl.load(RN + offs_n, mask=col_in, other=0.0)
        z = dots(Q, stride_q, offs_m, row_in, NEG, stride_n, offs_n, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        z = tl.where(col_in[None, :], logits(z, rq, rc), float("-inf"))
        m_i, l_i, o_i = _online_logsumexp(m_i, l_i, o_i, z, offs_n[None, :] < 0)
    part = split * B + offs_m
    tl.store(M_PART + part, m_i, mask=row_in)
    tl.store(L_PART + part, l_i, mask=row_in)
    tl.store(O_PART + part, o_i, mask=row_in)
    tl.store(POS_PART + part, pos, mask=row_in)


@triton.jit
def _query_loss(lse, pos_logit, tail):
    """-log p_positive per query: from 1 - p (``tail``) where the positive dominates, as
    -log1p(-tail), which keeps its digits there; lse - positive logit elsewhere.

    -log1p(-t) below t = 1/16 is its series t + t^2/2 + ... + t^7/7 (truncation below 5e-10
    relative), and -log(1 - t) above, where rounding 1 - t costs a few float32 ulps of the loss:
    Triton has no log1p under the interpreter (libdevice's is GPU-only), and 1 - t rounds to 1
    for t < 6e-8."""
    t = tail
    series = t * (1.0 + t * (1.0 / 2 + t * (1.0 / 3 + t * (1.0 / 4 + t * (1.0 / 5 + t * (1.0 / 6 + t / 7))))))
    neg_log1p = tl.where(t < 0.0625, series, -tl.log(1.0 - t))
    return tl.where(t < 0.5, neg_log1p, lse - pos_logit)


@triton.jit
def _store_statistics(LSE, TAIL, LOSS, offs, row_in, top, total, other, pos_logit):
    """Store each query's log-sum-exp (LSE [B, 2]: its largest logit ``top`` and log(total)),
    1 - p_positive (``other / total``) and loss, from its statistics relative to ``top``: the sum
    of exp ``total``, the non-target part ``other``, the positive's logit."""
    log_sum = tl.log(total)
    tail = other / total
    tl.store(LSE + 2 * offs, top, mask=row_in)
    tl.store(LSE + 2 * offs + 1, log_sum, mask=row_in)
    tl.store(TAIL + offs, tail, mask=row_in)
    tl.store(LOSS + offs, _query_loss(top + log_sum, pos_logit, tail), mask=row_in)


@triton.jit
def _combine_splits_kernel(M_PART, L_PART, O_PART, POS_PART, LSE, TAIL, LOSS, B, SPLITS, BLOCK: tl.constexpr):
    """Per query: the splits' partial statistics ([SPLITS, B] each) folded into its log-sum-exp,
    1 - p_positive and loss: one launch instead of a dozen small PyTorch ops."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = offs < B
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    for split in range(0, SPLITS):
        top = tl.maximum(top, tl.load(M_PART + split * B + offs, mask=row_in, other=0.0))
    total = tl.zeros([BLOCK], tl.float32)
    other = tl.zeros([BLOCK], tl.float32)
    pos_logit = tl.zeros([BLOCK], tl.float32)
    for split in range(0, SPLITS):
        part = split * B + offs
        weight = tl.exp(tl.load(M_PART + part, mask=row_in, other=0.0) - top)
        total += tl.load(L_PART + part, mask=row_in, other=1.0) * weight
        other += tl.load(O_PART + part, mask=row_in, other=0.0) * weight
        pos_logit += tl.load(POS_PART + part, mask=row_in, other=0.0)
    _store_statistics(LSE, TAIL, LOSS, offs, row_in, top, total, other, pos_logit)


@triton.jit
def _rowdot(A, stride_a, a_rows, C, stride_c, c_rows, row_in, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M] float32: row a_rows[i] of A . row c_rows[i] of C."""
    acc = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tile = row_in[:, None] & (offs_d < D)[None, :]
        a = tl.load(A + a_rows[:, None] * stride_a + offs_d[None, :], mask=tile, other=0.0)
        c = tl.load(C + c_rows[:, None] * stride_c + offs_d[None, :], mask=tile, other=0.0)
        acc += tl.sum(a.to(tl.float32) * c.to(tl.float32), 1)
    return acc


@triton.jit
def _own_fwd_kernel(
    Q,
    P,
    NEG,
    RQ,
    RP,
    RN,
    Z,
    LSE,
    TAIL,
    LOSS,
    stride_q,
    stride_p,
    stride_n,
    B,
    K,
    D,
    inv_tau,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Z[i, 0] = positive logit, Z[i, 1 + k] = k-th own negative's logit, and the row's
    statistics (``_store_statistics``); the tail summed from the negatives' side for precision."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < B
    rq = tl.load(RQ + offs_m, mask=row_in, other=0.0) * inv_tau
    z = _rowdot(Q, stride_q, offs_m, P, stride_p, offs_m, row_in, D, BLOCK_M, BLOCK_D)
    z = z * rq * tl.load(RP + offs_m, mask=row_in, other=0.0)
    tl.store(Z + offs_m * (K + 1), z, mask=row_in)
    pos_logit = z  # kept for the loss: re-reading Z would race with this store (other threads)
    m_i = z
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    o_i = tl.zeros([BLOCK_M], tl.float32)
    for k in range(0, K):
        rows = offs_m * K + k
        z = _rowdot(Q, stride_q, offs_m, NEG, stride_n, rows, row_in, D, BLOCK_M, BLOCK_D)
        z = z * rq * tl.load(RN + rows, mask=row_in, other=0.0)
        tl.store(Z + offs_m * (K + 1) + 1 + k, z, mask=row_in)
        m_new = tl.maximum(m_i, z)
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new)
        l_i = l_i * alpha + e
        o_i = o_i * alpha + e
        m_i = m_new
    _store_statistics(LSE, TAIL, LOSS, offs_m, row_in, m_i, l_i, o_i, pos_logit)


# ---- launchers --------------------------------------------------------------------------------


def row_norms(x: torch.Tensor, normalize: bool, want_max: bool, cfg: dict):
    """([rows] float32 1 / max(|x|, 1e-12), [rows] float32 max |entry| or None) of x [rows, D], in
    one kernel that reads x in its own dtype."""
    rows, dim = x.shape
    rx = new_output((rows,), torch.float32, x.device)
    amax = new_output((rows,), torch.float32, x.device) if want_max else None
    if rows:
        run(
            _row_norms_kernel,
            (cdiv(rows, cfg["BLOCK_ROWS"]),),
            x,
            rx,
            rx if amax is None else amax,
            x.stride(0),
            rows,
            dim,
            NORMALIZE=normalize,
            WANT_MAX=want_max,
            BLOCK_M=cfg["BLOCK_ROWS"],
            BLOCK_D=cfg["BLOCK_DO"],
            num_warps=4,
        )
    return rx, amax


def _statistics(batch: int, device):
    """lse [B, 2], tail [B] and losses [B], float32, uninitialised."""
    return (
        new_output((batch, 2), torch.float32, device),
        new_output((batch,), torch.float32, device),
        new_output((batch,), torch.float32, device),
    )


def global_forward(q, pos, neg, rq, rp, rn, tau: float, pos_offset: int, cfg: dict):
    """(lse [B, 2], 1 - p_positive [B], loss [B]), float32, for every positive and negative as a
    candidate of every query; query i's positive is pos[pos_offset + i]."""
    batch, dim = q.shape
    candidates = pos.shape[0] + neg.shape[0]
    splits, per_split = planner.forward_splits(batch, candidates, dim, q.element_size(), cfg)
    m, sums, o, pos_logit = (new_output((splits, batch), torch.float32, q.device) for _ in range(4))
    run(
        _global_fwd_kernel,
        (cdiv(batch, cfg["BLOCK_M"]) * splits,),
        q,
        pos,
        neg,
        rq,
        rp,
        rn,
        m,
        sums,
        o,
        pos_logit,
        q.stride(0),
        pos.stride(0),
        neg.stride(0),
        batch,
        pos.shape[0],
        neg.shape[0],
        dim,
        pos_offset,
        1.0 / tau,
        per_split,
        splits,
        PRECISION=dot_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N_FWD"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    lse, tail, losses = _statistics(batch, q.device)
    run(
        _combine_splits_kernel,
        (cdiv(batch, cfg["BLOCK_ROWS"]),),
        m,
        sums,
        o,
        pos_logit,
        lse,
        tail,
        losses,
        batch,
        splits,
        BLOCK=cfg["BLOCK_ROWS"],
        num_warps=4,
    )
    return lse, tail, losses


def own_forward(q, pos, neg, rq, rp, rn, tau: float, cfg: dict):
    """(lse [B, 2], 1 - p_positive [B], loss [B], logits [B, 1 + K]), float32, each query's
    candidates its own positive and its K negatives (neg [B * K, D], query i's in rows i K ..)."""
    batch, dim = q.shape
    k = neg.shape[0] // max(batch, 1)
    lse, tail, losses = _statistics(batch, q.device)
    z = new_output((batch, k + 1), torch.float32, q.device)
    run(
        _own_fwd_kernel,
        (cdiv(batch, cfg["OWN_ROWS"]),),
        q,
        pos,
        neg,
        rq,
        rp,
        rn,
        z,
        lse,
        tail,
        losses,
        q.stride(0),
        pos.stride(0),
        neg.stride(0),
        batch,
        k,
        dim,
        1.0 / tau,
        BLOCK_M=cfg["OWN_ROWS"],
        BLOCK_D=cfg["BLOCK_DO"],
        num_warps=cfg["num_warps"],
    )
    return lse, tail, losses, z
