"""The cuDNN gate: where PyTorch's cuDNN attention replaces our flash pass in the forward.

PyTorch's private op ``aten::_scaled_dot_product_cudnn_attention`` returns the log-sum-exp beside
the output, which is all the column-sum pass needs, and cuDNN's forward is faster than our Triton
flash pass (``benchmarks/RESULTS.md``). It is taken where three conditions hold:

* ours (:func:`eligible`): ``FLASH_PASS == "cudnn"``, half precision, and no key padding mask
  (padded queries need our conventions: zero output, lse = +inf; a mask that pads nothing is
  dropped before this point);
* PyTorch's (:func:`accepts`): its own gate for cuDNN attention (CUDA, cuDNN attention enabled,
  the shape, head dim and layout; GQA only where the gate takes it);
* cuDNN's: the call does not raise. A refusal is logged once and remembered per input signature
  (``REFUSED``); the Triton pass takes those inputs from then on.

Caveat: the op is private to PyTorch; its signature is the one of torch 2.4-2.13.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["FLASH_PASS", "REFUSED", "accepts", "attention", "eligible", "flash_pass"]

logger = logging.getLogger(__name__)

FLASH_PASS = "cudnn"
"""The forward's flash pass where the gate lets cuDNN's through: "cudnn", or "triton" for our own
Triton pass everywhere (the benchmarks time both)."""

REFUSED: set = set()
"""Input signatures (shapes, strides, dtype, device, causal) cuDNN raised on; cleared, it is asked again."""


def eligible(q: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Our own conditions for cuDNN's flash pass: ``FLASH_PASS``, half precision, no padding."""
    return FLASH_PASS == "cudnn" and bias is None and q.dtype in (torch.float16, torch.bfloat16)


def accepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """PyTorch's own gate for its cuDNN attention: CUDA tensors, cuDNN attention enabled, this
    shape, head dim and layout; kv heads fewer than query heads only where the gate takes GQA (it
    then hands K and V to cuDNN unrepeated, as SDPA does; older PyTorch refuses them); not under
    ``torch.use_deterministic_algorithms``."""
    cuda = torch.backends.cuda
    if not (
        q.is_cuda
        and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
        and hasattr(cuda, "can_use_cudnn_attention")
    ):
        return False
    gqa = q.shape[1] != k.shape[1]
    try:
        params = cuda.SDPAParams(q, k, v, None, 0.0, causal, gqa)
    except TypeError:  # PyTorch before enable_gqa: six arguments, no GQA
        if gqa:
            return False
        params = cuda.SDPAParams(q, k, v, None, 0.0, causal)
    return cuda.cudnn_sdp_enabled() and cuda.can_use_cudnn_attention(params, False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """PyTorch's cuDNN attention forward with its log-sum-exp: out [B, Hq, L, D] in q's dtype (any
    strides) and lse, natural log, float32, [B, Hq, L] (or [B, Hq, L, 1])."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q,
        k,
        v,
        None,
        True,
        0.0,
        causal,
        False,
        scale=scale,
    )
    return result[0], result[1]


def flash_pass(q, k, v, bias, causal: bool, scale: float):
    """(out, lse) from cuDNN (lse in natural-log units, as cuDNN gives it), or None where any of the
    three conditions fails. Out of memory and device errors are raised, not taken for a refusal."""
    if not (eligible(q, bias) and accepts(q, k, v, causal)):
        return None
    signature = tuple((tuple(t.shape), tuple(t.stride())) for t in (q, k, v)) + (q.dtype, q.device, causal)
    if signature in REFUSED:
        return None
    try:
        return attention(q, k, v, causal, scale)
    except (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError)):
        raise
    except RuntimeError as err:
        REFUSED.add(signature)
        logger.warning(
            "ata_attention: cuDNN's attention refused %s %s causal=%s (%s); using the Triton "
            "flash pass for these inputs",
            list(q.shape),
            q.dtype,
            causal,
            " ".join(str(err).split()),
        )
        return None
