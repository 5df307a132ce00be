"""``ata_attention`` on the CPU: a forward that sweeps blocks of query rows once, and PyTorch's own
CPU flash-attention backward.

Forward. For each block of up to ``ROWS`` query rows, over as many heads as keep its scores within
``BLOCK_ELEMENTS`` (``block_heads``), one GEMM gives the scores against every key the rows may see;
their softmax (a row pass of ``cpu_rows``, native where the library builds) gives the block's
output rows (a second GEMM), its log-sum-exp, and its share of every key's column sum (a
matrix-vector product). Nothing L x L is held for the batch.

Threads. The blocks are tasks on PyTorch's own intra-op threads, in one parallel region per sweep
(``_tasks``; the split in ``_split``), each block's ops single-threaded: a chain of multi-threaded
ops per block would pay a fork and a join per op, which on a machine busy with other jobs costs a
wait for the scheduler each time.

Backward. ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` re-computes the
probabilities from the log-sum-exp. The column sums' gradient g [B, L] enters as one more value
column: with v' = [v, g / H], out' = [out, P g / H] and dout' = [dout, 1] on real queries,
dout' v'^T = dout v^T + 1 g^T / H is the whole gradient of the probabilities, so the op's dq, dk
(and dv, less its last column) are the gradients of both outputs. The op wants one head dim for
q, k and v, so q and k take a zero column. ``P g`` is one more sweep of the scores.

Padding. q, k and v come with their padded positions zeroed (``torch_path``), and the backward
zeroes the incoming gradients there, so NaN or inf at padding cannot reach a real position. Padded
keys get a large finite negative bias instead of -inf, so a padded query that
sees only padded keys (left padding, causal) keeps a finite softmax in both passes; its output
row, its share of the column sums and its gradient are then dropped.

Scratch. The score blocks come from ``_scratch`` (one buffer per thread of the sweep, named
``attention.scores.<slot>``), buffers the calling thread keeps from call to call: a new block
each time would be new pages, faulted in one by one.

Arithmetic in float32 (float64 for float64 inputs), as in ``reference.attention_with_colsum``.
"""

from __future__ import annotations

import torch

from .. import _tasks, cpu_rows
from .._precision import compute_dtype, exp_floor
from .._scratch import scratch

ROWS = 128
"""Query rows per block of the sweeps, at most."""

BLOCK_ELEMENTS = 1 << 20
"""Scores one block may hold (4 MiB in float32; the sweep that chose it is in benchmarks/RESULTS.md):
heads join a block while they fit."""

_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def supports(q: torch.Tensor) -> bool:
    """Whether this path runs ``q``'s device (the CPU)."""
    return q.device.type == "cpu"


def block_heads(rows: int, keys: int, heads: int) -> int:
    """Heads (of ``heads`` = B x H) in one block of ``rows`` query rows against ``keys`` keys: as many
    as keep the block's scores within ``BLOCK_ELEMENTS``, at least one. Override to retune."""
    return max(1, min(heads, BLOCK_ELEMENTS // max(1, rows * keys)))


def _heads(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * group, L, D]: query head h reads kv head h // group (GQA)."""
    if group == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


def _key_bias(valid, dtype: torch.dtype):
    """[B, 1, 1, L]: 0 at real keys, a large finite negative at padded ones (None without a mask)."""
    if valid is None:
        return None
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid, torch.finfo(dtype).min / 4)[:, None, None, :]


def _split(heads: int, length: int, causal: bool, slots: int):
    """The sweep's tasks (``_tasks``) and how many groups their row blocks form: each task
    (heads, group, blocks) takes a slice of the B x H heads through the row blocks of one group,
    in order, ``blocks`` as (rows, keys) with ``rows`` up to ``ROWS`` query rows and ``keys`` the
    keys they may see (up to the block's last row when causal). Group g holds row blocks g, g + G,
    ... (G groups: alike in cost under the causal mask). One group where the heads alone give
    each of ``slots`` threads about four tasks to pick from, else as many as that takes. A task's
    heads are at most ``block_heads`` of its largest block, so no block's scores pass
    ``BLOCK_ELEMENTS``. Each task's heads and group are its own: the column sums of a (group,
    heads) accumulate in one task, in row order, so the result does not depend on which thread
    ran what."""
    blocks = [
        (slice(start, min(length, start + ROWS)), min(length, start + ROWS) if causal else length)
        for start in range(0, length, ROWS)
    ]
    groups = 1 if slots <= 1 or heads >= 4 * slots else min(len(blocks), -(-4 * slots // heads))
    widest = max(rows.stop - rows.start for rows, _ in blocks)
    step = min(
        block_heads(widest, max(keys for _, keys in blocks), heads),
        heads if slots <= 1 else max(1, -(-heads * groups // (4 * slots))),
    )
    tasks = [
        (slice(first, min(heads, first + step)), group, blocks[group::groups])
        for group in range(groups)
        for first in range(0, heads, step)
    ]
    return tasks, groups


class _Sweep:
    """What a sweep's blocks share: q and k flat over heads, the key bias, the causal mask of a full
    block, its tasks (``_split``) and per-slot score buffers (``_tasks``: no two tasks of a slot at
    once)."""

    def __init__(self, q, k, bias, causal: bool, scale: float):
        b, h, n, _ = q.shape
        self.qf, self.kt = q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)  # kt a view: the GEMMs read k transposed
        self.bias = None if bias is None else bias.expand(b, h, 1, n).reshape(b * h, 1, n)
        self.causal, self.scale = causal, scale
        self.slots = _tasks.threads()
        self.tasks, self.groups = _split(b * h, n, causal, self.slots)
        size = max(
            (heads.stop - heads.start) * (rows.stop - rows.start) * keys
            for heads, _, blocks in self.tasks
            for rows, keys in blocks
        )
        # scratch of the calling thread (``_scratch``): the tasks' threads only borrow it
        self.buffers = [scratch(f"attention.scores.{slot}", (size,), q.dtype, q.device) for slot in range(self.slots)]
        # the causal mask as a bias (-inf above the diagonal): add_ is faster than masked_fill_
        rows = min(ROWS, n)
        self.later = (
            torch.full((rows, rows), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
            if causal and rows > 1
            else None
        )

    def scores(self, heads: slice, rows: slice, keys: int, slot: int) -> torch.Tensor:
        """The block's scores [heads, rows, keys] in the slot's buffer: scaled, with the key bias and
        the causal mask (-inf) applied."""
        n = rows.stop - rows.start
        s = self.buffers[slot][: (heads.stop - heads.start) * n * keys].view(heads.stop - heads.start, n, keys)
        q, kt = self.qf[heads, rows], self.kt[heads, :, :keys]
        if self.bias is None:
            torch.baddbmm(s, q, kt, beta=0, alpha=self.scale, out=s)
        else:
            torch.baddbmm(self.bias[heads, :, :keys], q, kt, alpha=self.scale, out=s)
        if self.causal and n > 1:
            s[:, :, rows.start : rows.stop].add_(self.later[:n, :n])
        return s


def _forward(q, k, v, valid, causal: bool, scale: float):
    """out [B, H, L, D] (zero at padded queries), lse [B, H, L] of the scaled scores, colsum [B, L]
    (sum over real queries, mean over heads, zero at padded keys); q, k, v in one compute dtype, k
    and v per query head. Each task (``_split``) writes its own rows of out and lse, and the column
    sums of its heads and group."""
    b, h, n, d = q.shape
    vf = v.flatten(0, 1)
    floor = exp_floor(q.dtype)
    keep = None if valid is None else valid.to(q.dtype)[:, None, :, None].expand(b, h, n, 1).reshape(b * h, n, 1)
    out = torch.empty(b * h, n, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b * h, n, 1, dtype=q.dtype, device=q.device)
    sweep = _Sweep(q, k, _key_bias(valid, q.dtype), causal, scale)
    cols = torch.zeros(sweep.groups, b * h, 1, n, dtype=q.dtype, device=q.device)

    def task(index: int, slot: int) -> None:
        heads, group, blocks = sweep.tasks[index]
        for rows, keys in blocks:
            s = sweep.scores(heads, rows, keys, slot)
            per_row = s.shape[:2] + (1,)
            top, total = torch.empty(per_row, dtype=q.dtype), torch.empty(per_row, dtype=q.dtype)
            p = cpu_rows.softmax_(s, floor, top, total)
            torch.add(top, total.log(), out=lse[heads, rows])
            weight = total.reciprocal_()
            if keep is not None:
                weight.mul_(keep[heads, rows])
            torch.mul(torch.bmm(p, vf[heads, :keys]), weight, out=out[heads, rows])
            # one GEMM for all the block's heads (baddbmm_ into the strided slice runs one per head)
            cols[group, heads, :, :keys].add_(torch.bmm(weight.transpose(1, 2), p))

    _tasks.run(len(sweep.tasks), task, sweep.slots)
    colsum = (cols[0] if sweep.groups == 1 else cols.sum(0)).view(b, h, n).mean(dim=1)
    if valid is not None:
        colsum.mul_(valid)
    return out.view(b, h, n, d), lse.view(b, h, n), colsum


def _probabilities_times(q, k, lse, bias, causal: bool, scale: float, g) -> torch.Tensor:
    """[B, H, L]: P g, P the attention probabilities, g [B, L] one value per key."""
    b, h, n, _ = q.shape
    lse = lse.reshape(b * h, n, 1)
    gf = g[:, None, :, None].expand(b, h, n, 1).reshape(b * h, n, 1)
    floor = exp_floor(q.dtype)
    pg = torch.empty(b * h, n, 1, dtype=q.dtype, device=q.device)
    sweep = _Sweep(q, k, bias, causal, scale)

    def task(index: int, slot: int) -> None:
        heads, _, blocks = sweep.tasks[index]
        for rows, keys in blocks:
            s = sweep.scores(heads, rows, keys, slot)
            torch.bmm(cpu_rows.exp_shifted_(s, lse[heads, rows], floor), gf[heads, :keys], out=pg[heads, rows])

    _tasks.run(len(sweep.tasks), task, sweep.slots)
    return pg.view(b, h, n)


def _backward(q, k, v, out, lse, valid, causal: bool, scale: float, dout, dcolsum):
    b, h, n, d = q.shape
    bias = _key_bias(valid, q.dtype)
    keep = (
        torch.ones(b, 1, n, 1, dtype=q.dtype, device=q.device) if valid is None else valid.to(q.dtype)[:, None, :, None]
    )
    # where, not a product: the gradients at padded positions may hold anything (NaN, inf)
    dout = torch.zeros_like(out) if dout is None else torch.where(keep > 0, dout.to(q.dtype), 0.0)
    if dcolsum is None:
        return _FLASH_BACKWARD(dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    g = dcolsum.to(q.dtype) / h
    if valid is not None:
        g = torch.where(valid, g, 0.0)
    pg = _probabilities_times(q, k, lse, bias, causal, scale, g)
    zero = q.new_zeros(b, h, n, 1)
    dq, dk, dv = _FLASH_BACKWARD(
        torch.cat([dout, keep.expand(b, h, n, 1)], dim=-1),
        torch.cat([q, zero], dim=-1),
        torch.cat([k, zero], dim=-1),
        torch.cat([v, g[:, None, :, None].expand(b, h, n, 1)], dim=-1),
        torch.cat([out, pg[..., None]], dim=-1),
        lse,
        0.0,
        causal,
        attn_mask=bias,
        scale=scale,
    )
    return dq[..., :d], dk[..., :d], dv[..., :d]


class CPUAttentionFunction(torch.autograd.Function):
    """(out, colsum) of ``attention``, with the backward above; q, k, v as given (any float dtype)."""

    @staticmethod
    def forward(ctx, q, k, v, valid, causal, scale):
        compute = compute_dtype(q.dtype)
        group = q.shape[1] // k.shape[1]
        qc, kc, vc = q.to(compute), _heads(k.to(compute), group), _heads(v.to(compute), group)
        out, lse, colsum = _forward(qc, kc, vc, valid, causal, scale)
        ctx.save_for_backward(qc, kc, vc, out, lse, valid)
        ctx.causal, ctx.scale, ctx.group, ctx.dtypes = causal, scale, group, (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype), colsum if colsum.dtype == torch.float64 else colsum.float()

    @staticmethod
    def backward(ctx, dout, dcolsum):
        qc, kc, vc, out, lse, valid = ctx.saved_tensors
        dq, dk, dv = _backward(qc, kc, vc, out, lse, valid, ctx.causal, ctx.scale, dout, dcolsum)
        if ctx.group > 1:
            b, h, n, d = dk.shape
            dk = dk.reshape(b, h // ctx.group, ctx.group, n, d).sum(2)
            dv = dv.reshape(b, h // ctx.group, ctx.group, n, d).sum(2)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None


def attention(q, k, v, mask, causal: bool, scale: float, return_colsum: bool):
    """(out [B, Hq, L, D] in q's dtype, colsum [B, L] float32 (float64 for float64 inputs) or None);
    ``mask`` the [B, L] bool key padding mask or None."""
    out, colsum = CPUAttentionFunction.apply(q, k, v, mask, causal, scale)
    return out, (colsum if return_colsum else None)
