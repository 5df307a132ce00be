"""Padded positions cannot reach real ones, whatever they hold.

transformers leaves anything in the hidden states of padded tokens, so q, k and v there may hold
NaN or inf, and so may the gradients that come back for padded outputs (a downstream norm of a
zero row). On every path of ``ata_attention`` (the Triton forwards and backward under the
interpreter, the CPU sweeps with and without the native row pass, the chunked PyTorch path) the
outputs and gradients with NaN/inf at padding must equal, bit for bit, those with finite garbage
there, and those must match the eager reference; padded outputs and gradients stay zero.
"""

import pytest
import torch

from mgh_kernels import _native, ata_attention, attention, reference, use_backend
from mgh_kernels.attention import cpu_flash, cudnn, tiles

PATHS = ["one-sweep", "two-pass", "cpu-native", "cpu-torch-ops", "torch-chunked"]
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
CASES = [
    pytest.param(
        name, value, id=f"{name}-{value}", marks=[pytest.mark.slow] if value == "-inf" and name in PATHS[:2] else []
    )
    for name in PATHS
    for value in VALUES
]  # the interpreter's -inf cases: slow


@pytest.fixture
def path(request, monkeypatch):
    """Pins one path of ``ata_attention`` (parametrized indirectly); yields the backend name the
    call must report."""
    name = request.param
    monkeypatch.setattr(cudnn, "FLASH_PASS", "triton")
    for key in tiles.SHORT_MAX_LENGTH:
        monkeypatch.setitem(tiles.SHORT_MAX_LENGTH, key, 1 << 30 if name == "one-sweep" else 0)
    if name == "cpu-native" and _native.library() is None:
        pytest.skip(f"the native library is not available here: {_native.status()}")
    if name == "cpu-torch-ops":
        monkeypatch.setattr(_native, "ENABLED", False)
    if name == "torch-chunked":  # the PyTorch path a GPU without triton (or a compiled CPU call) takes
        monkeypatch.setattr(cpu_flash, "supports", lambda q: False)
    if name in ("one-sweep", "two-pass"):
        yield "triton" if torch.cuda.is_available() else "triton-interpreter"
    else:
        with use_backend("torch"):
            yield "torch-chunked"


def fill_padding(t, pad, value, gen):
    """t with its padded positions (``pad`` [B, L], dim 2 of [B, H, L, D] or dim 1 of [B, L])
    set to ``value``, or to large finite garbage for ``value`` None."""
    where = pad[:, None, :, None].expand_as(t) if t.dim() == 4 else pad
    garbage = torch.randn(t.shape, generator=gen) * 1e3 if value is None else torch.full(t.shape, value)
    return torch.where(where, garbage.to(t.dtype), t)


def run(q, k, v, w, c, mask, causal):
    """(out, colsum, dq, dk, dv) with upstream gradients w (for out) and c (for colsum)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    grads = torch.autograd.grad((out, colsum), (q, k, v), (w, c))
    return [out.detach(), colsum.detach(), *grads]


@pytest.mark.parametrize("path, value", CASES, indirect=["path"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_nonfinite_padding_changes_nothing(path, value, causal, gen):
    value = VALUES[value]
    batch, hq, hkv, length, dim = 2, 4, 2, 23, 16  # GQA; odd sizes
    q = torch.randn(batch, hq, length, dim, generator=gen)
    k, v = (torch.randn(batch, hkv, length, dim, generator=gen) for _ in range(2))
    w = torch.randn(batch, hq, length, dim, generator=gen)
    c = torch.randn(batch, length, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :5] = False  # left padding: under causal, padded queries see only padded keys
    mask[0, -3:] = False  # right padding
    pad = ~mask
    finite = [fill_padding(t, pad, None, gen) for t in (q, k, v, w, c)]
    poisoned = [fill_padding(t, pad, value, gen) for t in (q, k, v, w, c)]
    got = run(*poisoned, mask, causal)
    assert attention.last_backend() == path
    same = run(*finite, mask, causal)
    names = ["out", "colsum", "dq", "dk", "dv"]
    for name, a, b in zip(names, got, same):
        assert a.isfinite().all(), f"{name}: non-finite values with {value} at padding"
        assert torch.equal(a, b), f"{name}: {value} at padding gives other values than finite garbage there"

    truth = [t.detach().double().requires_grad_() for t in finite[:3]]
    out, colsum = reference.attention_with_colsum(*truth, causal=causal, key_padding_mask=mask)
    zeroed = [fill_padding(t, pad, 0.0, gen).double() for t in finite[3:]]  # padded outputs are constant
    want = [out.detach(), colsum.detach(), *torch.autograd.grad((out, colsum), truth, zeroed)]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    rows = pad[:, None, :, None]
    assert (got[0] * 0 == 0).all() and (got[0].masked_select(rows) == 0).all()  # padded queries: zero rows
    assert (got[1][pad] == 0).all()
    for name, grad in zip(["dq", "dk", "dv"], got[2:]):
        assert (grad.masked_select(rows) == 0).all(), f"{name}: non-zero gradient at padding"
