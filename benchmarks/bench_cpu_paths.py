"""Our ops' PyTorch path on the CPU, beside PyTorch's fused attention and the eager computations.

Run with ``pytest --benchmark`` on a machine without CUDA (skipped where CUDA is present: the
kernels' own benchmarks run there). Groups:

* ``cpu attention {fwd, fwd+bwd} B H L D {bidir, causal}``: ``ata_attention`` (out + colsum, role
  "ours"), SDPA (out only, role "fused") and ``reference.attention_with_colsum`` (role "eager",
  skipped at L = 4096 where its B x H x L x L probabilities take minutes).
* ``cpu infonce {fwd, fwd+bwd} B K D``: ``infonce_loss`` (role "ours") and the loss as
  sentence-transformers' MultipleNegativesRankingLoss computes it: cosine similarities of every
  candidate times 1 / tau, cross-entropy (role "eager").

Peak memory is the process's peak resident set size beyond the call's start (VmHWM, see
conftest.py); float32 throughout.
"""

import pytest
import torch
import torch.nn.functional as F

from mgh_kernels import ata_attention, infonce_loss, reference, use_backend

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths: run on a machine without CUDA")

ATTENTION = [(2, 8, 256, 64), (1, 8, 1024, 64), (1, 8, 4096, 64)]
INFONCE = [
    (512, 3, 256),
    (512, 7, 256),
    (512, 3, 1024),
    (512, 7, 1024),
    (4096, 3, 256),
    (4096, 7, 256),
    (4096, 3, 1024),
    (4096, 7, 1024),
]
TAU = 0.05


def attention_step(impl: str, part: str, shape, causal: bool):
    """A no-argument callable: one forward (or forward and backward) of ``impl`` at ``shape``."""
    batch, heads, length, dim = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, requires_grad=part == "fwd+bwd") for _ in range(3))
    dout = torch.randn(batch, heads, length, dim, generator=gen)
    dcol = torch.randn(batch, length, generator=gen)

    def ours():
        with use_backend("torch"):
            return ata_attention(q, k, v, causal=causal)

    attend = {
        "ours": ours,
        "sdpa": lambda: (F.scaled_dot_product_attention(q, k, v, is_causal=causal), None),
        "eager": lambda: reference.attention_with_colsum(q, k, v, causal=causal),
    }[impl]

    def backward():
        out, colsum = attend()
        outputs, grads = [out], [dout]
        if colsum is not None:
            outputs.append(colsum)
            grads.append(dcol)
        torch.autograd.backward(outputs, grads)

    return _step(part, attend, backward)


def _step(part: str, forward, backward):
    """``forward`` without autograd for "fwd", else ``backward`` (forward, then its backward)."""
    if part == "fwd+bwd":
        return backward

    def step():
        with torch.no_grad():
            forward()

    return step


def st_infonce(q, pos, neg, tau=TAU):
    """sentence-transformers' MultipleNegativesRankingLoss on embeddings: cos_sim * scale, CE."""
    candidates = torch.cat([pos, neg.reshape(-1, q.shape[1])])
    scores = F.normalize(q, dim=-1) @ F.normalize(candidates, dim=-1).T / tau
    return F.cross_entropy(scores, torch.arange(q.shape[0]))


def infonce_step(impl: str, part: str, shape):
    batch, k, dim = shape
    gen = torch.Generator().manual_seed(0)
    grad = part == "fwd+bwd"
    q, pos = (torch.randn(batch, dim, generator=gen, requires_grad=grad) for _ in range(2))
    neg = torch.randn(batch, k, dim, generator=gen, requires_grad=grad)

    def ours():
        with use_backend("torch"):
            return infonce_loss(q, pos, neg, tau=TAU)

    loss = {"ours": ours, "eager": lambda: st_infonce(q, pos, neg)}[impl]
    return _step(part, loss, lambda: loss().backward())


ATTENTION_NAMES = {
    "ours": ("ata_attention (out + colsum)", "ours"),
    "sdpa": ("SDPA (out only)", "fused"),
    "eager": ("eager reference (out + colsum)", "eager"),
}


@pytest.mark.parametrize("impl", list(ATTENTION_NAMES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("shape", ATTENTION, ids=lambda s: "B{}-H{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def bench_cpu_attention(measure, part, shape, causal, impl):
    if impl == "eager" and shape[2] > 1024:
        pytest.skip("the eager reference's B x H x L x L probabilities at L = 4096: minutes per call")
    name, role = ATTENTION_NAMES[impl]
    group = "cpu attention {} B{} H{} L{} D{} {}".format(part, *shape, "causal" if causal else "bidir")
    measure(
        attention_step(impl, part, shape, causal),
        group=group,
        name=name,
        role=role,
        rounds=10 if shape[2] > 1024 else 30,
    )  # many rounds: this shared CPU's bursts move medians


INFONCE_NAMES = {"ours": ("infonce_loss", "ours"), "eager": ("eager, as MultipleNegativesRankingLoss", "eager")}


@pytest.mark.parametrize("impl", list(INFONCE_NAMES))
@pytest.mark.parametrize("shape", INFONCE, ids=lambda s: "B{}-K{}-D{}".format(*s))
@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def bench_cpu_infonce(measure, part, shape, impl):
    name, role = INFONCE_NAMES[impl]
    group = "cpu infonce {} B{} K{} D{}".format(part, *shape)
    measure(infonce_step(impl, part, shape), group=group, name=name, role=role, rounds=5 if shape[0] > 512 else 30)
