"""``infonce_loss`` (fused) beside the eager loss: forward+backward time and peak memory (GPU, bf16).

Run with ``pytest --benchmark``; the module is skipped without CUDA. Each group is one workload,
``infonce fwd+bwd B.. K.. D..``, with two entries on the same inputs: ``infonce_loss`` (role
"ours") and ``eager_infonce`` (role "eager"): the loss as sentence-transformers'
MultipleNegativesRankingLoss runs it under bf16 autocast, normalise and one matmul in bf16, then
cross-entropy in float32. It stores the B x B(1+K) logits in bf16 and float32, their softmax and
gradient. (``reference.infonce`` computes in float32 throughout, so its GEMMs would run without
tensor cores: no fair baseline for time.) Eager is skipped where those matrices alone would not
fit in the device's memory; the fused loss needs O(B) statistics and a bounded workspace beside
its inputs and gradients. Peak memory is reported beyond the inputs and the gradients (which both
produce), with its ratio to eager's.

``bench_infonce_largest_batch`` finds, per implementation, the largest B (K=7, D=1024, bf16) whose
forward+backward runs on the device: doubling from B=4096 until out of memory, then bisecting to
a 1/16 step of the last doubling, up to B=262144. Printed after the ratio table.
"""

import gc

import pytest
import torch
import torch.nn.functional as F

from mgh_kernels import infonce_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
CASES = [(b, k, d) for b in (1024, 4096, 16384, 65536) for k in (3, 7) for d in (1024, 4096)]


def eager_infonce(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """The eager baseline: "global" InfoNCE as MultipleNegativesRankingLoss computes it under
    autocast. q, pos [B, D], neg [B, K, D] in any float dtype: normalised and multiplied in that
    dtype, cross-entropy over float32 logits [B, B(1+K)]; returns the float32 mean loss."""
    qn, pn, nn_ = (F.normalize(t, dim=-1) for t in (q, pos, neg))
    candidates = torch.cat([pn, nn_.reshape(-1, q.shape[1])])
    logits = (qn @ candidates.T).float() / tau
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def eager_bytes(batch: int, k: int) -> int:
    """Logit-sized matrices eager holds at its peak: bf16 logits, float32 logits, log-softmax and
    gradient (14 bytes per logit)."""
    return 14 * batch * batch * (1 + k)


def grad_bytes(batch: int, k: int, dim: int) -> int:
    return batch * (2 + k) * dim * 2  # bf16 gradients of q, pos and neg


def input_bytes(batch: int, k: int, dim: int) -> int:
    return 2 * grad_bytes(batch, k, dim)  # bf16 embeddings and their gradients


@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-K{}-D{}".format(*c))
def bench_infonce_fwd_bwd(measure, device, case, impl):
    batch, k, dim = case
    free = torch.cuda.mem_get_info(device)[0]
    if input_bytes(batch, k, dim) > 0.8 * free:
        pytest.skip(f"inputs and gradients alone need {input_bytes(batch, k, dim) / 1e9:.0f} GB")
    if impl == "eager" and eager_bytes(batch, k) + input_bytes(batch, k, dim) > 0.9 * free:
        pytest.skip(
            f"eager needs ~{eager_bytes(batch, k) / 1e9:.0f} GB of logit-sized matrices; {free / 1e9:.0f} GB free"
        )
    gen = torch.Generator(device=device).manual_seed(0)
    q, pos = (torch.randn(batch, dim, generator=gen, device=device, dtype=DTYPE).requires_grad_() for _ in range(2))
    neg = torch.randn(batch, k, dim, generator=gen, device=device, dtype=DTYPE).requires_grad_()
    loss_fn = infonce_loss if impl == "ours" else eager_infonce

    def step():
        loss_fn(q, pos, neg, tau=0.05).backward()
        for t in (q, pos, neg):
            t.grad = None

    name, role = ("infonce_loss (fused)", "ours") if impl == "ours" else ("eager (bf16 matmul, fp32 CE)", "eager")
    measure(
        step,
        group=f"infonce fwd+bwd B{batch} K{k} D{dim}",
        name=name,
        role=role,
        exclude_bytes=grad_bytes(batch, k, dim),
    )


def largest_batch(runs, start: int, limit: int, steps: int = 4) -> int:
    """The largest B in [start, limit] for which ``runs(B)`` is True (0 if ``start`` fails).

    Doubles B while it runs, then bisects ``steps`` times between the last B that ran and the first
    that did not. Assumes a B that runs means every smaller B runs (memory grows with B).
    """
    if start < 1 or limit < start:
        raise ValueError(f"start, limit: expected 1 <= start <= limit, got {start}, {limit}")
    if not runs(start):
        return 0
    good = start
    while good < limit:
        bad = min(2 * good, limit)
        if not runs(bad):
            break
        good = bad
    else:
        return good
    for _ in range(steps):
        middle = (good + bad) // 2
        if middle in (good, bad):
            break
        if runs(middle):
            good = middle
        else:
            bad = middle
    return good


# The fused loss's time grows as B^2 (B=262144 is ~5e15 FLOP per fwd+bwd, seconds on an H100), so the
# probe stops there; past it the fused loss is bounded by its inputs and gradients, not by logits.
PROBE_K, PROBE_D, PROBE_LIMIT = 7, 1024, 1 << 18


@pytest.mark.parametrize("impl", ["ours", "eager"])
def bench_infonce_largest_batch(device, impl, note):
    loss_fn = infonce_loss if impl == "ours" else eager_infonce

    def runs(batch: int) -> bool:
        tensors = []
        try:
            q, pos = (torch.randn(batch, PROBE_D, device=device, dtype=DTYPE).requires_grad_() for _ in range(2))
            neg = torch.randn(batch, PROBE_K, PROBE_D, device=device, dtype=DTYPE).requires_grad_()
            tensors = [q, pos, neg]
            loss_fn(q, pos, neg, tau=0.05).backward()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del tensors
            gc.collect()
            torch.cuda.empty_cache()

    best = largest_batch(runs, 4096, PROBE_LIMIT)
    total = torch.cuda.get_device_properties(device).total_memory
    note(
        f"largest batch, infonce fwd+bwd K{PROBE_K} D{PROBE_D} bf16, {total / 2**30:.0f} GiB device: "
        f"{'infonce_loss (fused)' if impl == 'ours' else 'eager (bf16 matmul, fp32 CE)'} B={best}"
        + (
            f" (the probe's limit; inputs and gradients alone would fit up to B~"
            f"{int(0.9 * total / input_bytes(1, PROBE_K, PROBE_D))})"
            if best == PROBE_LIMIT
            else ""
        )
    )
