"""Triton helpers the InfoNCE forward and backward kernels share: dot products over the whole of
D, logits, and probabilities from a saved log-sum-exp.

Written once so that the backward's re-computation rounds every logit exactly as the forward did:
a logit rounded differently (by a few ulps of up to 1 / tau) would make a dominant probability
exp(z - lse) miss 1 by as much, where PyTorch's, computed from the very logits of its lse, is
exact to float32.

Conventions of the InfoNCE kernels: embeddings X [rows, D] row-major with a row stride, read in
their own dtype; inverse norms RX [rows] float32; ``inv_tau`` = 1 / tau.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dots(
    A,
    stride_a,
    offs_a,
    a_in,
    C,
    stride_c,
    offs_c,
    c_in,
    D,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
def logits(dot_products, rq_over_tau, rc):
    """Logits from raw dot products [BLOCK_M, BLOCK_N], ``rq / tau`` per row and ``rc`` per column."""
    return dot_products * rq_over_tau[:, None] * rc[None, :]


@triton.jit
def probabilities(z, LSE, offs_m, row_in):
    """Softmax probabilities of logits z ([BLOCK_M, N] or [BLOCK_M]) from their rows' log-sum-exp,
    kept as LSE [B, 2]: the row's largest logit m and log(sum exp(z - m)). p = exp((z - m) - log_sum)
    never rounds the log-sum-exp at the logits' magnitude (up to 1 / tau), so a dominant
    probability is exact to float32 as in PyTorch's log-softmax, where exp(z - lse) would miss it by
    an ulp of 1 / tau."""
    top = tl.load(LSE + 2 * offs_m, mask=row_in, other=0.0)
    log_sum = tl.load(LSE + 2 * offs_m + 1, mask=row_in, other=0.0)
    if len(z.shape) == 2:
        return tl.exp((z - top[:, None]) - log_sum[:, None])
    return tl.exp((z - top) - log_sum)
