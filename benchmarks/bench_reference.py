"""The eager references' own timings, beside PyTorch's fused attention (the baselines of later kernels).

Run with ``pytest --benchmark``. Shapes are small on the CPU so the suite stays quick; on a GPU
they are the first shapes of the attention table (bf16).
"""

import pytest
import torch
import torch.nn.functional as F

from mgh_kernels import ata_pool, mean_pool, reference

CPU_ATTENTION = [(2, 8, 256, 64), (1, 8, 1024, 64)]
GPU_ATTENTION = [(32, 32, 512, 128), (8, 32, 2048, 128)]


def attention_shapes(device):
    return GPU_ATTENTION if device.type == "cuda" else CPU_ATTENTION


def dtype_for(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", ["eager_colsum", "sdpa"])
def bench_attention_forward(measure, device, index, causal, impl):
    batch, heads, length, dim = attention_shapes(device)[index]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, dim, generator=gen, device=device, dtype=dtype_for(device)) for _ in range(3)
    )
    # Not "attention fwd ...": bench_attention.py owns those groups (with cuDNN as the baseline).
    group = f"reference attention fwd B{batch} H{heads} L{length} D{dim} {'causal' if causal else 'bidir'}"
    if impl == "eager_colsum":
        fn = lambda: reference.attention_with_colsum(q, k, v, causal=causal)
        measure(fn, group=group, name="eager reference (out + colsum)", role="eager")
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        measure(fn, group=group, name="SDPA, default backend (out only)", role="fused")


@pytest.mark.parametrize("k_neg", [3, 7])
@pytest.mark.parametrize("part", ["forward", "forward+backward"])
def bench_infonce(measure, device, k_neg, part):
    batch, dim = (4096, 1024) if device.type == "cuda" else (512, 256)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = dtype_for(device)
    q, pos = (torch.randn(batch, dim, generator=gen, device=device, dtype=dtype) for _ in range(2))
    neg = torch.randn(batch, k_neg, dim, generator=gen, device=device, dtype=dtype)
    group = f"infonce {part} B{batch} K{k_neg} D{dim}"
    if part == "forward":
        fn = lambda: reference.infonce(q, pos, neg)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, pos, neg)]
        fn = lambda: reference.infonce(*leaves).backward()
    measure(fn, group=group, name="eager reference", role="eager")


@pytest.mark.parametrize("method", ["mean", "ata_from_colsum", "ata_from_attentions"])
def bench_pooling(measure, device, method):
    batch, heads, length, hidden = (32, 32, 512, 4096) if device.type == "cuda" else (8, 8, 256, 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = dtype_for(device)
    states = torch.randn(batch, length, hidden, generator=gen, device=device, dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[::2, length // 2 :] = False
    group = f"pooling B{batch} L{length} H{hidden}"
    if method == "mean":
        measure(lambda: mean_pool(states, mask), group=group, name="mean_pool", role="other")
    elif method == "ata_from_colsum":
        colsum = torch.rand(batch, length, generator=gen, device=device)
        measure(lambda: ata_pool(states, mask, colsum=colsum), group=group, name="ata_pool(colsum=)", role="ours")
    else:
        probs = torch.rand(batch, heads, length, length, generator=gen, device=device, dtype=dtype)
        measure(
            lambda: ata_pool(states, mask, attentions=(probs,)),
            group=group,
            name="ata_pool(attentions=) eager",
            role="eager",
        )
