"""Where triton is not installed (macOS, Windows), ``import mgh_kernels`` works and every op runs
its PyTorch path, forward and backward, with the reference's results, and ATA pooling takes its
column sums. Checked in a child Python
whose import system refuses triton (a ``sys.meta_path`` finder), with ``TRITON_INTERPRET=1`` set
as the tests set it: without triton it must not matter."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib, importlib.abc, pkgutil, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())

import pytest
import torch
import mgh_kernels
from mgh_kernels import ata_attention, attention, backend, infonce, infonce_loss, reference, use_backend

assert not backend.TRITON_AVAILABLE

# Only the Triton kernel files need triton; every other module imports.
KERNEL_FILES = {"mgh_kernels.attention." + name
                for name in ("backward", "colsum", "forward", "masking", "varlen_kernels")}
KERNEL_FILES |= {"mgh_kernels.infonce." + name for name in ("backward", "forward", "logits")}
refused = set()
for module in pkgutil.walk_packages(mgh_kernels.__path__, "mgh_kernels."):
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as error:
        assert error.name == "triton", (module.name, error)
        refused.add(module.name)
assert refused == KERNEL_FILES, sorted(refused ^ KERNEL_FILES)

gen = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 19, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
k, v = (torch.randn(2, 2, 19, 16, generator=gen).requires_grad_() for _ in range(2))
mask = torch.ones(2, 19, dtype=torch.bool)
mask[1, :5] = False
out, colsum = ata_attention(q, k, v, causal=True, key_padding_mask=mask)
assert attention.last_backend() == "torch-chunked" and attention.last_forward() is None
truth = [t.detach().double().requires_grad_() for t in (q, k, v)]
want_out, want_colsum = reference.attention_with_colsum(*truth, causal=True, key_padding_mask=mask)
torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(colsum.double(), want_colsum, rtol=1e-5, atol=1e-5)
(out.sum() + colsum.square().sum()).backward()
(want_out.sum() + want_colsum.square().sum()).backward()
for got, want in zip((q, k, v), truth):
    torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)

a, p = (torch.randn(9, 24, generator=gen).requires_grad_() for _ in range(2))
n = torch.randn(9, 3, 24, generator=gen).requires_grad_()
loss = infonce_loss(a, p, n, tau=0.05)
assert infonce.last_backend() == "torch-chunked"
truth = [t.detach().double().requires_grad_() for t in (a, p, n)]
want = reference.infonce(*truth, tau=0.05)
torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
loss.backward()
want.backward()
for got, ref in zip((a, p, n), truth):
    torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)

hidden = torch.randn(2, 19, 8, generator=gen, dtype=torch.float64)
weights = colsum.detach().double() * mask
want = (weights[:, :, None] * hidden).sum(1) / weights.sum(1, keepdim=True)
torch.testing.assert_close(mgh_kernels.ata_pool(hidden, mask, colsum=colsum.detach().double()), want)

with pytest.raises(ValueError, match="^name: 'triton' needs the triton package"):
    with use_backend("triton"):
        pass
assert "triton" not in sys.modules
print("ok")
"""


def test_import_and_the_pytorch_path_without_triton():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stdout + child.stderr
