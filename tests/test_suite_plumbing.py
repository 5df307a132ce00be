"""The test suite's own plumbing: the interpreter shortcut (tests/triton_interpreter.py) is in
effect and changes no result; the pairwise subsets of the largest grids (tests/grids.py) hold every
pair of values, and name tests that exist; the README says how to run what the default run leaves out."""

import ast
import itertools
import os
from pathlib import Path

import pytest
import torch

import grids
import triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("MGH_STOCK_INTERPRETER") == "1",
    reason="the shortcut is for Triton's interpreter (CPU runs)",
)


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
    monkeypatch.setattr(
        interpreter.InterpretedFunction, "run", lambda self, *a, **kw: launches.append(self) or run(self, *a, **kw)
    )
    outputs = kernel_outputs(seed)
    monkeypatch.undo()
    return outputs, len(launches), len(patchings)


@INTERPRETER
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


@pytest.mark.parametrize("sizes", [(6, 2, 3, 2, 2), (3, 3, 2, 3, 2), (2, 2), (5,), (4, 1, 3)])
def test_pairwise_cover_holds_every_pair_and_is_smaller(sizes):
    names = [f"p{i}" for i in range(len(sizes))]
    cases = [dict(zip(names, values)) for values in itertools.product(*(range(n) for n in sizes))]
    kept = grids.pairwise_cover(cases)
    assert kept == sorted(set(kept)) and kept == grids.pairwise_cover(cases)  # the same in every process
    for a, b in itertools.combinations(range(len(names)), 2):
        seen = {(cases[i][names[a]], cases[i][names[b]]) for i in kept}
        assert seen == set(itertools.product(range(sizes[a]), range(sizes[b]))), (a, b)
    assert {cases[i][names[0]] for i in kept} == set(range(sizes[0]))
    # No cover is smaller than the two largest parameters' product; greedy stays within twice that.
    first, second = sorted((1, *sizes))[-2:]
    assert len(kept) <= 2 * first * second


def test_pairwise_grids_name_parametrised_tests_that_exist():
    for name in sorted(grids.PAIRWISE_GRIDS):
        path, function = name.split("::")
        tree = ast.parse((ROOT / path).read_text())
        found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function]
        assert found, f"{name}: no such test (tests/grids.py PAIRWISE_GRIDS)"


def test_readme_says_how_to_run_the_slow_tests():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "pytest -m slow" in text and "PAIRWISE_GRIDS" in text
