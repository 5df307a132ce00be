"""``ata_attention``'s PyTorch path: where the Triton kernels do not run (CPU without the
interpreter, bfloat16 on the CPU, machines without triton, or ``use_backend("torch")``).

On the CPU (outside torch.compile) this is ``cpu_flash.py``: a one-sweep forward and PyTorch's
flash backward. Elsewhere (a GPU without triton, or while compiling), below:
one sequence and a block of its queries at a time (at most ``backend.chunk_elements()`` scores),
all heads of the block together; under autograd each block runs under activation checkpointing,
so backward re-computes its probabilities instead of storing them. Memory: one block's scores,
never L x L for the whole batch. Arithmetic in float32 (float64 for float64 inputs), as in
``reference.attention_with_colsum``.
"""

from __future__ import annotations

import torch

from .. import backend
from .._precision import compute_dtype
from . import cpu_flash


def _attend_rows(q_rows, k_b, v_b, valid_b, row_start, causal, scale):
    """One sequence, a block of query rows. q_rows [Hkv, G, C, D]; k_b, v_b [Hkv, L, D]; valid_b [L].

    Returns out [Hkv, G, C, D] and the block's colsum contribution [L], summed over heads.
    """
    compute = compute_dtype(q_rows.dtype)
    length = k_b.shape[1]
    rows = row_start + torch.arange(q_rows.shape[2], device=q_rows.device)
    scores = torch.matmul(q_rows.to(compute), k_b.to(compute).transpose(-1, -2)[:, None]) * scale
    allowed = valid_b[None, :].expand(rows.shape[0], length)
    if causal:
        allowed = allowed & (rows[:, None] >= torch.arange(length, device=q_rows.device)[None, :])
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padded rows: finite, zeroed below
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.where(valid_b[rows][:, None], probs, 0.0)  # where, not a product: NaN in a padded row's gradient
    out = torch.matmul(probs, v_b.to(compute)[:, None])
    return out.to(q_rows.dtype), probs.sum(dim=(0, 1, 2))


def attention(q, k, v, mask, causal: bool, scale: float, return_colsum: bool):
    """(out [B, Hq, L, D] in q's dtype, colsum [B, L] float32 (float64 for float64 inputs) or None);
    ``mask`` the [B, L] bool key padding mask or None. Padded positions of q, k and v are read as
    zeros, so whatever they hold (transformers leaves anything there: NaN, inf) cannot reach a real
    position's outputs or gradients."""
    if mask is not None:
        q, k, v = (torch.where(mask[:, None, :, None], t, 0.0) for t in (q, k, v))
    if cpu_flash.supports(q) and not torch.compiler.is_compiling():
        return cpu_flash.attention(q, k, v, mask, causal, scale, return_colsum)
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    chunk = max(1, backend.chunk_elements() // max(1, hq * length))
    valid = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=q.device)
    outs, colsums = [], []
    for b in range(batch):
        q_b = q[b].view(hkv, hq // hkv, length, dim)
        blocks = [
            (q_b[:, :, start : start + chunk], k[b], v[b], valid[b], start, causal, scale)
            for start in range(0, length, chunk)
        ]
        results = backend.chunked(_attend_rows, blocks, (q, k, v))
        outs.append(torch.cat([out for out, _ in results], dim=2).reshape(hq, length, dim))
        col = results[0][1]
        for _, more in results[1:]:
            col = col + more
        colsums.append(col / hq)
    out = torch.where(valid[:, None, :, None], torch.stack(outs), 0.0)  # no gradient from padded rows
    if not return_colsum:
        return out, None
    colsum = torch.where(valid, torch.stack(colsums), 0.0)  # no gradient from padded keys, whatever it holds
    return out, colsum if colsum.dtype == torch.float64 else colsum.to(torch.float32)
