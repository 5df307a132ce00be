"""Fused InfoNCE with in-batch and hard negatives that never stores the logit matrix.

``infonce_loss(q, pos, neg, ...)`` has the exact semantics of ``reference.infonce`` (cosine
similarities over L2-normalised vectors, temperature ``tau``, "global" or "own" candidates).

Algorithm (Triton). The inputs are never normalised in memory: the kernels take the raw
embeddings and their inverse norms (O(B(1+K)) floats), and a logit is
``z_ij = (q_i . c_j) * rq_i * rc_j / tau``. With N = B(1+K) candidates, one "GEMM" below is
2 B N D FLOPs; the eager loss costs 3 (logits, dq, dC) plus several passes over B x N matrices.

* "global" forward (1 GEMM): programs over (query block, split of the candidates) stream
  candidate tiles, the dot products accumulated over chunks of D, and keep a running max, sum of
  exp, non-target sum and the positive's logit per query; the splits' partial statistics (O(B)
  per split) are combined after, with each query's loss, by one small kernel. Splitting keeps the
  GPU busy when B / BLOCK_M is small, and, the split varying fastest over the programs, lets those
  running at once share their query blocks in the L2 cache (a program re-reads its BLOCK_M x D
  query block for every candidate tile).
* "global" backward (3 GEMMs, 4 when memory is short): with ``w_i`` the upstream gradient of
  query i's loss, ``dz_ij = w_i (p_ij - [j = pos(i)])``. A kernel re-computes the logits tile by
  tile from the saved log-sum-exp (over the whole of D, once) and writes
  ``E_ij = sigma dz_ij rq_i rc_j / tau`` for a chunk of E into a bounded workspace. Then
  ``E^T @ Q_raw`` is that chunk's candidate gradient and ``E @ C_raw`` its part of the query
  gradient: GEMMs at cuBLAS speed on a GPU. How E is chunked (``_BackwardPlan``) keeps the
  backward's scratch within a byte per logit of the B x N matrix it never stores (a twelfth of
  the eager loss's peak): E whole when it fits; else chunks of candidate columns with dq summed
  in a float32 [B, D] accumulator; else, where that accumulator alone would break the budget
  (small B, large D), candidate chunks for dC and then E re-computed in chunks of queries for dq.
  Only the gradients autograd asks for are computed (frozen candidates: no dC GEMMs, no sweep).
  sigma, a power of two computed on the device by a one-program kernel (no host sync), keeps E in
  half precision's range at any embedding norm. A last row-wise
  kernel removes sigma and applies the normalisation's gradient, ``dx = (g - (g . x^) x^) / |x|``.
  Deterministic: no atomics. (Re-computing per block of D instead, as flash attention can at
  D <= 256, would cost D / 256 GEMMs per gradient: 35 GEMMs in all at D = 4096.)
* "own": each query's 1+K logits are computed row-wise and kept (O(B(1+K)) floats), and the
  backward writes each gradient block from them directly, the normalisation's gradient included
  (its coefficient ``g . x^`` follows from the logits, so no pass over D is needed).
* Inverse norms come from one row-wise kernel that reads each input in its own dtype: memory
  beyond inputs and gradients is the backward's scratch and O(B(1+K)) statistics.

``gather=True`` under an initialised ``torch.distributed`` group makes the candidates of every
rank the global batch (sentence-transformers' ``gather_across_devices``): positives and negatives
are all-gathered with gradient, each rank's loss is the mean over its own queries, and gradients
flow back to each rank's own embeddings. Averaged over ranks as DDP does, loss and gradients equal
those of one process holding the whole batch.

Dispatch (see ``mgh_kernels._backend``): Triton on CUDA, Triton's interpreter on CPU under
``TRITON_INTERPRET=1``, otherwise a PyTorch path over query chunks. While ``torch.compile``
traces a call, the kernels run behind the custom ops ``mgh::infonce_forward`` and
``mgh::infonce_backward`` (opaque to dynamo).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import triton
import triton.language as tl

from . import _backend
from ._validation import NEGATIVE_MODES, REDUCTIONS, check_choice, check_infonce_args, check_positive

__all__ = ["InfoNCELoss", "infonce_loss", "last_backend"]

logger = logging.getLogger(__name__)

_last_backend: Optional[str] = None


def last_backend() -> Optional[str]:
    """Which path the latest ``infonce_loss`` call took: "triton", "triton-interpreter" or
    "torch-chunked" (None before the first call)."""
    return _last_backend


# --------------------------------------------------------------------------------------------
# Triton kernels. X [rows, D] row-major with row stride; inverse norms RX [rows] float32.
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_norms_kernel(X, RX, AMAX, stride_x, ROWS, D, NORMALIZE: tl.constexpr, WANT_MAX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
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
            x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :],
                        mask=row_in[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
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
def _dots(A, stride_a, offs_a, a_in, C, stride_c, offs_c, c_in, D, PRECISION: tl.constexpr,
          BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_A, BLOCK_C] float32 dot products of rows of A with rows of C, over chunks of D."""
    acc = tl.zeros([BLOCK_A, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        a = tl.load(A + offs_a[:, None] * stride_a + offs_d[None, :], mask=a_in[:, None] & d_in[None, :], other=0.0)
        ct = tl.load(C + offs_c[None, :] * stride_c + offs_d[:, None], mask=c_in[None, :] & d_in[:, None], other=0.0)
        acc += tl.dot(a, ct, input_precision=PRECISION)
    return acc


@triton.jit
def _logits(dots, rq_over_tau, rc):
    """Logits from raw dot products [BLOCK_M, BLOCK_N], ``rq / tau`` per row and ``rc`` per column,
    rounded the same way in the forward and in the backward's re-computation: a logit the two
    round differently (by a few ulps of up to 1 / tau) would make a dominant probability
    exp(z - lse) miss 1 by as much, where PyTorch's, computed from the very logits of its lse, is
    exact to float32."""
    return dots * rq_over_tau[:, None] * rc[None, :]


@triton.jit
def _probabilities(z, LSE, offs_m, row_in):
    """Softmax probabilities of logits z [BLOCK_M, N] from their rows' log-sum-exp, kept as LSE
    [B, 2]: the row's largest logit m and log(sum exp(z - m)). p = exp((z - m) - log_sum) never
    rounds the log-sum-exp at the logits' magnitude (up to 1 / tau), so a dominant probability is
    exact to float32 as in PyTorch's log-softmax, where exp(z - lse) would miss it by an ulp of
    1 / tau."""
    top = tl.load(LSE + 2 * offs_m, mask=row_in, other=0.0)
    log_sum = tl.load(LSE + 2 * offs_m + 1, mask=row_in, other=0.0)
    if len(z.shape) == 2:
        return tl.exp((z - top[:, None]) - log_sum[:, None])
    return tl.exp((z - top) - log_sum)


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
    Q, P, NEG, RQ, RP, RN, M_PART, L_PART, O_PART, POS_PART,
    stride_q, stride_p, stride_n,
    B, NP, NN, D, pos_offset, inv_tau, cols_per_split, SPLITS,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial statistics of one query block over one split of the candidates (positives, then
    negatives, numbered 0 .. NP + NN): running max, sum of exp, non-target sum, positive logit.
    Splitting the candidates keeps the GPU busy when B / BLOCK_M is small (flash-decoding), and
    the split varies fastest over the programs, so those running at once share their query blocks
    (each re-read from the L2 cache for every candidate tile; see ``_candidate_splits``)."""
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
        z = _dots(Q, stride_q, offs_m, row_in, P, stride_p, offs_n, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        z = tl.where(col_in[None, :], _logits(z, rq, rc), float("-inf"))
        target = offs_n[None, :] == (offs_m + pos_offset)[:, None]
        pos += tl.sum(tl.where(target, z, 0.0), 1)
        m_i, l_i, o_i = _online_logsumexp(m_i, l_i, o_i, z, target)
    for start in range(tl.maximum(lo, NP) - NP, hi - NP, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_in = offs_n < hi - NP
        rc = tl.load(RN + offs_n, mask=col_in, other=0.0)
        z = _dots(Q, stride_q, offs_m, row_in, NEG, stride_n, offs_n, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        z = tl.where(col_in[None, :], _logits(z, rq, rc), float("-inf"))
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
def _combine_splits_kernel(M_PART, L_PART, O_PART, POS_PART, LSE, TAIL, LOSS, B, SPLITS, BLOCK: tl.constexpr):
    """Per query: the splits' partial statistics ([SPLITS, B] each) folded into the log-sum-exp (LSE
    [B, 2], see ``_probabilities``) and 1 - p_positive (the backward's), and the loss; one launch
    where a dozen small PyTorch ops stood."""
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
    log_sum = tl.log(total)
    tail = other / total
    tl.store(LSE + 2 * offs, top, mask=row_in)
    tl.store(LSE + 2 * offs + 1, log_sum, mask=row_in)
    tl.store(TAIL + offs, tail, mask=row_in)
    tl.store(LOSS + offs, _query_loss(top + log_sum, pos_logit, tail), mask=row_in)


@triton.jit
def _global_dlogits_kernel(
    Q, C, RQ, RC, LSE, TAIL, W, SIGMA, E,
    stride_q, stride_c, stride_e,
    B, NC, D, c0, pos_offset, inv_tau,
    IS_POS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of E[i, j] = sigma * dz_ij * rq_i * rc_j / tau for candidates c0 .. c0 + NC of one
    source, re-computing the logits from the saved log-sum-exp (dz_ij = w_i (p_ij - [j = pos(i)])).

    With E, ``E @ C`` is sigma * rq_i * dL/dq^_i and ``E^T @ Q`` is sigma * rc_j * dL/dc^_j: the
    inverse norms are folded in, so the raw embeddings feed the GEMMs. sigma (a power of two) puts
    max |E| in (1/2, 1], so half precision neither overflows nor flushes the gradient to zero.

    Programs go through the tiles in groups of GROUP_M query blocks, column by column, so the
    programs running at once read GROUP_M query blocks and a few candidate blocks (a GEMM's L2
    swizzle): in row-block order they would read every query block, at D = 4096 more than the L2
    cache holds, for each candidate block."""
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
    z = _dots(Q, stride_q, offs_m, row_in, C, stride_c, cols, col_in, D, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    p = _probabilities(_logits(z, rq * inv_tau, rc), LSE, offs_m, row_in)
    scale = rq[:, None] * rc[None, :] * inv_tau
    if IS_POS:
        # p_target - 1 = -(1 - p_target), kept exact by the forward (see _online_logsumexp).
        minus_tail = -tl.load(TAIL + offs_m, mask=row_in, other=0.0)
        p = tl.where(cols[None, :] == (offs_m + pos_offset)[:, None], minus_tail[:, None], p)
    e = (w * tl.load(SIGMA))[:, None] * p * scale
    tl.store(E + offs_m[:, None] * stride_e + offs_n[None, :], e.to(E.dtype.element_ty),
             mask=row_in[:, None] & col_in[None, :])


@triton.jit
def _max_of(X, N, BLOCK: tl.constexpr):
    """max(X[0 .. N]) of a float32 vector of non-negative entries, one program (0 when N = 0)."""
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.load(X + offs, mask=offs < N, other=0.0))
    return tl.max(top, 0)


@triton.jit
def _gradient_scale_kernel(W, RQ, RP, RN, QMAX, PMAX, NMAX, SIGMA, B, NP, NN, log2_tau,
                           HAS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """SIGMA[0] = 2^-ceil(log2(max_i |W_i| RQ_i * max_j RC_j / tau)) (1 when every W_i is 0),
    raised with HAS_MAX by 2^s, s = -ceil(log2(max entry of the embeddings)) within [0, 12]
    (QMAX, PMAX, NMAX: each row's largest |entry|); see ``_gradient_scale``. One program: the
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
    G, X, RX, SIGMA, OUT, stride_g, stride_x, stride_o, ROWS, D,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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
def _rowdot(A, stride_a, a_rows, C, stride_c, c_rows, row_in, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
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
    Q, P, NEG, RQ, RP, RN, Z, LSE, TAIL, LOSS,
    stride_q, stride_p, stride_n,
    B, K, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Z[i, 0] = positive logit, Z[i, 1 + k] = k-th own negative's logit; LSE [B, 2] over the row
    (see ``_probabilities``);
    TAIL = 1 - p_positive, summed from the negatives' side for precision; LOSS = -log p_positive."""
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
    log_sum = tl.log(l_i)
    tail = o_i / l_i
    tl.store(LSE + 2 * offs_m, m_i, mask=row_in)
    tl.store(LSE + 2 * offs_m + 1, log_sum, mask=row_in)
    tl.store(TAIL + offs_m, tail, mask=row_in)
    tl.store(LOSS + offs_m, _query_loss(m_i + log_sum, pos_logit, tail), mask=row_in)


@triton.jit
def _own_bwd_kernel(
    Q, P, NEG, RQ, RP, RN, Z, LSE, TAIL, W, DQ, DP, DN,
    stride_q, stride_p, stride_n,
    B, K, D, inv_tau, tau,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DO: tl.constexpr,
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
        dz = w * _probabilities(z, LSE, offs_m, row_in)
        c_hat = tl.load(NEG + rows[:, None] * stride_n + offs_d[None, :], mask=tile, other=0.0).to(tl.float32) * rc[:, None]
        g += dz[:, None] * c_hat
        dc = q_hat
        if NORMALIZE:
            along += dz * z * tau
            dc = q_hat - (z * tau)[:, None] * c_hat
        tl.store(DN + rows[:, None] * D + offs_d[None, :], ((dz * rc)[:, None] * dc).to(DN.dtype.element_ty), mask=tile)
    if NORMALIZE:
        g -= along[:, None] * q_hat
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (g * rq[:, None]).to(DQ.dtype.element_ty), mask=tile)


# --------------------------------------------------------------------------------------------
# Launch helpers and autograd
# --------------------------------------------------------------------------------------------


def _config(device: torch.device, dim: int, dtype: torch.dtype) -> dict:
    """Tiles and the device's SM count: small tiles under the interpreter; GEMM-like on a GPU
    (Triton's usual H100 matmul tiles for half precision; not yet tuned on a GPU)."""
    if device.type != "cuda":  # cache_bytes: nominal (the split rules are tested at an H100's figures)
        block_do = max(16, min(64, triton.next_power_of_2(dim)))
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, BLOCK_DO=block_do, BLOCK_N_FWD=16, BLOCK_ROWS=16,
                    OWN_ROWS=16, GROUP_M=2, num_warps=4, num_stages=1, sms=2, cache_bytes=16 << 10)
    block_do = max(16, min(256, triton.next_power_of_2(dim)))
    sms, cache_bytes = 132, 50 << 20  # an H100's, where no GPU is visible (compile checks on meta tensors)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        sms, cache_bytes = props.multi_processor_count, getattr(props, "L2_cache_size", cache_bytes)
    # BLOCK_ROWS, OWN_ROWS: rows of the row-wise kernels (projection, "own"), which hold float32
    # [rows, BLOCK_DO] tiles; at these sizes nothing spills on sm_90 (ptxas -v, D 64-4096).
    # GROUP_M: query blocks per group of the logit-gradient kernel's tiles (Triton's matmul swizzle).
    if dtype == torch.float32:  # "ieee" dots without tensor cores: 4-byte tiles, two stages
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DO=block_do, BLOCK_N_FWD=64, BLOCK_ROWS=16,
                    OWN_ROWS=32, GROUP_M=8, num_warps=8, num_stages=2, sms=sms, cache_bytes=cache_bytes)
    # The forward's tile, 128 x 128 like the logit gradients' (chosen without a GPU, from static
    # measures; sweep_infonce.py times it against 128 x 64, the earlier default): each warpgroup's
    # wgmma is then m64n128, which reads 96 bytes of shared memory per clock at the tensor cores'
    # rate where m64n64 needs all 128 the SM has, before the next stage's copies; and the query
    # block is re-read once per 128 candidates, not per 64. Its three running statistics beside the
    # tile take 255 registers with 8 bytes spilled, outside the loop over D (sass_loops.py).
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, BLOCK_DO=block_do, BLOCK_N_FWD=128, BLOCK_ROWS=32,
                OWN_ROWS=64, GROUP_M=8, num_warps=8, num_stages=3, sms=sms, cache_bytes=cache_bytes)


def _precision(dtype: torch.dtype) -> Optional[str]:
    return "ieee" if dtype == torch.float32 else None


def _row_norms(x: torch.Tensor, normalize: bool, want_max: bool, cfg: dict):
    """([rows] float32 1/max(|x|, 1e-12), [rows] float32 max |entry| or None) of x [rows, D], in one
    kernel that reads x in its own dtype: no float32 copy (4 bytes per element of x, transient, was
    the forward's peak)."""
    rows, dim = x.shape
    rx = _backend.new_output((rows,), torch.float32, x.device)
    amax = _backend.new_output((rows,), torch.float32, x.device) if want_max else None
    if rows:
        _row_norms_kernel[(triton.cdiv(rows, cfg["BLOCK_ROWS"]),)](
            x, rx, rx if amax is None else amax, x.stride(0), rows, dim, NORMALIZE=normalize, WANT_MAX=want_max,
            BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_D=cfg["BLOCK_DO"], num_warps=4,
        )
    return rx, amax


def _candidate_splits(row_blocks: int, candidates: int, block_n: int, sms: int, row_block_bytes: int,
                      cache_bytes: int) -> int:
    """Programs per query block in the forward (splits of the candidates), the most of:

    * occupancy: enough programs for two waves of the device's SMs;
    * locality: each program re-reads its query block (``row_block_bytes``, BLOCK_M x D) for every
      candidate tile, and the split varies fastest over the programs, so about sms / splits query
      blocks are in use at once; they should take at most a quarter of the L2 cache
      (``cache_bytes``), or every candidate tile costs a query block's worth of HBM traffic (at
      D = 4096 in bf16: 1 MiB per 67 MFLOP, about 210 TFLOP/s at the H100's 3.35 TB/s);

    but at most the number that leaves each program four candidate tiles."""
    most = max(1, triton.cdiv(candidates, 4 * block_n))
    occupancy = triton.cdiv(2 * sms, row_blocks)
    locality = triton.cdiv(sms, max(1, (cache_bytes // 4) // row_block_bytes))
    return max(1, min(most, max(occupancy, locality)))


def _forward_splits(batch: int, candidates: int, dim: int, elem: int, cfg: dict):
    """(splits, candidates per split, a multiple of the forward's tile) for ``_global_fwd_kernel``."""
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N_FWD"]
    splits = _candidate_splits(triton.cdiv(batch, block_m), candidates, block_n, cfg["sms"], block_m * dim * elem,
                               cfg["cache_bytes"])
    per_split = triton.cdiv(triton.cdiv(candidates, splits), block_n) * block_n
    return triton.cdiv(candidates, per_split), per_split


# The global backward's scratch: the logit gradients E (a workspace of candidate columns or query
# rows) and, in one of its modes, a float32 accumulator of dq. Its bytes stay within
# _SCRATCH_PER_LOGIT per element of the B x N logit matrix the loss never stores (eager holds about
# 12 bytes per logit at its peak: bf16 and float32 logits, log-softmax, gradient), or within
# _SCRATCH_FLOOR for problems too small to be worth splitting; E itself within _WORKSPACE_BYTES.
_SCRATCH_PER_LOGIT = 1
_SCRATCH_FLOOR = 1 << 20
_WORKSPACE_BYTES = 256 << 20
# Accumulating mode: candidate columns per chunk. 4096 keep the float32 accumulation of dq per chunk
# (12 bytes per element of dq) small beside the chunk's GEMM (2 x 4096 FLOP per element of dq);
# fewer than _MIN_CHUNK columns (or partial-product rows) are not worth an accumulator.
_CHUNK_COLUMNS = 4096
_MIN_CHUNK = 512


class _BackwardPlan(NamedTuple):
    """How the global backward computes E = sigma dz rq rc / tau and its two products.

    * "one-pass": E whole ([B, N], ``columns`` = N); dC = E^T Q per source, dq = E C.
    * "accumulate": E in chunks of ``columns`` candidates; per chunk dC = E^T Q and dq += E C into
      a float32 [B, D] accumulator, each half-precision partial product ``partial_rows`` rows at a
      time (its temporary is partial_rows x D).
    * "sweeps": no accumulator: E in chunks of ``columns`` candidates for dC (the column sweep),
      then re-computed in chunks of ``rows`` queries for dq = E C (the row sweep): one more logit
      GEMM than the other modes, no [B, D] float32 buffer. When only one side needs a gradient
      (frozen candidates, or a frozen query encoder), the other sweep is skipped (0) and no
      logit GEMM is repeated.
    """

    mode: str
    columns: int
    rows: int
    partial_rows: int
    workspace_elements: int  # of E: the largest chunk
    scratch_bytes: int  # workspace, accumulator and partial product together


def _backward_plan(batch: int, candidates: int, dim: int, elem: int, need_q: bool = True,
                   need_c: bool = True) -> _BackwardPlan:
    """The cheapest mode whose scratch fits the budget (see _SCRATCH_PER_LOGIT): one pass, else the
    float32 accumulator with chunks as large as fit, else sweeps; ``need_q`` / ``need_c``: whether
    dq / the candidates' gradients are wanted (at least one)."""
    budget = max(_SCRATCH_FLOOR, _SCRATCH_PER_LOGIT * batch * candidates)
    e_budget = min(budget, _WORKSPACE_BYTES)
    whole = batch * candidates
    if whole * elem <= e_budget:
        return _BackwardPlan("one-pass", candidates, batch, 0, whole, whole * elem)
    if not (need_q and need_c):  # one sweep along the side that is wanted
        return _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c)
    spare = budget - 4 * batch * dim  # after the accumulator
    most_columns = min(candidates, _CHUNK_COLUMNS, _WORKSPACE_BYTES // (batch * elem))
    least_partial = 0 if elem == 4 else min(batch, _MIN_CHUNK)  # float32 E: addmm_ into acc, no temporary
    if (batch * min(most_columns, _MIN_CHUNK) + least_partial * dim) * elem <= spare:
        # columns first (each chunk is a pass over the accumulator), the partial product the rest
        columns = min(most_columns, (spare - least_partial * dim * elem) // (batch * elem))
        partial = 0 if elem == 4 else min(batch, (spare - batch * columns * elem) // (dim * elem))
        return _BackwardPlan("accumulate", columns, 0, partial, batch * columns,
                             4 * batch * dim + (batch * columns + partial * dim) * elem)
    return _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c)


def _sweeps_plan(batch, candidates, elem, e_budget, need_q, need_c):
    """"sweeps": the largest chunks of E within ``e_budget`` bytes, by columns (dC) and rows (dq)."""
    columns = max(1, min(candidates, e_budget // (batch * elem))) if need_c else 0
    rows = max(1, min(batch, e_budget // (candidates * elem))) if need_q else 0
    workspace = max(batch * columns, rows * candidates)
    return _BackwardPlan("sweeps", columns, rows, 0, workspace, workspace * elem)


def _gradient_scale(w, rq, rp, rn, tau, maxima=None):
    """[1] float32 sigma = 2^-ceil(log2(max_i |w_i| rq_i * max_j rc_j / tau)), on the device (no host
    sync, one launch); 1 when every upstream gradient is 0. Computed in log space: the product may
    overflow. rc: the candidates' inverse norms ``rp`` and ``rn``.

    ``maxima`` (float16 inputs: each row's largest |entry| of q, pos and neg) raises sigma by a
    further 2^s, s = -ceil(log2(the largest of them)) within [0, 12]: the GEMM outputs E^T @ Q and
    E @ C have the embeddings' magnitude times E's, and with small embeddings (norms ~1e-3) they
    would fall into float16's subnormals (a 1% error); E stays below 2^12, far from float16's
    overflow."""
    sigma = _backend.new_output((1,), torch.float32, w.device)
    q_max, p_max, n_max = maxima if maxima is not None else (rq, rp, rn)
    _gradient_scale_kernel[(1,)](
        w, rq, rp, rn, q_max, p_max, n_max, sigma, w.shape[0], rp.shape[0], rn.shape[0], math.log2(tau),
        HAS_MAX=maxima is not None, BLOCK=1024, num_warps=8,
    )
    return sigma


def _project(g, x, rx, sigma, out, normalize, cfg):
    """``out = (g - (g . x^) x^) / sigma`` row-wise (see ``_unscale_project_kernel``)."""
    rows, dim = x.shape
    if rows:
        _unscale_project_kernel[(triton.cdiv(rows, cfg["BLOCK_ROWS"]),)](
            g, x, rx, sigma, out, g.stride(0), x.stride(0), out.stride(0), rows, dim,
            NORMALIZE=normalize, BLOCK_M=cfg["BLOCK_ROWS"], BLOCK_D=cfg["BLOCK_DO"], num_warps=4,
        )
    return out


def _global_forward(q, pos, neg, rq, rp, rn, tau, pos_offset, cfg):
    """(lse [B, 2], 1 - p_positive [B], loss [B]), float32, from per-split partial statistics."""
    batch, dim = q.shape
    candidates = pos.shape[0] + neg.shape[0]
    splits, per_split = _forward_splits(batch, candidates, dim, q.element_size(), cfg)
    m, l, o, pos_logit = (_backend.new_output((splits, batch), torch.float32, q.device) for _ in range(4))
    _global_fwd_kernel[(triton.cdiv(batch, cfg["BLOCK_M"]) * splits,)](
        q, pos, neg, rq, rp, rn, m, l, o, pos_logit, q.stride(0), pos.stride(0), neg.stride(0),
        batch, pos.shape[0], neg.shape[0], dim, pos_offset, 1.0 / tau, per_split, splits,
        PRECISION=_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N_FWD"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lse = _backend.new_output((batch, 2), torch.float32, q.device)
    tail, losses = (_backend.new_output((batch,), torch.float32, q.device) for _ in range(2))
    _combine_splits_kernel[(triton.cdiv(batch, cfg["BLOCK_ROWS"]),)](
        m, l, o, pos_logit, lse, tail, losses, batch, splits, BLOCK=cfg["BLOCK_ROWS"], num_warps=4,
    )
    return lse, tail, losses


def _logit_grads(q, rq, lse, tail, w, sigma, cand, rc, c0, e, is_pos, pos_offset, tau, cfg):
    """E [rows, nc] (a view of the workspace) for the queries ``q`` [rows, D] (with their rq, lse,
    tail, w) and candidates c0 .. c0 + nc of one source; see ``_global_dlogits_kernel``."""
    rows, nc = e.shape
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(nc, cfg["BLOCK_N"]),)
    _global_dlogits_kernel[grid](
        q, cand, rq, rc, lse, tail, w, sigma, e, q.stride(0), cand.stride(0), e.stride(0),
        rows, nc, q.shape[1], c0, pos_offset, 1.0 / tau, IS_POS=is_pos, PRECISION=_precision(q.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _query_grads(e, pos, neg, out):
    """out = E @ [pos; neg] for E [rows, NP + NN] (sigma rq dL/dq^ of those rows)."""
    n_pos = pos.shape[0]
    torch.mm(e[:, :n_pos], pos, out=out)
    if neg.shape[0]:
        out.addmm_(e[:, n_pos:], neg)


def _accumulate(acc, e, block, partial_rows):
    """acc += E @ block in float32; a half-precision product is rounded once per chunk, then summed
    in float32, ``partial_rows`` rows at a time (the size of its temporary)."""
    if e.dtype == torch.float32:
        acc.addmm_(e, block)
        return
    for r0 in range(0, e.shape[0], partial_rows):
        acc[r0 : r0 + partial_rows].add_(torch.mm(e[r0 : r0 + partial_rows], block))


def _global_backward(q, pos, neg, rq, rp, rn, lse, tail, w, tau, normalize, pos_offset, maxima, cfg,
                     needs=(True, True, True)):
    """(dq, dpos, dneg) in the inputs' dtype, None where ``needs`` (q, pos, neg) is False: E
    re-computed chunk by chunk (see ``_BackwardPlan``), dC = E^T @ Q and dq = E @ C as GEMMs
    (cuBLAS on a GPU), then the normalisation's gradient."""
    batch, dim = q.shape
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    need_q, need_pos, need_neg = needs
    sigma = _gradient_scale(w, rq, rp, rn, tau, maxima)
    dpos = _backend.new_output(tuple(pos.shape), pos.dtype, q.device) if need_pos else None
    dneg = _backend.new_output(tuple(neg.shape), neg.dtype, q.device) if need_neg else None
    gq = _backend.new_output((batch, dim), q.dtype, q.device) if need_q else None
    plan = _backward_plan(batch, n_pos + n_neg, dim, q.element_size(), need_q, need_pos or need_neg)
    workspace = _backend.new_output((plan.workspace_elements,), q.dtype, q.device)
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
            _logit_grads(q, rq, lse, tail, w, sigma, cand, rc, c0, e, is_pos, pos_offset, tau, cfg)
            if grad is not None:
                torch.mm(e.t(), q, out=grad[c0 : c0 + nc])  # sigma rc_j dL/dc^_j, rows c0 .. c0 + nc
            if acc is not None:
                _accumulate(acc, e, cand[c0 : c0 + nc], plan.partial_rows)
        if grad is not None and cand.shape[0]:
            _project(grad, cand, rc, sigma, grad, normalize, cfg)
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
                    _logit_grads(*rows, sigma, cand, rc, 0, e[:, first : first + cand.shape[0]], is_pos,
                                 pos_offset + r0, tau, cfg)
            _query_grads(e, pos, neg, gq[r0:r1])
    dq = _project(gq if acc is None else acc, q, rq, sigma, gq, normalize, cfg)
    return dq, dpos, dneg


_EMPTY = (0,)  # the shape of a tensor that stands for an absent one in the custom ops below


class _ForwardState(NamedTuple):
    """What the backward needs besides the inputs: O(B(1+K)) float32 statistics. ``logits``: own
    mode's [B, 1+K] logits (None in global mode); ``maxima``: float16 global mode's largest |entry|
    per row of q, pos and neg, for the gradient scale sigma (else None)."""

    rq: torch.Tensor
    rp: torch.Tensor
    rn: torch.Tensor
    lse: torch.Tensor  # [B, 2]: each row's largest logit and log(sum exp(z - it)); see _probabilities
    tail: torch.Tensor  # 1 - p_positive
    logits: Optional[torch.Tensor]
    maxima: Optional[tuple]

    def flat(self) -> list:
        """The nine tensors (rq, rp, rn, lse, tail, logits, q_max, p_max, n_max), absent ones as
        empty [0] float32 tensors (a custom op's outputs are tensors)."""
        def empty():
            return self.rq.new_empty(_EMPTY)

        maxima = self.maxima or (empty(), empty(), empty())
        return [*self[:5], empty() if self.logits is None else self.logits, *maxima]

    @classmethod
    def from_flat(cls, tensors) -> "_ForwardState":
        """The inverse of :meth:`flat`."""
        rq, rp, rn, lse, tail, logits, *maxima = tensors
        return cls(rq, rp, rn, lse, tail, logits if logits.numel() else None,
                   tuple(maxima) if maxima[0].numel() else None)


def _wants_maxima(dtype: torch.dtype, own: bool) -> bool:
    """Whether the forward keeps each row's largest |entry|: for the float16 global backward's
    gradient scale sigma."""
    return dtype == torch.float16 and not own


def _fused_forward(q, pos, neg, tau, normalize, own, pos_offset):
    """(per-query losses [B] float32, _ForwardState) from raw embeddings: q, pos [B or N, D], neg
    [N_neg, D] (own mode: [B * K, D], query i's negatives in rows i K .. i K + K - 1)."""
    batch, dim = q.shape
    cfg = _config(q.device, dim, q.dtype)
    want_max = _wants_maxima(q.dtype, own)
    (rq, q_max), (rp, p_max), (rn, n_max) = (_row_norms(t, normalize, want_max, cfg) for t in (q, pos, neg))
    maxima = (q_max, p_max, n_max) if want_max else None
    if not own:
        lse, tail, losses = _global_forward(q, pos, neg, rq, rp, rn, tau, pos_offset, cfg)
        return losses, _ForwardState(rq, rp, rn, lse, tail, None, maxima)
    k = neg.shape[0] // max(batch, 1)
    lse = _backend.new_output((batch, 2), torch.float32, q.device)
    tail, losses = (_backend.new_output((batch,), torch.float32, q.device) for _ in range(2))
    logits = _backend.new_output((batch, k + 1), torch.float32, q.device)  # own mode keeps them all
    _own_fwd_kernel[(triton.cdiv(batch, cfg["OWN_ROWS"]),)](
        q, pos, neg, rq, rp, rn, logits, lse, tail, losses, q.stride(0), pos.stride(0), neg.stride(0),
        batch, k, dim, 1.0 / tau, BLOCK_M=cfg["OWN_ROWS"], BLOCK_D=cfg["BLOCK_DO"], num_warps=cfg["num_warps"],
    )
    return losses, _ForwardState(rq, rp, rn, lse, tail, logits, None)


def _fused_backward(q, pos, neg, state, grad_losses, tau, normalize, pos_offset, needs):
    """(dq, dpos, dneg) in the inputs' dtype for the upstream gradient [B] of the per-query losses;
    in global mode None where ``needs`` (q, pos, neg) is False."""
    batch, dim = q.shape
    w = grad_losses.float().contiguous()
    cfg = _config(q.device, dim, q.dtype)
    rq, rp, rn, lse, tail, logits, maxima = state
    if logits is None:
        return _global_backward(q, pos, neg, rq, rp, rn, lse, tail, w, tau, normalize, pos_offset, maxima, cfg,
                                needs)
    k = logits.shape[1] - 1
    dq, dpos, dneg = (_backend.new_output(tuple(x.shape), x.dtype, x.device) for x in (q, pos, neg))
    # Elementwise work on several float32 tiles at once: half the rows of the GEMM-like
    # kernels (64 rows hit the 255-register cap and spilled on sm_90).
    rows = max(16, cfg["OWN_ROWS"] // 2)
    _own_bwd_kernel[(triton.cdiv(batch, rows), triton.cdiv(dim, cfg["BLOCK_DO"]))](
        q, pos, neg, rq, rp, rn, logits, lse, tail, w, dq, dpos, dneg, q.stride(0), pos.stride(0), neg.stride(0),
        batch, k, dim, 1.0 / tau, tau, NORMALIZE=normalize, BLOCK_M=rows,
        BLOCK_DO=cfg["BLOCK_DO"], num_warps=cfg["num_warps"],
    )
    return dq, dpos, dneg


class _InfoNCEFunction(torch.autograd.Function):
    """Per-query losses [B] float32 from raw embeddings; gradients to q, candidates' positives and negatives."""

    @staticmethod
    def forward(ctx, q, pos, neg, tau, normalize, own, pos_offset):
        losses, state = _fused_forward(q, pos, neg, tau, normalize, own, pos_offset)
        ctx.save_for_backward(q, pos, neg, *state[:5], state.logits)
        ctx.tau, ctx.normalize, ctx.pos_offset = tau, normalize, pos_offset
        ctx.maxima = state.maxima  # O(B(1+K)), not inputs: no need to save them
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        q, pos, neg, *statistics, logits = ctx.saved_tensors
        state = _ForwardState(*statistics, logits, ctx.maxima)
        grads = _fused_backward(q, pos, neg, state, grad_losses, ctx.tau, ctx.normalize, ctx.pos_offset,
                                ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


# --------------------------------------------------------------------------------------------
# torch.compile: the same kernels behind opaque custom ops (see attention.py); tensors that may be
# absent (own mode's logits, float16's maxima, gradients not asked for) are empty [0] tensors.
# --------------------------------------------------------------------------------------------

_FORWARD_OUTPUTS = tuple[(torch.Tensor,) * 10]  # the losses and _ForwardState's nine tensors


@torch.library.custom_op("mgh::infonce_forward", mutates_args=())
def _forward_op(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float, normalize: bool, own: bool,
                pos_offset: int) -> _FORWARD_OUTPUTS:
    """(losses, rq, rp, rn, lse, tail, logits, q_max, p_max, n_max): _fused_forward's, flat."""
    losses, state = _fused_forward(q, pos, neg, tau, normalize, own, pos_offset)
    return losses, *state.flat()


@_forward_op.register_fake
def _forward_op_shapes(q, pos, neg, tau, normalize, own, pos_offset):
    batch = q.shape[0]
    rows = (batch, batch, pos.shape[0], neg.shape[0], (batch, 2), batch)
    logits = (batch, neg.shape[0] // max(batch, 1) + 1) if own else _EMPTY
    maxima = (batch, pos.shape[0], neg.shape[0]) if _wants_maxima(q.dtype, own) else (_EMPTY,) * 3
    return tuple(q.new_empty(shape, dtype=torch.float32) for shape in (*rows, logits, *maxima))


@torch.library.custom_op("mgh::infonce_backward", mutates_args=())
def _backward_op(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, statistics: list[torch.Tensor],
                 grad_losses: torch.Tensor, tau: float, normalize: bool, pos_offset: int, needs: list[bool]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dpos, dneg), each empty [0] where ``needs`` is False; ``statistics``: _forward_op's
    outputs after the losses."""
    state = _ForwardState.from_flat(statistics)
    grads = _fused_backward(q, pos, neg, state, grad_losses, tau, normalize, pos_offset, tuple(needs))
    return tuple(g if need else x.new_empty(_EMPTY) for g, need, x in zip(grads, needs, (q, pos, neg)))


@_backward_op.register_fake
def _backward_op_shapes(q, pos, neg, statistics, grad_losses, tau, normalize, pos_offset, needs):
    return tuple(x.new_empty(x.shape if need else _EMPTY) for need, x in zip(needs, (q, pos, neg)))


def _save_for_backward_op(ctx, inputs, output):
    q, pos, neg, tau, normalize, _, pos_offset = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, pos, neg, *output[1:])
    ctx.tau, ctx.normalize, ctx.pos_offset = tau, normalize, pos_offset


def _forward_op_gradients(ctx, grad_losses, *_):
    q, pos, neg, *statistics = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = _backward_op(q, pos, neg, statistics, grad_losses, ctx.tau, ctx.normalize, ctx.pos_offset, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


_forward_op.register_autograd(_forward_op_gradients, setup_context=_save_for_backward_op)
_backend.register_autocast("mgh::infonce_forward", cast=(0, 1, 2))


# --------------------------------------------------------------------------------------------
# The PyTorch path (CPU without the interpreter, bfloat16 on CPU)
# --------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22  # logits per query chunk (16 MiB in float32)


def _chunk_losses(q_rows, pos, neg, tau, normalize, own, row_start):
    compute = torch.float64 if q_rows.dtype == torch.float64 else torch.float32

    def prep(x):
        x = x.to(compute)
        return F.normalize(x, dim=-1) if normalize else x

    qn, pn, nn_ = prep(q_rows), prep(pos), prep(neg)
    rows = torch.arange(row_start, row_start + q_rows.shape[0], device=q_rows.device)
    if own:
        k = nn_.shape[0] // pos.shape[0]
        cands = torch.cat([pn[rows, None], nn_.view(pos.shape[0], k, -1)[rows]], dim=1)
        logits = torch.einsum("bd,bcd->bc", qn, cands) / tau
        return torch.logsumexp(logits, dim=1) - logits[:, 0]
    logits = torch.cat([qn @ pn.T, qn @ nn_.T], dim=1) / tau
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(len(rows), device=rows.device), rows]


def _chunked_losses(q, pos, neg, tau, normalize, own, pos_offset):
    candidates = pos.shape[0] + (0 if own else neg.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, candidates))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, pos, neg))
    losses = []
    for start in range(0, q.shape[0], chunk):
        args = (q[start : start + chunk], pos, neg, tau, normalize, own, start + (0 if own else pos_offset))
        if grad:  # re-compute the chunk's logits in backward instead of storing them
            losses.append(torch.utils.checkpoint.checkpoint(_chunk_losses, *args, use_reentrant=False))
        else:
            losses.append(_chunk_losses(*args))
    out = torch.cat(losses)
    return out if out.dtype == torch.float64 else out.float()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _gather(pos: torch.Tensor, neg: torch.Tensor, batch: int):
    """All ranks' positives and negatives (with gradient) and this rank's positive offset."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather: expected an initialised torch.distributed process group, found none")
    # torch 2.13 marks this differentiable all_gather deprecated in favour of a private module;
    # sentence-transformers' gather_across_devices uses the same public call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(all_gather(pos)), torch.cat(all_gather(neg)), dist.get_rank() * batch


def infonce_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.05,
    negatives: str = "global",
    normalize: bool = True,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE with in-batch and hard negatives, never storing the B x B(1+K) logits.

    Args:
        q: [B, D] queries; float16, bfloat16 or float32 (float32 accumulation). Under
            ``torch.autocast`` for their device type, q, pos and neg are cast once to the
            autocast dtype, as autocast casts the inputs of the matmul that computes
            sentence-transformers' MultipleNegativesRankingLoss's similarities; the loss itself is
            float32 there as well (autocast runs cross-entropy in float32).
        pos: [B, D] positives, ``pos[i]`` the target of ``q[i]``.
        neg: optional [B, K, D] hard negatives (K may be 0).
        tau: temperature (logit = cosine / tau; 0.05 is sentence-transformers' scale 20).
        negatives: "global" (every positive and negative of the batch is a candidate of every
            query, MultipleNegativesRankingLoss) or "own" (the query's positive and K negatives).
        normalize: L2-normalise the embeddings (cosine similarity); False uses raw dot products.
        reduction: "mean", "sum" or "none" (per-query losses [B]).
        gather: with "global", make every rank's positives and negatives candidates (needs an
            initialised ``torch.distributed`` group and the same B on every rank); the loss is
            over this rank's queries.

    Returns:
        float32 loss (scalar, or [B] with ``reduction="none"``).

    Values are not checked (that would synchronise with the host on every call): a NaN or
    infinite embedding gives a NaN loss. mgh's trainer stops at a non-finite loss, before the
    optimizer step, and names the first parameter or layer output that went non-finite.
    """
    global _last_backend
    amp = _backend.autocast_dtype(q)
    tau = check_infonce_args(q, pos, neg, tau=tau, negatives=negatives, reduction=reduction, amp=amp)
    batch, dim = q.shape
    if neg is None:
        neg = q.new_zeros(batch, 0, dim)
    for name, flag in (("normalize", normalize), ("gather", gather)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected True or False, got {flag!r}")
    if gather and negatives != "global":
        raise ValueError("gather: only meaningful with negatives='global' (own candidates are per query)")

    dtype = _backend.cast_dtype(q, amp)
    backend = _backend.select(q, dtype)
    _backend.check_kernel_dtype("q", dtype, q.device, backend)
    _last_backend = backend
    compiling = torch.compiler.is_compiling()
    if not compiling:  # a logging call is a graph break
        logger.debug("infonce_loss: %s path for B=%d K=%d D=%d %s", backend, batch, neg.shape[1], dim, dtype)

    if not (compiling and backend != _backend.CHUNKED):  # compiled, the op's autocast rule casts
        q, pos, neg = _backend.autocast_inputs(amp, q, pos, neg)
    q = q.contiguous()
    pos, neg_flat = pos.contiguous(), neg.reshape(-1, dim).contiguous()
    pos_offset = 0
    if gather:
        pos, neg_flat, pos_offset = _gather(pos, neg_flat, batch)
    own = negatives == "own"
    if backend != _backend.CHUNKED and compiling:
        losses = _forward_op(q, pos, neg_flat, tau, normalize, own, pos_offset)[0]
    else:
        with _backend.autocast_off(q.device):
            if backend == _backend.CHUNKED:
                losses = _chunked_losses(q, pos, neg_flat, tau, normalize, own, pos_offset)
            else:
                losses = _InfoNCEFunction.apply(q, pos, neg_flat, tau, normalize, own, pos_offset)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


class InfoNCELoss(torch.nn.Module):
    """``infonce_loss`` as a module: ``InfoNCELoss(tau=0.05)(q, pos, neg)``; arguments as there."""

    def __init__(self, tau: float = 0.05, negatives: str = "global", normalize: bool = True,
                 reduction: str = "mean", gather: bool = False):
        super().__init__()
        check_positive("tau", tau)
        check_choice("negatives", negatives, NEGATIVE_MODES)
        check_choice("reduction", reduction, REDUCTIONS)
        self.tau, self.negatives, self.normalize, self.reduction, self.gather = tau, negatives, normalize, reduction, gather

    def forward(self, q: torch.Tensor, pos: torch.Tensor, neg: Optional[torch.Tensor] = None) -> torch.Tensor:
        return infonce_loss(q, pos, neg, tau=self.tau, negatives=self.negatives, normalize=self.normalize,
                            reduction=self.reduction, gather=self.gather)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, negatives={self.negatives!r}, normalize={self.normalize}, reduction={self.reduction!r}"
