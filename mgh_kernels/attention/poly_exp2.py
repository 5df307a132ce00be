"""Experimental: 2**x by a polynomial on the FMA units, for a share of the column-sum pass's
exponentials.

Status: off by default (``tiles.colsum_tiles`` sets ``FMA_EXP=0``) until a GPU measurement
chooses it; ``benchmarks/sweep_attention.py --parts colsum`` times the shares beside the default,
and ``benchmarks/RESULTS.md`` holds the static counts that motivate it.

Why: the column-sum pass issues one exponential per score on the exponential unit (MUFU), which
at head dim 128 takes about as long as the tile's QK^T, while the loop's issue slots are far from
full. A degree-3 polynomial computes 2**x with about eight FMA-unit instructions in those idle
slots (the idea of FlashAttention-4). ``exp2_shared`` takes a quarter or a half of a tile's
exponentials from it, split along a pattern each thread's registers already hold in the tensor
cores' accumulator layouts, so no data moves.

Caveats: relative error 1.0e-4 (under float16's half ulp of 4.9e-4 and bfloat16's 3.9e-3): for half
precision only. Inputs above 127 give garbage (inf, NaN or negative), so callers must select such
elements away with ``where``, never multiply them.
"""

from __future__ import annotations

import triton
import triton.language as tl

EXP2_POLY = (0.6932829022407532, 0.2422109693288803, 0.05500893294811249)
"""2**f on [-0.5, 0.5] with p(0) = 1, coefficients of f, f**2, f**3: the degree-3 fit of least
maximum relative error (1.0e-4)."""
_EXP2_C1, _EXP2_C2, _EXP2_C3 = (tl.constexpr(c) for c in EXP2_POLY)


@triton.jit
def exp2_fma(x):
    """2**x for float32 x <= 127 on the FMA and integer units, relative error 1.0e-4 down to -126;
    x <= -127 (-inf included) gives exactly 0, as the MUFU does for -inf, and (-127, -126) a value
    under 2**-126; NaN stays NaN.

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
def exp2_shared(x, FMA_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """2**x [BLOCK_M, BLOCK_N] with 1 / FMA_EXP of it by ``exp2_fma`` (FMA_EXP 2: the odd columns;
    4: the odd columns of rows 8-15 of every 16; 0: none), the rest by the exponential unit. A
    thread of the tensor cores' accumulator layouts owns column pairs 2c, 2c + 1 and rows r, r + 8:
    each split is one its registers already hold."""
    tl.static_assert(FMA_EXP == 0 or FMA_EXP == 2 or FMA_EXP == 4, "FMA_EXP: expected 0, 2 or 4")
    tl.static_assert(FMA_EXP == 0 or (BLOCK_M % 16 == 0 and BLOCK_N % 2 == 0),
                     "FMA_EXP: needs BLOCK_M a multiple of 16 and BLOCK_N even")
    if FMA_EXP == 0:
        p = tl.exp2(x)
    else:
        even, odd = _column_pairs(x, BLOCK_M, BLOCK_N)
        if FMA_EXP == 2:
            odd = exp2_fma(odd)
        else:
            upper, lower = _row_halves(odd, BLOCK_M, BLOCK_N // 2)
            odd = _from_row_halves(tl.exp2(upper), exp2_fma(lower), BLOCK_M, BLOCK_N // 2)
        p = _from_column_pairs(tl.exp2(even), odd, BLOCK_M, BLOCK_N)
    return p
