"""Packed (varlen) against padded ATA attention on the CPU, on a long-tailed length mix.

A micro-batch of 8 triplets with 3 hard negatives: 8 queries of 8-32 tokens and 32 documents
(positives and negatives) of 64-512 tokens, log-uniform (most short, a few long), drawn with a
fixed seed. Heads as SmolLM2-135M's attention (9 query heads, 3 kv heads, head dim 64), causal,
float32. Entries, side by side in one run:

* ``ata_attention_varlen`` on the packed texts (role "ours");
* ``ata_attention`` on the texts padded to the longest (role "peer");
* ``ata_attention`` on four length buckets, each padded to its longest (role "other": what the
  trainer's bucketing does today).

Each entry's ``work`` is the real (non-padding) tokens per call, so the table prints real tokens/s.
Run: ``pytest benchmarks/bench_varlen.py --benchmark`` (CPU; on a GPU the same file times the
Triton kernels: see RESULTS.md).
"""

import math

import pytest
import torch

from mgh_kernels import ata_attention, ata_attention_varlen, use_backend

HEADS, KV_HEADS, DIM = 9, 3, 64
TRIPLETS, NEGATIVES = 8, 3
BUCKETS = 4


def long_tailed_lengths(
    seed: int = 0, triplets: int = TRIPLETS, negatives: int = NEGATIVES, query=(8, 32), document=(64, 512)
) -> list:
    """Queries uniform in ``query``, documents log-uniform in ``document`` (a long tail)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(query[0], query[1] + 1, (triplets,), generator=gen).tolist()
    low, high = math.log(document[0]), math.log(document[1])
    docs = (torch.rand(triplets * (1 + negatives), generator=gen) * (high - low) + low).exp().round().long().tolist()
    return queries + docs


def _padded(packed, lengths, device):
    """[total, H, D] -> [n, H, L, D] right-padded, and its [n, L] mask."""
    longest = max(lengths)
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    box = packed.new_zeros(len(lengths), longest, *packed.shape[1:])
    box[mask.to(device)] = packed
    return box.transpose(1, 2).contiguous(), mask.to(device)


def _buckets(lengths, count):
    """Indices of the texts in ``count`` buckets of equal size, by length."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = math.ceil(len(order) / count)
    return [order[i : i + size] for i in range(0, len(order), size)]


def attention_step(
    impl: str,
    part: str,
    lengths,
    device="cpu",
    dtype=torch.float32,
    heads=HEADS,
    kv_heads=KV_HEADS,
    dim=DIM,
    causal=True,
):
    """A no-argument callable: one forward (or forward and backward) of ``impl`` ("varlen",
    "padded", "bucketed") over the texts of ``lengths``; it returns the column sums in the packed
    order (so the entries can be checked equal)."""
    gen = torch.Generator().manual_seed(1)
    total = sum(lengths)
    grad = part == "fwd+bwd"
    q, k, v = (torch.randn(total, h, dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    starts = cu.tolist()
    groups = [list(range(len(lengths)))] if impl == "padded" else _buckets(lengths, BUCKETS)

    def varlen(q, k, v):
        return ata_attention_varlen(q, k, v, cu, max(lengths), causal=causal)

    def padded(q, k, v):
        outs, sums = [None] * len(lengths), [None] * len(lengths)
        for group in groups:
            rows = [torch.arange(starts[i], starts[i + 1]) for i in group]
            sizes = [lengths[i] for i in group]
            boxes = [_padded(t[torch.cat(rows).to(device)], sizes, device) for t in (q, k, v)]
            mask = boxes[0][1]
            out, colsum = ata_attention(*(b for b, _ in boxes), causal=causal, key_padding_mask=mask)
            out, colsum = out.transpose(1, 2)[mask], colsum[mask]
            for i, piece, c in zip(group, out.split(sizes), colsum.split(sizes)):
                outs[i], sums[i] = piece, c
        return torch.cat(outs), torch.cat(sums)

    attend = varlen if impl == "varlen" else padded
    backend = "torch" if device == "cpu" else "auto"

    def step():
        inputs = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        with use_backend(backend), torch.set_grad_enabled(grad):
            out, colsum = attend(*inputs)
            if grad:
                (out.square().mean() + colsum.square().mean()).backward()
        return colsum.detach()

    return step


NAMES = {
    "varlen": ("ata_attention_varlen (packed)", "ours"),
    "padded": ("ata_attention (padded)", "peer"),
    "bucketed": (f"ata_attention ({BUCKETS} length buckets)", "other"),
}


@pytest.mark.parametrize("impl", list(NAMES))
@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def bench_varlen_attention(measure, device, part, impl):
    lengths = long_tailed_lengths()
    name, role = NAMES[impl]
    group = f"varlen attention {part} {len(lengths)} texts, {sum(lengths)} tokens, H{HEADS}/{KV_HEADS} D{DIM} causal"
    measure(
        attention_step(
            impl, part, lengths, device=str(device), dtype=torch.float32 if device.type == "cpu" else torch.bfloat16
        ),
        group=group,
        name=name,
        role=role,
        work={"real tokens": sum(lengths)},
        rounds=10,
    )
