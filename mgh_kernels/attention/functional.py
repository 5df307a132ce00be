"""``ata_attention``, the public function: its argument checks, the choice of path, autocast.

The path (``mgh_kernels.backend``): the Triton kernels on CUDA, Triton's interpreter on CPU under
``TRITON_INTERPRET=1``, the PyTorch path otherwise. Eager calls run the kernels through
``ops.ATAAttentionFunction``; while torch.compile traces a call, through the custom op
``mgh::ata_attention_forward`` (whose registered autocast rule then casts the inputs).
"""

from __future__ import annotations

import logging

import torch

from .. import backend
from .._precision import autocast_dtype, autocast_inputs, autocast_off
from .._validation import check_attention_args, check_bool
from . import ops, torch_path

__all__ = ["MAX_HEAD_DIM", "ata_attention", "last_backend", "last_forward"]

logger = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
"""The largest head dim the kernels take (one tile of the head dim)."""


def last_backend() -> str | None:
    """Which path the latest ``ata_attention`` call took: "triton", "triton-interpreter" or
    "torch-chunked" (None before the first call)."""
    return ops.LAST.backend


def last_forward() -> str | None:
    """Which forward the latest kernel call took: "one-sweep" (``forward._fwd_short_kernel``),
    "triton-flash" (``forward._fwd_kernel``) or "cudnn-flash" (PyTorch's cuDNN attention), the two
    flash passes followed by the column-sum pass when the column sums are asked for; None before the
    first call and after a call on the "torch-chunked" path."""
    return ops.LAST.forward


def ata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_colsum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention that also returns each key's received attention, never storing L x L.

    ``out`` is ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
    enable_gqa=True)`` with the padding mask applied to the keys (and zero rows at padded queries);
    ``colsum`` is what ``output_attentions=True`` probabilities summed over queries and averaged over
    heads would give (``reference.attention_with_colsum`` defines both).

    Args:
        q: [B, Hq, L, D] queries; float16, bfloat16 or float32 on CUDA (float32 accumulation),
            any float dtype on CPU. Head dims up to 256, any L.
        k, v: [B, Hkv, L, D], same dtype and device; ``Hq`` a multiple of ``Hkv`` (GQA, handled in
            the kernel without repeating K/V). Under ``torch.autocast`` for their device type the
            three may differ in dtype (rotary embedding leaves q and k float32 beside a bfloat16
            v): as for PyTorch's SDPA, they are cast once to the autocast dtype, which ``out``
            then has.
        causal: query i sees keys j <= i; otherwise all keys.
        key_padding_mask: [B, L] bool or 0/1, True = real token (left or right padding).
        scale: softmax scale, default 1/sqrt(D).
        return_colsum: also compute the column sums (skip them for plain attention).

    Returns:
        ``out`` [B, Hq, L, D] in ``q.dtype`` (the autocast dtype under autocast; zero at padded
        queries) and ``colsum`` [B, L] float32 (sum over valid queries of the probabilities,
        averaged over heads; zero at padded keys), or ``None`` when ``return_colsum`` is False.
        Differentiable through both.

    Example::

        q = torch.randn(2, 8, 100, 64)                                   # [B, Hq, L, D]
        k, v = torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)    # 2 kv heads
        mask = torch.ones(2, 100, dtype=torch.bool)
        mask[1, :30] = False                                             # left padding
        out, colsum = ata_attention(q, k, v, causal=True, key_padding_mask=mask)
        # out [2, 8, 100, 64], colsum [2, 100]; colsum[1].sum() == 70 (one unit per real query)

    Values are not checked (that would synchronise with the host on every call): NaN or infinity
    in ``q``, ``k`` or ``v`` gives NaN in the outputs of the rows it reaches. Padded positions
    are read as zeros on every path, so whatever they hold (NaN, inf) reaches no real position's
    outputs or gradients. mgh's trainer stops
    at a non-finite loss and names the first parameter or layer output that went non-finite.
    """
    amp = autocast_dtype(q)
    mask, scale = check_attention_args(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, amp=amp)
    check_bool("return_colsum", return_colsum)
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim D <= {MAX_HEAD_DIM}, got shape {list(q.shape)}")
    if q.numel() == 0:
        raise ValueError(f"q: expected a non-empty tensor, got shape {list(q.shape)}")
    path = backend.dispatch("ata_attention", q, amp, ops.LAST, logger, lambda: str(list(q.shape)))
    if path.backend != backend.TORCH and path.compiling:
        # the custom op's registered autocast rule casts q, k and v, as autocast does for SDPA
        bias = ops.key_bias(mask, drop_unpadded=False)  # compiled: no host sync
        out, colsum, _ = ops.forward_op(q, k, v, bias, causal, scale, return_colsum)
        return out, (colsum if return_colsum else None)
    q, k, v = autocast_inputs(amp, q, k, v)
    with autocast_off(q.device):
        if path.backend == backend.TORCH:
            ops.LAST.forward = None
            return torch_path.attention(q, k, v, mask, causal, scale, return_colsum)
        bias = ops.key_bias(mask, drop_unpadded=True)
        out, colsum = ops.ATAAttentionFunction.apply(q, k, v, bias, causal, scale, return_colsum)
    return out, (colsum if return_colsum else None)
