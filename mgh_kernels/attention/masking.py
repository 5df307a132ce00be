"""Triton helpers every attention kernel shares: the key padding mask, bounds, the causal mask,
and the bounded loads and stores of [rows, head dim] tiles.

Conventions of all the attention kernels:

* Tiles: queries [BLOCK_M, BLOCK_D], keys and values [BLOCK_N, BLOCK_D]; BLOCK_D is the head dim
  padded to a power of two, the padding loaded as zeros.
* Scores are kept in log2 units (``qk_scale = scale * log2(e)``), and so is the saved log-sum-exp.
  Padded queries get lse = +inf, which makes every probability re-computed from it exactly 0.
* ``MASK``, the key padding mask, is an additive float32 bias [B, L]: 0 for a real token, -inf
  for padding. Added to a key tile's scaled scores it masks them with one FFMA per score, where a
  boolean mask costs a load, a compare and a select.
* Each program owns its outputs: results are deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._precision import dot_precision


@triton.jit
def query_program(H, GROUP, L, BLOCK_M: tl.constexpr):
    """A program over query block ``program_id(0)`` of sequence and head ``program_id(1)`` (b * H + h):
    (b * H + h, b, h, its kv head, offs_m [BLOCK_M], offs_m < L)."""
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, pid_bh // H, h, h // GROUP, offs_m, offs_m < L


@triton.jit
def key_program(HKV, L, BLOCK_N: tl.constexpr):
    """A program over key block ``program_id(0)`` of sequence and kv head ``program_id(1)``
    (b * HKV + hk): (b * HKV + hk, b, hk, offs_n [BLOCK_N], offs_n < L)."""
    pid_bk = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_bk, pid_bk // HKV, pid_bk % HKV, offs_n, offs_n < L


@triton.jit
def keys_seen(L, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The end of the keys query block ``program_id(0)`` attends to: L, or causal, its last query + 1."""
    hi = L
    if CAUSAL:
        hi = tl.minimum(L, (tl.program_id(0) + 1) * BLOCK_M)
    return hi


@triton.jit
def load_valid(mask_ptr, stride_mn, offs, in_range, HAS_MASK: tl.constexpr):
    """[len(offs)] bool: within range and, with a mask, a real token (bias 0)."""
    if HAS_MASK:
        return (tl.load(mask_ptr + offs * stride_mn, mask=in_range, other=float("-inf")) == 0) & in_range
    return in_range


@triton.jit
def zero_above_diagonal(p, offs_m, offs_n, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] probabilities p with the keys after each query zeroed when CAUSAL."""
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    return p


@triton.jit
def within(offs, n, BOUNDED: tl.constexpr):
    """offs < n, or a constant True where the caller knows the whole tile is within n (the
    compiler then drops the load's predicates: no bound checks in the hot loop)."""
    if BOUNDED:
        return offs < n
    return tl.full(offs.shape, True, tl.int1)


@triton.jit
def key_bias(mask_ptr, stride_mn, offs_n, L, HAS_MASK: tl.constexpr, BOUNDED: tl.constexpr):
    """[BLOCK_N] float32: 0 for a key within L (and valid under the mask), -inf otherwise: the
    mask's bias as loaded."""
    if HAS_MASK:
        return tl.load(mask_ptr + offs_n * stride_mn, mask=within(offs_n, L, BOUNDED), other=float("-inf"))
    return tl.where(within(offs_n, L, BOUNDED), 0.0, float("-inf"))


@triton.jit
def load_rows(ptr, offs, offs_d, stride_row, stride_d, rows_in, d_in):
    """[len(offs), BLOCK_D] tile of the [L, D] matrix at ``ptr`` (one sequence and head): rows
    ``offs``, columns ``offs_d``; zero where ``rows_in`` or ``d_in`` is False."""
    return tl.load(
        ptr + offs[:, None] * stride_row + offs_d[None, :] * stride_d, mask=rows_in[:, None] & d_in[None, :], other=0.0
    )


@triton.jit
def load_transposed(ptr, offs, offs_d, stride_row, stride_d, rows_in, d_in):
    """The tile of :func:`load_rows` loaded transposed, [BLOCK_D, len(offs)] (for ``q @ k^T``)."""
    return tl.load(
        ptr + offs[None, :] * stride_row + offs_d[:, None] * stride_d, mask=rows_in[None, :] & d_in[:, None], other=0.0
    )


@triton.jit
def store_rows(ptr, value, offs, offs_d, D, rows_in, d_in):
    """Store the [len(offs), BLOCK_D] tile ``value`` into the contiguous [L, D] matrix at ``ptr``,
    converted to its dtype, where ``rows_in`` and ``d_in``."""
    tl.store(
        ptr + offs[:, None] * D + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=rows_in[:, None] & d_in[None, :]
    )


@triton.jit
def recomputed_probabilities(q, kt, bias, lse, offs_m, offs_n, qk_scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] softmax probabilities of queries ``q`` over the keys ``kt`` (transposed),
    re-computed from the rows' log-sum-exp ``lse`` (log2 units) and the keys' ``bias``."""
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale + bias[None, :]
    return zero_above_diagonal(tl.exp2(s - lse[:, None]), offs_m, offs_n, CAUSAL)


# ---- host side: the arguments every attention launch passes ---------------------------------


def strides(t):
    """The four strides of a [B, H, L, D] tensor."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def mask_args(q, bias):
    """The key bias pointer and its strides (any tensor and zero strides without a mask)."""
    return (bias, bias.stride(0), bias.stride(1)) if bias is not None else (q, 0, 0)


def constexprs(q, bias, causal: bool, cfg: dict, **more) -> dict:
    """The keyword arguments of an attention launch: the constexpr flags every kernel takes, the
    tiles ``cfg`` and ``more`` (e.g. EVEN_D)."""
    return dict(HAS_MASK=bias is not None, CAUSAL=causal, PRECISION=dot_precision(q.dtype), **cfg, **more)
