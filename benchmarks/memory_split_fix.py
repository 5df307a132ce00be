"""Experiment for RESULTS.md (issue 36): ``memory_packing``'s packed entry with
``varlen._per_sequence`` taking the texts' q, k, v by ``torch.split`` (one SplitWithSizesBackward:
the texts' gradients concatenated once) instead of ``t[start:stop]`` (a SliceBackward per text: a
zero-filled [total, H, D] gradient for each text, summed by autograd); then a check that both give
bit-identical outputs and gradients.

Run from the repository root: ``MGH_BENCH_LAYERS=2 python benchmarks/memory_split_fix.py split``
(or ``slice``: the code as it is); ``... split rss``: the packed step's first-step RSS growth
(``bench_packing.first_step_peak``) instead of the allocation account."""

import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import memory_packing
from mgh_kernels.attention import torch_path, varlen


def _per_sequence_split(q, k, v, bounds, causal, scale, return_colsum):
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    outs, sums = [], []
    for qs, ks, vs in zip(*(torch.split(t, lengths) for t in (q, k, v))):
        if qs.shape[0] == 0:
            continue
        view = [t.transpose(0, 1)[None] for t in (qs, ks, vs)]
        if not return_colsum:
            out = torch.nn.functional.scaled_dot_product_attention(
                *view, is_causal=causal, scale=scale, enable_gqa=view[0].shape[1] != view[1].shape[1]
            )
            outs.append(out[0].transpose(0, 1))
            continue
        out, colsum = torch_path.attention(*view, None, causal, scale, return_colsum)
        outs.append(out[0].transpose(0, 1))
        sums.append(colsum[0])
    return torch.cat(outs), (torch.cat(sums) if return_colsum else None)


_ORIG = varlen._per_sequence
variant = sys.argv[1] if len(sys.argv) > 1 else "split"
if variant == "split":
    varlen._per_sequence = _per_sequence_split
if sys.argv[2:] == ["rss"]:  # bench_packing's fresh-process first-step RSS growth instead of the account
    import bench_packing

    print(f"{variant}: first-step RSS growth {bench_packing.first_step_peak('long-tailed', 'packed'):.1f} MiB")
else:
    print(json.dumps({"variant": variant, **memory_packing.measure("long-tailed", "packed")}))

# the same outputs and gradients as the sliced version, on random packed texts
gen = torch.Generator().manual_seed(0)
bounds = [0, 5, 22, 23, 40]
for colsum in (False, True):
    grads = []
    for fn in (_ORIG, _per_sequence_split):
        q, k, v = (
            torch.randn(40, h, 16, generator=gen.manual_seed(i)).requires_grad_() for i, h in enumerate((6, 2, 2))
        )
        out, sums = fn(q, k, v, bounds, True, 0.25, colsum)
        (out.square().sum() + (sums.square().sum() if colsum else 0)).backward()
        grads.append([out.detach(), q.grad, k.grad, v.grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), colsum
print("split == slice: outputs and gradients equal")
