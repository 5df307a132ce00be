"""``ata_attention`` beside PyTorch's fused attention and the eager reference (GPU, bf16).

Run with ``pytest --benchmark``; the module is skipped without CUDA. Each group is one workload,
``attention {fwd|fwd+bwd} B.. H.. L.. D.. {bidir|causal}`` (GQA shapes read ``Hq.. Hkv..``),
and holds these entries, all on the same inputs:

* ``ata_attention (out + colsum)``, role "ours": our op as users call it, output and per-key
  column sums (on MHA shapes its forward is cuDNN's flash pass then our column-sum pass);
* ``... Triton flash pass`` (every shape) and, on shapes with L <= 512, ``... one-sweep forward``,
  role "other": the same op with each of our own forwards forced (``attention.cudnn.FLASH_PASS``
  and ``attention.tiles.SHORT_MAX_LENGTH``), to choose the defaults by measurement;
* ``SDPA cuDNN backend (out only)``, role "fused": the baseline;
* ``SDPA flash backend (out only)`` and, when flash-attn is installed, ``flash_attn_func``,
  role "other" (shown for scale);
* ``eager reference (out + colsum)``, role "eager": ``reference.attention_with_colsum``, skipped
  where its float32 L x L tensors would exceed ``EAGER_LIMIT_BYTES``.

"fwd" times one forward call. "fwd+bwd" times the forward, then the backward through q, k and v
of ``out.float().sum()``, plus ``colsum.sum()`` for the entries that return column sums (so their
backward goes through the column sums too). Inputs are made before timing; gradients are dropped
at the end of each timed call. An SDPA backend that rejects a shape is skipped with its reason.

Reading the ratio table printed after the run: on our entry ``x1.40 vs fused`` means it takes
1.4 times cuDNN's median time while also producing the column sums, which the fused entries do
not; ``x0.05 vs eager`` means 5% of the eager reference's time, which does produce them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mgh_kernels import ata_attention, reference
from mgh_kernels.attention import cudnn, tiles

try:
    import flash_attn
except ImportError:
    flash_attn = None

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPE = torch.bfloat16
EAGER_LIMIT_BYTES = 30e9


class Shape(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    length: int
    dim: int

    def label(self) -> str:
        if self.q_heads == self.kv_heads:
            heads = f"H{self.q_heads}"
        else:
            heads = f"Hq{self.q_heads} Hkv{self.kv_heads}"
        return f"B{self.batch} {heads} L{self.length} D{self.dim}"


MHA_SHAPES = [
    Shape(64, 32, 32, 256, 128),  # typical embedding inputs: the one-sweep forward by default
    Shape(32, 32, 32, 512, 128),
    Shape(8, 32, 32, 2048, 128),
    Shape(2, 32, 32, 8192, 128),
    Shape(32, 32, 32, 512, 64),
]
CASES = [(shape, causal) for shape in MHA_SHAPES for causal in (False, True)]
CASES.append((Shape(8, 32, 8, 2048, 128), False))


def case_id(case) -> str:
    shape, causal = case
    return f"{shape.label()} {'causal' if causal else 'bidir'}".replace(" ", "-")


# Each implementation maps (q, k, v, causal) to a tuple of outputs that the loss sums.


def _ours(q, k, v, causal):
    return ata_attention(q, k, v, causal=causal, return_colsum=True)


def _eager(q, k, v, causal):
    return reference.attention_with_colsum(q, k, v, causal=causal)


def _sdpa(q, k, v, causal):
    gqa = q.shape[1] != k.shape[1]
    return (F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),)


def _flash_attn(q, k, v, causal):
    return (flash_attn.flash_attn_func(q, k, v, causal=causal),)


IMPLS = {  # key: (entry name, role, implementation)
    "ours": ("ata_attention (out + colsum)", "ours", _ours),
    "ours_triton": ("ata_attention, Triton flash pass", "other", _ours),
    "ours_one_sweep": ("ata_attention, one-sweep forward", "other", _ours),
    "sdpa_cudnn": ("SDPA cuDNN backend (out only)", "fused", _sdpa),
    "sdpa_flash": ("SDPA flash backend (out only)", "other", _sdpa),
    "eager": ("eager reference (out + colsum)", "eager", _eager),
}
if flash_attn is not None:
    IMPLS["flash_attn"] = ("flash-attn flash_attn_func (out only)", "other", _flash_attn)
FORCED_FORWARD = {"ours_triton": 0, "ours_one_sweep": 512}  # SHORT_MAX_LENGTH's half limits, Triton flash pass
SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}


def eager_bytes(shape: Shape) -> int:
    """The eager reference's float32 scores and probabilities: about three B x Hq x L x L tensors."""
    return 3 * shape.batch * shape.q_heads * shape.length**2 * 4


def make_inputs(shape: Shape, device, *, blhd: bool, requires_grad: bool) -> list[torch.Tensor]:
    """q [B, Hq, L, D], k and v [B, Hkv, L, D]; transposed to [B, L, H, D] (flash-attn) if ``blhd``."""
    gen = torch.Generator(device=device).manual_seed(0)
    heads = (shape.q_heads, shape.kv_heads, shape.kv_heads)
    tensors = [
        torch.randn(shape.batch, h, shape.length, shape.dim, generator=gen, device=device, dtype=DTYPE) for h in heads
    ]
    if blhd:
        tensors = [t.transpose(1, 2).contiguous() for t in tensors]
    return [t.requires_grad_(requires_grad) for t in tensors]


def timed_call(attend, inputs, causal: bool, backward: bool):
    """The function to time: a forward call, or forward and backward with the gradients dropped."""
    if not backward:
        return lambda: attend(*inputs, causal)

    def step():
        loss = sum(t.float().sum() for t in attend(*inputs, causal))
        loss.backward()
        for t in inputs:
            t.grad = None

    return step


@contextlib.contextmanager
def forced_triton_forward(short_limit: int):
    """Our own forwards only inside the block: ``cudnn.FLASH_PASS`` "triton" and
    ``tiles.SHORT_MAX_LENGTH``'s half-precision limits (causal and bidirectional) at
    ``short_limit`` (0: the Triton flash pass then the column-sum pass; 512: the one sweep)."""
    keys = ("half", "half-bidirectional")
    saved_limits, saved_pass = {key: tiles.SHORT_MAX_LENGTH[key] for key in keys}, cudnn.FLASH_PASS
    tiles.SHORT_MAX_LENGTH.update(dict.fromkeys(keys, short_limit))
    cudnn.FLASH_PASS = "triton"
    try:
        yield
    finally:
        tiles.SHORT_MAX_LENGTH.update(saved_limits)
        cudnn.FLASH_PASS = saved_pass


def skip_if_rejected(fn, name: str) -> None:
    """Call ``fn`` once; if the SDPA backend rejects the shape, skip with its error and warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except RuntimeError as err:
            reasons = " ".join([str(err)] + [str(w.message) for w in caught])
            pytest.skip(f"{name}: {' '.join(reasons.split())}")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"], ids=["fwd", "fwd_bwd"])
def bench_attention(measure, device, part, case, impl):
    shape, causal = case
    name, role, attend = IMPLS[impl]
    if impl == "eager" and eager_bytes(shape) > EAGER_LIMIT_BYTES:
        pytest.skip(
            f"eager reference would store ~{eager_bytes(shape) / 1e9:.0f} GB of float32 L x L "
            f"tensors (limit {EAGER_LIMIT_BYTES / 1e9:.0f} GB)"
        )
    if impl == "ours_one_sweep" and shape.length > 512:
        pytest.skip("the one-sweep forward takes L <= 512 only")
    inputs = make_inputs(shape, device, blhd=impl == "flash_attn", requires_grad=part == "fwd+bwd")
    fn = timed_call(attend, inputs, causal, backward=part == "fwd+bwd")
    group = f"attention {part} {shape.label()} {'causal' if causal else 'bidir'}"
    backend = sdpa_kernel(SDPA_BACKENDS[impl]) if impl in SDPA_BACKENDS else contextlib.nullcontext()
    forward = forced_triton_forward(FORCED_FORWARD[impl]) if impl in FORCED_FORWARD else contextlib.nullcontext()
    with backend, forward:
        if impl in SDPA_BACKENDS:
            skip_if_rejected(fn, name)
        measure(fn, group=group, name=name, role=role)
