"""``infonce_loss``'s PyTorch path: where the Triton kernels do not run (CPU without the
interpreter, bfloat16 on the CPU, machines without triton, or ``use_backend("torch")``).

A chunk of queries at a time (at most ``backend.chunk_elements()`` logits), each under activation
checkpointing when a gradient will be taken, so backward re-computes the chunk's logits instead
of storing them: memory is one chunk of logits, never B x N. Arithmetic in float32 (float64 for
float64 inputs), as in ``reference.infonce``.
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
