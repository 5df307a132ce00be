"""Run under LD_PRELOAD of tests/omp_regions.c: prints, as JSON, how many OpenMP parallel regions
one call of each op forks (after a warm-up call), for tests/test_cpu_threads.py."""

import ctypes
import json

import torch
import torch.nn.functional as F

from mgh_kernels import _native, ata_attention, infonce_loss, use_backend

regions = ctypes.CDLL(None).omp_regions
regions.restype = ctypes.c_long
gen = torch.Generator().manual_seed(0)


def counted(fn) -> int:
    fn()
    before = regions()
    fn()
    return regions() - before


def attention(length: int, backward: bool, ours: bool):
    q, k, v = (torch.randn(2, 4, length, 32, generator=gen, requires_grad=backward) for _ in range(3))

    def step():
        with torch.set_grad_enabled(backward), use_backend("torch"):
            if ours:
                out, colsum = ata_attention(q, k, v, causal=True)
                loss = out.sum() + colsum.sum()
            else:
                loss = F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()
        if backward:
            loss.backward()

    return step


def infonce(ours: bool):
    q, pos = (torch.randn(256, 64, generator=gen, requires_grad=True) for _ in range(2))
    neg = torch.randn(256, 3, 64, generator=gen, requires_grad=True)

    def step():
        with use_backend("torch"):
            if ours:
                loss = infonce_loss(q, pos, neg, tau=0.05)
            else:
                candidates = torch.cat([pos, neg.reshape(-1, 64)])
                scores = F.normalize(q, dim=-1) @ F.normalize(candidates, dim=-1).T / 0.05
                loss = F.cross_entropy(scores, torch.arange(256))
        loss.backward()

    return step


counts = {"native": _native.library() is not None, "threads": torch.get_num_threads()}
for length in (256, 1024):
    for backward in (False, True):
        for ours in (True, False):
            counts[f"{'ours' if ours else 'sdpa'} {'fwd+bwd' if backward else 'fwd'} L{length}"] = counted(
                attention(length, backward, ours)
            )
counts["infonce ours"], counts["infonce eager"] = counted(infonce(True)), counted(infonce(False))
print(json.dumps(counts))
