"""ata_attention_varlen against the float64 reference and against the padded ata_attention.

Both paths are pinned: the Triton kernels (under TRITON_INTERPRET=1 without a GPU) and the PyTorch
path (each text through the CPU attention). Tolerances as in test_attention: the error against a
float64 reference at most twice PyTorch's own eager error in the same precision, plus a small
absolute term. Lengths are odd, include 1 and an empty sequence, never a multiple of the tiles.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgh_kernels import ata_attention, ata_attention_varlen, reference, testing, trusted_inputs, use_backend
from mgh_kernels.attention import varlen
from test_attention import CUDA, DEVICE, DTYPES, assert_within_rule, eager_same_precision

PATHS = ["kernels", "torch"]
KERNEL_PATH = "triton" if CUDA else "triton-interpreter"


@pytest.fixture(autouse=True)
def poisoned_outputs():
    with testing.poisoned_outputs() as allocated:
        yield allocated


def cu_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def packed_inputs(lengths, hq, hkv, dim, dtype, gen, requires_grad=False):
    """(low-precision q, k, v on DEVICE, their float64 copies) in the packed layout [total, H, D]."""
    total = sum(lengths)
    made = [torch.randn(total, h, dim, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv)]
    low = [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in made]
    truth = [t.detach().double().requires_grad_(requires_grad) for t in low]
    return low, truth


def run_path(path, *args, **kwargs):
    with use_backend("torch" if path == "torch" else "auto"):
        result = ata_attention_varlen(*args, **kwargs)
    assert varlen.last_backend() == ("torch-chunked" if path == "torch" else KERNEL_PATH)
    return result


def eager_varlen(q, k, v, lengths, causal, scale):
    """PyTorch's eager attention in the inputs' own precision, text by text: the error baseline."""
    outs, sums, start = [], [], 0
    for n in lengths:
        if n:
            out, colsum = eager_same_precision(
                *(t[None, start : start + n].transpose(1, 2) for t in (q, k, v)), causal, None, scale
            )
            outs.append(out[0].transpose(0, 1))
            sums.append(colsum[0])
        start += n
    return torch.cat(outs), torch.cat(sums)


CASES = [
    # lengths, Hq, Hkv, D
    ([1], 1, 1, 16),  # a single token
    ([5, 17, 1, 33], 4, 2, 24),  # GQA, odd lengths, a length-1 text, D not a power of two
    ([19, 0, 3, 40], 3, 1, 32),  # MQA, an empty text, a text over two key tiles
    ([7, 7, 2], 2, 2, 80),  # head dim 80: a 128-wide tile
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-H{}/{}-D{}".format("_".join(map(str, c[0])), *c[1:]))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_forward_matches_reference(case, causal, dtype, path, gen):
    lengths, hq, hkv, dim = case
    (q, k, v), (q64, k64, v64) = packed_inputs(lengths, hq, hkv, dim, dtype, gen)
    cu = cu_of(lengths)
    out, colsum = run_path(path, q, k, v, cu, max(lengths), causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert colsum.dtype == torch.float32 and colsum.shape == (sum(lengths),)
    want_out, want_colsum = reference.attention_varlen_with_colsum(q64, k64, v64, cu, max(lengths), causal=causal)
    base_out, base_colsum = eager_varlen(q, k, v, lengths, causal, 1 / math.sqrt(dim))
    assert_within_rule(out, base_out, want_out, dtype, "out")
    assert_within_rule(colsum, base_colsum, want_colsum, dtype, "colsum")
    # each text's column sums total its number of queries: nothing leaks across texts
    per_text = torch.stack([c.sum() for c in colsum.double().split(lengths)])
    torch.testing.assert_close(
        per_text, torch.tensor(lengths, dtype=torch.float64, device=DEVICE), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("case", CASES[1:3], ids=lambda c: "L{}-H{}/{}-D{}".format("_".join(map(str, c[0])), *c[1:]))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_gradients_through_out_and_colsum(case, causal, dtype, path, gen):
    lengths, hq, hkv, dim = case
    (q, k, v), (q64, k64, v64) = packed_inputs(lengths, hq, hkv, dim, dtype, gen, requires_grad=True)
    base_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    cu = cu_of(lengths)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_col = torch.randn(sum(lengths), generator=gen, dtype=torch.float64).to(DEVICE)

    def loss(out, colsum):
        return (out.double() * w_out).sum() + (colsum.double() * w_col).sum()

    loss(*run_path(path, q, k, v, cu, max(lengths), causal=causal)).backward()
    loss(*reference.attention_varlen_with_colsum(q64, k64, v64, cu, max(lengths), causal=causal)).backward()
    loss(*eager_varlen(*base_inputs, lengths, causal, 1 / math.sqrt(dim))).backward()
    for name, got, base, want in zip("qkv", (q, k, v), base_inputs, (q64, k64, v64)):
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        assert_within_rule(got.grad, base.grad, want.grad, dtype, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-H{}/{}-D{}".format("_".join(map(str, c[0])), *c[1:]))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_forward_without_colsum_matches_reference(case, causal, dtype, path, gen):
    """Without column sums the PyTorch path runs SDPA per text: the same rule as with them."""
    lengths, hq, hkv, dim = case
    (q, k, v), (q64, k64, v64) = packed_inputs(lengths, hq, hkv, dim, dtype, gen)
    out, colsum = run_path(path, q, k, v, cu_of(lengths), max(lengths), causal=causal, return_colsum=False)
    assert colsum is None and out.dtype == dtype and out.shape == q.shape
    want_out, _ = reference.attention_varlen_with_colsum(q64, k64, v64, cu_of(lengths), max(lengths), causal=causal)
    base_out, _ = eager_varlen(q, k, v, lengths, causal, 1 / math.sqrt(dim))
    assert_within_rule(out, base_out, want_out, dtype, "out")


@pytest.mark.parametrize("path", PATHS)
def test_gradients_without_colsum(path, gen):
    lengths = [6, 1, 21]
    (q, k, v), (q64, k64, v64) = packed_inputs(lengths, 4, 2, 16, torch.float32, gen, requires_grad=True)
    out, colsum = run_path(path, q, k, v, cu_of(lengths), 21, causal=True, return_colsum=False)
    assert colsum is None
    w = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (out.double() * w).sum().backward()
    want, _ = reference.attention_varlen_with_colsum(q64, k64, v64, cu_of(lengths), 21, causal=True)
    (want * w).sum().backward()
    for got, ref in zip((q, k, v), (q64, k64, v64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_under_torch_compile_runs_eagerly_with_the_same_values(gen):
    """Under torch.compile the call is a graph break that runs eagerly (``torch.compiler.disable``,
    applied at the first call): on that first call as on later ones, the same outputs and
    gradients as the plain call, with the ops around it still compiled."""
    import torch._dynamo.testing

    lengths = [6, 1, 21]
    (q, k, v), _ = packed_inputs(lengths, 4, 2, 16, torch.float32, gen, requires_grad=True)
    fresh = varlen._eager_under_compile(ata_attention_varlen.__wrapped__)  # not yet called in this process

    def step(attention, q, k, v):
        out, colsum = attention(q * 0.5, k, v, cu_of(lengths), 21, causal=True)
        return (out.sum(-1) * colsum[:, None]).sum()

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter)
    with use_backend("torch"):
        want = torch.autograd.grad(step(ata_attention_varlen, q, k, v), (q, k, v))
        for _ in range(2):  # the first call under compile, then the compiled frames again
            got = torch.autograd.grad(compiled(fresh, q, k, v), (q, k, v))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.frame_count >= 2 and counter.op_count >= 2  # the multiply before, the sum after


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("path", PATHS)
def test_equals_padded_attention_on_the_same_texts(causal, path, gen):
    """The packed texts, padded into a [B, H, L, D] batch (right padding), through ata_attention:
    the same outputs, column sums and gradients, token by token."""
    lengths = [9, 1, 26, 4]
    (q, k, v), _ = packed_inputs(lengths, 4, 2, 16, torch.float32, gen, requires_grad=True)
    cu = cu_of(lengths)
    longest, batch = max(lengths), len(lengths)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    padded = []
    for t in (q, k, v):
        box = torch.zeros(batch, longest, *t.shape[1:], dtype=t.dtype, device=DEVICE)
        box[mask] = t.detach()
        padded.append(box.transpose(1, 2).contiguous().requires_grad_())
    w_out = torch.randn(q.shape, generator=gen).to(DEVICE)
    w_col = torch.randn(sum(lengths), generator=gen).to(DEVICE)

    out, colsum = run_path(path, q, k, v, cu, longest, causal=causal)
    ((out * w_out).sum() + (colsum * w_col).sum()).backward()
    with use_backend("torch" if path == "torch" else "auto"):
        p_out, p_colsum = ata_attention(*padded, causal=causal, key_padding_mask=mask)
    p_out = p_out.transpose(1, 2)[mask]
    p_colsum = p_colsum[mask]
    ((p_out * w_out).sum() + (p_colsum * w_col).sum()).backward()
    torch.testing.assert_close(out, p_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum, p_colsum, rtol=1e-5, atol=1e-5)
    for got, box in zip((q, k, v), padded):
        torch.testing.assert_close(got.grad, box.grad.transpose(1, 2)[mask], rtol=1e-4, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any floating-point tensor an op returns inside the block (Triton's
    interpreter copies argument storages as uint8 bytes: not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("path", PATHS)
def test_never_allocates_total_squared(path, gen):
    """Many short texts: any total x total tensor (a block-diagonal mask, say) would be the largest
    allocation by far; the largest allowed is the inputs themselves or one text's scores."""
    lengths = [3, 30, 11, 1, 25, 8, 30, 17, 9, 30, 2, 14, 20]
    total = sum(lengths)
    (q, k, v), _ = packed_inputs(lengths, 2, 1, 16, torch.float32, gen, requires_grad=True)
    with LargestTensor() as seen:
        out, colsum = run_path(path, q, k, v, cu_of(lengths), 30, causal=True)
        (out.sum() + colsum.sum()).backward()
    assert seen.largest > 0
    assert seen.largest < total * total, (seen.largest, total)
    assert seen.largest <= max(q.numel() * 2, 2 * 2 * 30 * 30), seen.largest


def test_kernel_outputs_are_all_written(poisoned_outputs, gen):
    """Every kernel output starts as NaN (poisoned) and none survives, with an empty text too."""
    lengths = [4, 0, 13, 1]
    (q, k, v), _ = packed_inputs(lengths, 2, 2, 16, torch.float32, gen, requires_grad=True)
    out, colsum = run_path("kernels", q, k, v, cu_of(lengths), 13, causal=False)
    (out.sum() + colsum.sum()).backward()
    assert poisoned_outputs
    for t in (out, colsum, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def test_cu_seqlens_on_the_device_skips_value_checks_when_trusted(gen):
    """cu_seqlens may live on q's device; its values are then read (a sync) only outside
    trusted_inputs. On the CPU it is host data and always checked."""
    lengths = [3, 5]
    (q, k, v), _ = packed_inputs(lengths, 2, 2, 16, torch.float32, gen)
    cu = cu_of(lengths).to(DEVICE)
    with trusted_inputs():
        out, _ = ata_attention_varlen(q, k, v, cu, 5)
    want, _ = ata_attention_varlen(q, k, v, cu_of(lengths), 5)
    torch.testing.assert_close(out, want)


def _args(**change):
    args = dict(
        q=torch.randn(8, 2, 16),
        k=torch.randn(8, 2, 16),
        v=torch.randn(8, 2, 16),
        cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
        max_seqlen=5,
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, argument, expected",
    [
        (dict(cu_seqlens=torch.tensor([0, 3, 8])), "cu_seqlens", "torch.int32"),
        (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), "cu_seqlens", "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "cu_seqlens", "end at total = 8"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "cu_seqlens", "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "cu_seqlens", "at least two"),
        (dict(cu_seqlens=torch.tensor([[0, 8]], dtype=torch.int32)), "cu_seqlens", "1 dimensions"),
        (dict(max_seqlen=4), "max_seqlen", "longest sequence's length 5"),
        (dict(max_seqlen=5.0), "max_seqlen", "positive int"),
        (dict(max_seqlen=None), "max_seqlen", "positive int"),
        (dict(q=torch.randn(1, 8, 2, 16)), "q", "[total, Hq, D]"),
        (dict(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16)), "k", "divides"),
        (dict(k=torch.randn(7, 2, 16), v=torch.randn(7, 2, 16)), "k", "total tokens"),
        (
            dict(
                q=torch.randn(8, 2, 300),
                k=torch.randn(8, 2, 300),
                v=torch.randn(8, 2, 300),
            ),
            "q",
            "D <= 256",
        ),
    ],
)
def test_bad_input_names_argument(change, argument, expected):
    with pytest.raises(ValueError) as info:
        ata_attention_varlen(**_args(**change))
    assert str(info.value).startswith(argument + ":") and expected in str(info.value), str(info.value)
