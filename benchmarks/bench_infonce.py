"""``infonce_loss`` (fused) beside the eager reference: forward+backward time and peak memory (GPU, bf16).

Run with ``pytest --benchmark``; the module is skipped without CUDA. Each group is one workload,
``infonce fwd+bwd B.. K.. D..``, with two entries on the same inputs: ``infonce_loss`` (role
"ours") and ``reference.infonce`` (role "eager": normalise, one matmul, cross-entropy, which
stores the B x B(1+K) float32 logits, their softmax and gradient). Eager is skipped where those
three matrices alone would not fit in the device's memory; the fused loss needs O(B) beside its
inputs and gradients. Peak extra memory (beyond the inputs) is in the ratio table's last column.
"""

import pytest
import torch

from mgh_kernels import infonce_loss, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
CASES = [(b, k, d) for b in (1024, 4096, 16384, 65536) for k in (3, 7) for d in (1024, 4096)]


def eager_bytes(batch: int, k: int) -> int:
    """float32 logits, softmax and their gradient: three B x B(1+K) matrices."""
    return 3 * batch * batch * (1 + k) * 4


def input_bytes(batch: int, k: int, dim: int) -> int:
    return 2 * batch * (2 + k) * dim * 2  # bf16 embeddings and their gradients


@pytest.mark.parametrize("impl", ["ours", "eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-K{}-D{}".format(*c))
def bench_infonce_fwd_bwd(measure, device, case, impl):
    batch, k, dim = case
    free = torch.cuda.mem_get_info(device)[0]
    if input_bytes(batch, k, dim) > 0.8 * free:
        pytest.skip(f"inputs and gradients alone need {input_bytes(batch, k, dim) / 1e9:.0f} GB")
    if impl == "eager" and eager_bytes(batch, k) + input_bytes(batch, k, dim) > 0.9 * free:
        pytest.skip(f"eager needs ~{eager_bytes(batch, k) / 1e9:.0f} GB of logit-sized matrices; "
                    f"{free / 1e9:.0f} GB free")
    gen = torch.Generator(device=device).manual_seed(0)
    q, pos = (torch.randn(batch, dim, generator=gen, device=device, dtype=DTYPE).requires_grad_() for _ in range(2))
    neg = torch.randn(batch, k, dim, generator=gen, device=device, dtype=DTYPE).requires_grad_()
    loss_fn = infonce_loss if impl == "ours" else reference.infonce

    def step():
        loss_fn(q, pos, neg, tau=0.05).backward()
        for t in (q, pos, neg):
            t.grad = None

    name, role = ("infonce_loss (fused)", "ours") if impl == "ours" else ("reference.infonce (eager)", "eager")
    measure(step, group=f"infonce fwd+bwd B{batch} K{k} D{dim}", name=name, role=role)
