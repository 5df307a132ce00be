"""``infonce_loss``'s PyTorch path: where the Triton kernels do not run (CPU without the
interpreter, bfloat16 on the CPU, machines without triton, or ``use_backend("torch")``).

A chunk of queries at a time (at most ``backend.chunk_elements()`` logits): memory is one chunk of
logits, never B x N. A mean or sum over every candidate of the batch (``loss``) makes its
gradients in the forward, chunk by chunk (the softmax minus the target, times the candidates and
the queries: the two GEMMs autograd's backward would run), and backward only scales them, so it
costs what the eager loss costs, without its B x N logits. Per-query losses (``losses``) run each
chunk under activation checkpointing when a gradient will be taken, so backward re-computes its
logits. Arithmetic in float32 (float64 for float64 inputs), as in ``reference.infonce``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from .._precision import compute_dtype


def _chunk_losses(q_rows, pos, neg, tau, normalize, own, row_start):
    """Losses [C] of the queries ``q_rows``, rows row_start .. of the batch (their positives are
    pos[row_start ..]); neg [rows, D] flat, query i's own negatives in rows i K .. (own)."""
    compute = compute_dtype(q_rows.dtype)

    def prep(x):
        x = x.to(compute)
        return F.normalize(x, dim=-1) if normalize else x

    qn, pn, nn_ = prep(q_rows), prep(pos), prep(neg)
    rows = torch.arange(row_start, row_start + q_rows.shape[0], device=q_rows.device)
    if own:
        per_query = nn_.view(pos.shape[0], nn_.shape[0] // pos.shape[0], -1)[rows]
        logits, target = torch.einsum("bd,bcd->bc", qn, torch.cat([pn[rows, None], per_query], dim=1)) / tau, 0 * rows
    else:
        logits, target = torch.cat([qn @ pn.T, qn @ nn_.T], dim=1) / tau, rows
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(len(rows), device=rows.device), target]


def losses(q, pos, neg, tau: float, normalize: bool, own: bool, pos_offset: int):
    """Per-query losses [B] float32 (float64 for float64 inputs) of raw embeddings, arguments as
    ``ops.InfoNCEFunction``'s."""
    candidates = pos.shape[0] + (0 if own else neg.shape[0])
    chunk = max(1, backend.chunk_elements() // max(1, candidates))
    chunks = [(q[start : start + chunk], pos, neg, tau, normalize, own, start + (0 if own else pos_offset))
              for start in range(0, q.shape[0], chunk)]
    out = torch.cat(backend.chunked(_chunk_losses, chunks, (q, pos, neg)))
    return out if out.dtype == torch.float64 else out.float()


class _GlobalLossFunction(torch.autograd.Function):
    """Sum over queries of -log softmax(qn_i . cands / tau)[offset + i] for normalised qn [B, D] and
    cands [N, D]; the gradients with respect to both are made in forward when ``grad``."""

    @staticmethod
    def forward(ctx, qn, cands, tau, offset, grad):
        batch, count = qn.shape[0], cands.shape[0]
        rows = max(1, min(batch, backend.chunk_elements() // max(1, count)))
        dq = torch.empty_like(qn) if grad else None
        dc = torch.zeros_like(cands) if grad else None
        total = qn.new_zeros(())
        for start in range(0, batch, rows):
            stop = min(batch, start + rows)
            logits = torch.mm(qn[start:stop], cands.T).div_(tau)
            at = torch.arange(stop - start, device=qn.device)
            target = at + start + offset
            lse = torch.logsumexp(logits, dim=1)
            total = total + (lse - logits[at, target]).sum()
            if grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, then minus the one-hot target
                p[at, target] -= 1.0
                torch.mm(p, cands, out=dq[start:stop]).div_(tau)
                dc.addmm_(p.T, qn[start:stop], alpha=1.0 / tau)
        ctx.save_for_backward(dq, dc)
        return total

    @staticmethod
    def backward(ctx, g):
        dq, dc = ctx.saved_tensors
        return dq * g, dc * g, None, None, None


def loss(q, pos, neg, tau: float, normalize: bool, pos_offset: int, reduction: str):
    """The "global" loss reduced by "mean" or "sum" (float32, float64 for float64 inputs);
    q [B, D], pos [P, D], neg [M, D] flat, query i's target pos[pos_offset + i]."""
    compute = compute_dtype(q.dtype)
    cands = torch.cat([pos, neg]) if neg.shape[0] else pos
    qn, cn = q.to(compute), cands.to(compute)
    if normalize:
        qn, cn = F.normalize(qn, dim=-1), F.normalize(cn, dim=-1)
    grad = torch.is_grad_enabled() and (q.requires_grad or pos.requires_grad or neg.requires_grad)
    total = _GlobalLossFunction.apply(qn, cn, tau, pos_offset, grad)
    return total / q.shape[0] if reduction == "mean" else total
