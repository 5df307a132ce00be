"""``infonce_loss``'s PyTorch path: where the Triton kernels do not run (CPU without the
interpreter, bfloat16 on the CPU, machines without triton, or ``use_backend("torch")``).

A chunk of queries at a time (at most ``backend.chunk_elements()`` logits): memory is one chunk of
logits, never B x N. A mean or sum over every candidate of the batch (``loss``) makes its
gradients in the forward, chunk by chunk (the softmax minus the target, times the candidates and
the queries: the two GEMMs autograd's backward would run), and backward only scales them. It
neither concatenates nor normalises the candidates: each chunk's GEMMs read pos and neg where they
lie, and the cosine's 1 / |c| joins 1 / tau as a scale of the logits' columns (the candidates'
gradient then drops its component along c, as ``F.normalize``'s backward does). So it costs less
than the eager loss, without its B x N logits. The softmax over a chunk is one row pass
(``cpu_rows``: native on the CPU where it builds), and cosine logits are shifted by their bound
1 / tau rather than each row's max where that keeps every exponential normal (``_fixed_shift``);
the chunk of logits is a reused scratch buffer (``_scratch``). Per-query losses (``losses``) run
each chunk under activation checkpointing when a gradient will be taken, so backward re-computes
its logits. Arithmetic in float32 (float64 for float64 inputs), as in ``reference.infonce``.

Threads (``loss``). Each chunk is two sets of tasks on PyTorch's own intra-op threads
(``_tasks``), one parallel region each, with single-threaded ops inside: blocks of the chunk's
query rows (their logits, softmax, share of the loss and rows of the queries' gradient), then
blocks of the candidates (their rows of the candidates' gradient). A chain of multi-threaded ops
would pay a fork and a join per op, which on a machine busy with other jobs costs a wait for the
scheduler each time. Every output element is written by one task, so results do not depend on
which thread ran what.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _tasks, backend, cpu_rows
from .._precision import compute_dtype, exp_floor
from .._scratch import scratch


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
    chunks = [
        (q[start : start + chunk], pos, neg, tau, normalize, own, start + (0 if own else pos_offset))
        for start in range(0, q.shape[0], chunk)
    ]
    out = torch.cat(backend.chunked(_chunk_losses, chunks, (q, pos, neg)))
    return out if out.dtype == torch.float64 else out.float()


_EPS = 1e-12
"""F.normalize's eps: a candidate's norm counts as at least this."""

_ROUNDING = 1e-3
"""Room for rounding above the cosine's bound of 1 (|q| = 1 + ulps, the GEMM's own rounding)."""


def _column_scales(parts, tau: float, normalize: bool):
    """(scale [N], norms [N] or None): logit = q . c * scale, scale = 1 / (tau |c|) (or 1 / tau)."""
    if not normalize:
        count = sum(part.shape[0] for part in parts)
        return parts[0].new_full((count,), 1.0 / tau), None
    norms = torch.cat([torch.linalg.vector_norm(part, dim=-1) for part in parts])
    return norms.clamp_min(_EPS).mul_(tau).reciprocal_(), norms


def _fixed_shift(tau: float, normalize: bool, dtype: torch.dtype) -> float | None:
    """The softmax's shift, subtracted from every logit, when one constant serves every row, else
    None (shift by each row's max).
    Cosine logits lie within +-1 / tau (q normalised, |q . c| <= |q| |c|), so 1 / tau is an upper
    bound of every row; it serves while the lowest logit, 2 / tau below it, still has a normal exp
    (``exp_floor``): tau >= 0.0232 in float32, as sentence-transformers' scale 20 (tau 0.05) is."""
    bound = (1.0 + _ROUNDING) / tau
    if not normalize or 2 * bound > -exp_floor(dtype):
        return None
    return bound


def _split(count: int, slots: int) -> list:
    """[(lo, hi)]: ``count`` rows in about four blocks per slot (one block for one slot), each of
    at least ``MIN_ROWS`` rows, for ``_tasks``."""
    size = count if slots <= 1 else max(MIN_ROWS, -(-count // (4 * slots)))
    return [(lo, min(count, lo + size)) for lo in range(0, count, size)]


MIN_ROWS = 32
"""Fewest rows of a task's block (smaller GEMMs waste more than an even split gains)."""


class _GlobalLossFunction(torch.autograd.Function):
    """Sum over queries of -log softmax(logits_i)[offset + i], logits_ij = q_i . c_j / tau with the
    candidates c = [pos; neg] raw and divided by their norms (as ``F.normalize``) when ``normalize``:
    the normalisation is a scale of the logits' columns, so the candidates are never copied,
    concatenated or normalised. q [B, D] (normalised by the caller), pos [P, D], neg [M, D] in one
    compute dtype. With ``grad`` the gradients of all three are made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, q, pos, neg, tau, offset, normalize, grad):
        parts = [part for part in (pos, neg) if part.shape[0]]
        bounds = [0]
        for part in parts:
            bounds.append(bounds[-1] + part.shape[0])
        scale, norms = _column_scales(parts, tau, normalize)
        batch, count = q.shape[0], bounds[-1]
        shift = _fixed_shift(tau, normalize, q.dtype)
        rows = max(1, min(batch, backend.chunk_elements() // max(1, count)))
        buffer = scratch("infonce.logits", (rows, count), q.dtype, q.device)
        dq = torch.empty_like(q) if grad else None
        raw = [torch.zeros_like(part) for part in parts] if grad else None  # sum_i G_ij scale_j q_i
        slots = _tasks.threads()
        total = q.new_zeros(())
        floor = exp_floor(q.dtype)
        for start in range(0, batch, rows):
            stop = min(batch, start + rows)
            logits, chunk = buffer[: stop - start], q[start:stop]

            def query_rows(index: int, slot: int) -> None:  # the logits, the softmax and dq of rows
                lo_row, hi_row = row_blocks[index]
                block, at = logits[lo_row:hi_row], torch.arange(hi_row - lo_row, device=q.device)
                for part, lo, hi in zip(parts, bounds, bounds[1:]):
                    torch.mm(chunk[lo_row:hi_row], part.T, out=block[:, lo:hi])
                target = at + start + lo_row + offset
                picked = block[at, target] * scale[target]  # the target's logit, before the row pass
                top = torch.empty(hi_row - lo_row, 1, dtype=q.dtype)
                sums = torch.empty(hi_row - lo_row, 1, dtype=q.dtype)
                p = cpu_rows.softmax_(block, floor, top, sums, scale=scale, shift=shift, store=grad)
                totals[index] = sums.log().sum() - (picked - top[:, 0]).sum()  # log(sum) - the shifted target
                if grad:
                    p.div_(sums)
                    p[at, target] -= 1.0
                    p.mul_(scale)  # the gradient of the raw dot products q . c
                    rows_dq = dq[start + lo_row : start + hi_row]
                    for i, (part, lo, hi) in enumerate(zip(parts, bounds, bounds[1:])):
                        torch.addmm(rows_dq, p[:, lo:hi], part, beta=float(i > 0), out=rows_dq)

            def candidate_rows(index: int, slot: int) -> None:  # the candidates' gradients, by rows of them
                i, lo, hi = column_blocks[index]
                raw[i][lo - bounds[i] : hi - bounds[i]].addmm_(logits[:, lo:hi].T, chunk)

            row_blocks = _split(stop - start, slots)
            totals = q.new_empty(len(row_blocks))  # each block's share of the loss, summed in order
            _tasks.run(len(row_blocks), query_rows, slots)
            total = total + totals.sum()
            if grad:
                column_blocks = [
                    (i, lo + a, lo + b)
                    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
                    for a, b in _split(hi - lo, slots)
                ]
                _tasks.run(len(column_blocks), candidate_rows, slots)
        grads = [dq] if grad else []
        if grad:
            for part, part_raw, lo, hi in zip(parts, raw, bounds, bounds[1:]):
                if normalize:  # through c / |c|: drop the component along c (F.normalize's backward)
                    n = norms[lo:hi, None]
                    along = torch.linalg.vecdot(part_raw, part)[:, None] / n.square().clamp_min(_EPS**2)
                    part_raw.addcmul_(part, torch.where(n > _EPS, along, 0.0), value=-1.0)
                grads.append(part_raw)
            if not neg.shape[0]:
                grads.append(torch.zeros_like(neg))
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, g):  # only reached with grad=True: some input required a gradient
        dq, dpos, dneg = ctx.saved_tensors
        return dq * g, dpos * g, dneg * g, None, None, None, None


def loss(q, pos, neg, tau: float, normalize: bool, pos_offset: int, reduction: str):
    """The "global" loss reduced by "mean" or "sum" (float32, float64 for float64 inputs);
    q [B, D], pos [P, D], neg [M, D] flat, query i's target pos[pos_offset + i]."""
    compute = compute_dtype(q.dtype)
    qn, pos, neg = q.to(compute), pos.to(compute), neg.to(compute)
    if normalize:
        qn = F.normalize(qn, dim=-1)
    grad = torch.is_grad_enabled() and (q.requires_grad or pos.requires_grad or neg.requires_grad)
    total = _GlobalLossFunction.apply(qn, pos, neg, tau, pos_offset, normalize, grad)
    return total / q.shape[0] if reduction == "mean" else total
