"""``ata_attention`` on the CPU's PyTorch path (``attention/cpu_flash.py``): outputs and gradients
against the float64 reference, by flash-attention's rule (at most twice the error of PyTorch's
eager attention in the same precision, plus a small absolute term)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgh_kernels import _scratch, _tasks, ata_attention, attention, reference, use_backend
from mgh_kernels.attention import cpu_flash
from random_inputs import padding_mask

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

SHAPES = [
    # B, Hq, Hkv, L, D
    (1, 1, 1, 1, 16),
    (2, 4, 2, 23, 24),  # GQA, odd sizes
    (3, 3, 1, 40, 32),  # MQA, several row blocks
    (2, 2, 2, 70, 64),  # row blocks that do not divide L
]


def eager(q, k, v, causal, mask, scale):
    """PyTorch's eager attention in the inputs' own dtype (out, colsum): the error baseline."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    length = q.shape[2]
    allowed = mask[:, None, None, :].expand(q.shape[0], 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(((q @ k.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs * mask[:, None, :, None].to(probs.dtype)
    return probs @ v, probs.sum(2).mean(1)


def run(fn, q, k, v, w, c):
    """(out, colsum, dq, dk, dv) of sum(out * w) + sum(colsum * c), all float64."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, colsum = fn(q, k, v)
    ((out.double() * w).sum() + (colsum.double() * c).sum()).backward()
    return [out.double(), colsum.double()] + [t.grad.double() for t in (q, k, v)]


@pytest.fixture(autouse=True)
def both_row_passes(row_passes):
    """Every test here runs on both implementations of the sweeps' row passes (conftest)."""
    return row_passes


@pytest.fixture(params=[(8, None), (32, 1)], ids=["rows8", "rows32-one-head"])
def rows(request, monkeypatch):
    """Small blocks, so several row blocks (and, with one element's budget, one head a block) run."""
    rows, elements = request.param
    monkeypatch.setattr(cpu_flash, "ROWS", rows)
    if elements is not None:
        monkeypatch.setattr(cpu_flash, "BLOCK_ELEMENTS", elements)
    return rows


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_outputs_and_gradients_within_the_rule(shape, causal, side, dtype, rows, gen):
    batch, hq, hkv, length, dim = shape
    q = torch.randn(batch, hq, length, dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, hkv, length, dim, generator=gen).to(dtype) for _ in range(2))
    mask = padding_mask(batch, length, side, gen)
    check_against_float64(q, k, v, mask, causal, gen)


def check_against_float64(q, k, v, mask, causal, gen):
    """ata_attention's torch path: out, colsum and the gradients within the rule; zeros at padding."""
    (batch, hq, length, dim), dtype = q.shape, q.dtype
    w = torch.randn(batch, hq, length, dim, generator=gen, dtype=torch.float64)
    c = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    scale = dim**-0.5
    with use_backend("torch"):
        ours = run(lambda *a: ata_attention(*a, causal=causal, key_padding_mask=mask), q, k, v, w, c)
    assert attention.last_backend() == "torch-chunked"
    truth = run(
        lambda *a: reference.attention_with_colsum(*a, causal=causal, key_padding_mask=mask),
        q.double(),
        k.double(),
        v.double(),
        w,
        c,
    )
    base = run(lambda *a: eager(*a, causal, mask, scale), q, k, v, w, c)
    for name, got, want, own in zip(["out", "colsum", "dq", "dk", "dv"], ours, truth, base):
        err, own_err = (got - want).abs().max().item(), (own - want).abs().max().item()
        bound = 2 * own_err + ATOL[dtype] * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} against float64, eager's {own_err:.3g}"
    assert (ours[0][~mask[:, None, :, None].expand_as(ours[0])] == 0).all()  # padded queries: zero rows
    assert (ours[1][~mask] == 0).all()


@pytest.mark.parametrize("use", ["out", "colsum"])
def test_gradients_when_only_one_output_is_used(use, gen):
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = padding_mask(2, 37, "left", gen)
    with use_backend("torch"):
        out, colsum = ata_attention(q, k, v, causal=True, key_padding_mask=mask)
    want_out, want_colsum = reference.attention_with_colsum(q, k, v, causal=True, key_padding_mask=mask)
    got = torch.autograd.grad((out if use == "out" else colsum).square().sum(), (q, k, v), allow_unused=True)
    want = torch.autograd.grad(
        (want_out if use == "out" else want_colsum).square().sum(), (q, k, v), allow_unused=True
    )  # the column sums do not depend on v
    for g, w, t in zip(got, want, (q, k, v)):
        torch.testing.assert_close(
            g if g is not None else torch.zeros_like(t),
            w if w is not None else torch.zeros_like(t),
            rtol=1e-9,
            atol=1e-10,
        )


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_never_holds_the_batch_scores(causal, gen):
    """Forward and backward hold one block of rows' scores at a time, never B x H x L x L."""
    batch, heads, length, dim = 2, 4, 512, 16
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, requires_grad=True) for _ in range(3))
    with use_backend("torch"), LargestTensor() as seen:
        out, colsum = ata_attention(q, k, v, causal=causal)
        (out.sum() + colsum.sum()).backward()
    block = max(cpu_flash.BLOCK_ELEMENTS, cpu_flash.ROWS * length)
    assert seen.largest <= block < batch * heads * length * length


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["none", "left"])
def test_does_not_read_stale_scratch(causal, side, gen):
    """The sweeps' score blocks are reused scratch buffers (``_scratch``): NaN left in
    them changes nothing (forward and backward), and a call's results stay intact when a later
    call reuses the buffers."""
    q, k, v = (torch.randn(2, 3, 45, 16, generator=gen) for _ in range(3))
    mask = None if side == "none" else padding_mask(2, 45, side, gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with use_backend("torch"):
            out, colsum = ata_attention(*leaves, causal=causal, key_padding_mask=mask)
        (out.sum() + colsum.sum()).backward()
        return [out, colsum] + [t.grad for t in leaves]

    _scratch.release()
    clean = run()
    kept = [t.clone() for t in clean]
    for slot in range(_tasks.threads()):  # one score buffer per thread of the sweep
        _scratch.scratch(f"attention.scores.{slot}", (cpu_flash.BLOCK_ELEMENTS,), torch.float32, "cpu").fill_(
            float("nan")
        )
    stale = run()
    for a, b, c in zip(clean, stale, kept):
        assert torch.equal(a, b) and torch.equal(a, c)
