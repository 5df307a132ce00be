"""The test-only interpreter shortcut (tests/triton_interpreter.py): in effect under the interpreter,
it skips the helpers' re-patching, and the kernels give bit for bit what Triton's unchanged
interpreter gives."""

import os

import pytest
import torch

import triton_interpreter

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MGH_STOCK_INTERPRETER") == "1",
    reason="the shortcut is for Triton's interpreter (CPU runs)")


def kernel_outputs(seed):
    """ata_attention (forward, column sums, gradients) and infonce_loss (loss, gradients): kernels
    that call @triton.jit helpers in every program."""
    from mgh_kernels import ata_attention, infonce_loss

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=gen).requires_grad_() for _ in range(3))
    out, colsum = ata_attention(q, k, v, causal=True)
    (out.square().sum() + colsum.sum()).backward()
    emb = [torch.randn(*shape, generator=gen).requires_grad_() for shape in ((5, 24), (5, 24), (5, 2, 24))]
    loss = infonce_loss(*emb)
    loss.backward()
    return [t.detach().clone() for t in (out, colsum, q.grad, k.grad, v.grad, loss, *(e.grad for e in emb))]


def counted_run(monkeypatch, seed):
    """The outputs, the kernel launches and the number of ``_patch_lang`` calls of one run."""
    from triton.runtime import interpreter

    patchings, launches = [], []
    patch_lang, run = interpreter._patch_lang, interpreter.InterpretedFunction.run
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patchings.append(fn) or patch_lang(fn))
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        lambda self, *a, **kw: launches.append(self) or run(self, *a, **kw))
    outputs = kernel_outputs(seed)
    monkeypatch.undo()
    return outputs, len(launches), len(patchings)


def test_shortcut_skips_the_helpers_repatching_and_changes_no_result(monkeypatch, gen):
    assert triton_interpreter.installed(), "Triton's interpreter changed shape: see tests/triton_interpreter.py"
    seed = int(torch.randint(2**31, (1,), generator=gen))
    fast, launches, patchings = counted_run(monkeypatch, seed)
    triton_interpreter.uninstall()
    try:
        stock, stock_launches, stock_patchings = counted_run(monkeypatch, seed)
    finally:
        assert triton_interpreter.install()
    assert launches == stock_launches > 0
    # One patching per launch, plus one where a helper sees tl.core (tl.cdiv); Triton's own
    # interpreter patches again at every helper call of every program.
    assert patchings <= 2 * launches < stock_patchings
    assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))
