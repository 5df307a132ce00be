"""ata_attention against the reference: forward, column sums and gradients, every path pinned.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (float32, float16); with one, the
same tests also run bfloat16 on CUDA. The forward and gradient tests run through both forwards
(the one-sweep kernel of short sequences and the two-pass flash + column-sum kernels).
Tolerances follow flash-attention's rule: the kernel's error against a float64 reference is at
most twice PyTorch's own eager error in the same precision, plus a small absolute term.
"""

import math

import pytest
import torch
import triton

from mgh_kernels import ata_attention, attention, backend, reference, testing, use_backend
from mgh_kernels.attention import cudnn, tiles
from random_inputs import padding_mask

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the test;
    the list of the allocated shapes."""
    with testing.poisoned_outputs() as allocated:
        yield allocated


def set_short_limit(patch, limit):
    """Every ``tiles.SHORT_MAX_LENGTH`` limit set to ``limit`` (0: the one-sweep forward off)."""
    for key in tiles.SHORT_MAX_LENGTH:
        patch.setitem(tiles.SHORT_MAX_LENGTH, key, limit)


@pytest.fixture(params=["one-sweep", "two-pass"])
def forward_path(request, monkeypatch):
    """Run the test through each of our forwards: the one-sweep kernel of short sequences, or our
    flash pass plus the column-sum pass (cuDNN's flash pass is off here: see the cuDNN tests below),
    and check afterwards that every forward took the requested one."""
    monkeypatch.setattr(cudnn, "FLASH_PASS", "triton")
    set_short_limit(monkeypatch, 1 << 30 if request.param == "one-sweep" else 0)
    chosen, one_sweep_tiles = [], tiles.one_sweep_tiles

    def recording(*args):
        chosen.append(one_sweep_tiles(*args))
        return chosen[-1]

    monkeypatch.setattr(tiles, "one_sweep_tiles", recording)
    yield request.param
    assert chosen, "no forward asked for the column sums"
    assert all((cfg is not None) == (request.param == "one-sweep") for cfg in chosen), chosen


def eager_same_precision(q, k, v, causal, mask, scale):
    """PyTorch's eager attention computed in the inputs' own dtype: the error baseline."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    length = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(q.shape[0], 1, length, length, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if mask is not None:
        probs = probs * mask[:, None, :, None].to(probs.dtype)
    return probs @ v, probs.sum(2).mean(1)


def make_inputs(shape, dtype, gen, requires_grad=False):
    batch, hq, hkv, length, dim = shape
    q = torch.randn(batch, hq, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, length, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, length, dim, generator=gen, dtype=torch.float64)
    low = [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    # The float64 truth sees exactly the rounded inputs the kernel sees.
    truth = [t.detach().double().requires_grad_(requires_grad) for t in low]
    return low, truth


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(got, baseline, truth, dtype, what):
    err, ref_err = max_err(got, truth), max_err(baseline, truth)
    assert err <= 2 * ref_err + ATOL[dtype], f"{what}: kernel error {err:.3g} vs PyTorch's {ref_err:.3g}"


FORWARD_SHAPES = [
    # B, Hq, Hkv, L, D
    (1, 1, 1, 1, 16),  # L = 1
    (2, 4, 2, 23, 24),  # GQA, L not a multiple of the block, D not a power of two
    (1, 3, 1, 40, 32),  # MQA, three key blocks
    (2, 2, 2, 16, 64),  # exactly one block
    (1, 2, 2, 33, 128),
    (1, 4, 2, 19, 80),  # head dim 80 (and 96 below): padded to a 128-wide tile
]


@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=lambda s: "B{}-H{}/{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["none", "left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(shape, causal, side, dtype, gen, forward_path):
    (q, k, v), (q64, k64, v64) = make_inputs(shape, dtype, gen)
    mask = None if side == "none" else padding_mask(shape[0], shape[3], side, gen).to(DEVICE)
    scale = 1 / math.sqrt(shape[4])
    out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert attention.last_backend() == ("triton" if CUDA else "triton-interpreter")
    assert out.dtype == dtype and out.shape == q.shape
    assert colsum.dtype == torch.float32 and colsum.shape == (shape[0], shape[3])
    want_out, want_colsum = reference.attention_with_colsum(q64, k64, v64, causal=causal, key_padding_mask=mask)
    base_out, base_colsum = eager_same_precision(q, k, v, causal, mask, scale)
    assert_within_rule(out, base_out, want_out, dtype, "out")
    assert_within_rule(colsum, base_colsum, want_colsum, dtype, "colsum")
    if mask is not None:
        assert (colsum[~mask] == 0).all()
        assert (out.transpose(1, 2)[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_row_with_one_valid_token(causal, side, gen, forward_path):
    (q, k, v), (q64, k64, v64) = make_inputs((3, 2, 1, 21, 16), torch.float32, gen)
    mask = padding_mask(3, 21, "one", gen).to(DEVICE)
    if side == "left":
        mask = mask.flip(1)
    out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    want_out, want_colsum = reference.attention_with_colsum(q64, k64, v64, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    # The single real token receives all the attention of its single query.
    torch.testing.assert_close(colsum, torch.ones(3, device=DEVICE)[:, None] * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(colsum.double(), want_colsum, rtol=1e-6, atol=1e-6)


GRAD_SHAPES = [(1, 1, 1, 1, 16), (2, 4, 2, 23, 24), (1, 2, 1, 33, 32), (1, 2, 2, 21, 96)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "B{}-H{}/{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_through_out_and_colsum(shape, causal, side, dtype, gen, forward_path):
    (q, k, v), (q64, k64, v64) = make_inputs(shape, dtype, gen, requires_grad=True)
    base_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = padding_mask(shape[0], shape[3], side, gen).to(DEVICE)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_col = torch.randn(shape[0], shape[3], generator=gen, dtype=torch.float64).to(DEVICE)

    def loss(out, colsum):
        return (out.double() * w_out).sum() + (colsum.double() * w_col).sum()

    loss(*ata_attention(q, k, v, causal=causal, key_padding_mask=mask)).backward()
    loss(*reference.attention_with_colsum(q64, k64, v64, causal=causal, key_padding_mask=mask)).backward()
    loss(*eager_same_precision(*base_inputs, causal, mask, 1 / math.sqrt(shape[4]))).backward()
    for name, got, base, want in zip("qkv", (q, k, v), base_inputs, (q64, k64, v64)):
        assert got.grad.dtype == dtype
        assert_within_rule(got.grad, base.grad, want.grad, dtype, f"d{name}")


@pytest.mark.parametrize("use", ["out only", "colsum only"])
def test_gradients_when_only_one_output_is_used(use, gen, forward_path):
    (q, k, v), (q64, k64, v64) = make_inputs((2, 2, 1, 19, 16), torch.float32, gen, requires_grad=True)
    mask = padding_mask(2, 19, "left", gen).to(DEVICE)
    for args in ((q, k, v), (q64, k64, v64)):
        fn = ata_attention if args[0].dtype == torch.float32 else reference.attention_with_colsum
        out, colsum = fn(*args, causal=True, key_padding_mask=mask)
        (out.double().square().sum() if use == "out only" else colsum.double().square().sum()).backward()
    for got, want in zip((q, k, v), (q64, k64, v64)):
        # The column sums do not depend on v: autograd leaves its gradient None, the kernel zero.
        want_grad = torch.zeros_like(want) if want.grad is None else want.grad
        torch.testing.assert_close(got.grad.double(), want_grad, rtol=1e-4, atol=1e-5)


def test_no_colsum_and_explicit_scale(gen):
    (q, k, v), (q64, k64, v64) = make_inputs((1, 2, 2, 18, 16), torch.float32, gen)
    out, colsum = ata_attention(q, k, v, causal=False, scale=0.3, return_colsum=False)
    assert colsum is None
    want, _ = reference.attention_with_colsum(q64, k64, v64, causal=False, scale=0.3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_noncontiguous_inputs_and_integer_mask(gen):
    """Strided q/k/v, as transformers hands them over ([B, L, H, D] transposed)."""
    blhd = torch.randn(2, 20, 4, 16, generator=gen).to(DEVICE)
    q = blhd.transpose(1, 2)
    k = v = blhd[:, :, :2].transpose(1, 2)
    assert not q.is_contiguous()
    mask = padding_mask(2, 20, "right", gen).to(DEVICE)
    out, colsum = ata_attention(q, k, v, causal=True, key_padding_mask=mask.long())
    want_out, want_colsum = reference.attention_with_colsum(q, k, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum, want_colsum, rtol=1e-5, atol=1e-5)


def test_never_allocates_length_squared(poisoned_outputs, gen):
    (q, k, v), _ = make_inputs((1, 2, 1, 48, 16), torch.float32, gen, requires_grad=True)
    out, colsum = ata_attention(q, k, v, causal=False)
    (out.sum() + colsum.sum()).backward()
    assert poisoned_outputs  # the kernels' outputs are all poisoned (testing.poisoned_outputs)
    for shape in poisoned_outputs:
        assert math.prod(shape) <= 2 * 48 * 16, shape


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gradients_with_return_colsum_false(causal, gen):
    """return_colsum=False still differentiates through out: the backward without a column-sum
    gradient, reached only this way (and without column sums the flash pass alone runs: next test)."""
    (q, k, v), (q64, k64, v64) = make_inputs((2, 4, 2, 23, 24), torch.float32, gen, requires_grad=True)
    mask = padding_mask(2, 23, "left", gen).to(DEVICE)
    out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask, return_colsum=False)
    assert colsum is None
    w = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (out.double() * w).sum().backward()
    want, _ = reference.attention_with_colsum(q64, k64, v64, causal=causal, key_padding_mask=mask)
    (want * w).sum().backward()
    for got, ref in zip((q, k, v), (q64, k64, v64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


def test_no_colsum_runs_the_flash_pass_alone(gen, monkeypatch):
    """Without column sums the one-sweep forward (which computes them) is not taken."""
    monkeypatch.setattr(cudnn, "FLASH_PASS", "triton")
    set_short_limit(monkeypatch, 1 << 30)
    (q, k, v), _ = make_inputs((1, 2, 2, 18, 16), torch.float32, gen)
    ata_attention(q, k, v, causal=True, return_colsum=False)
    assert attention.last_forward() == "triton-flash"
    ata_attention(q, k, v, causal=True)
    assert attention.last_forward() == "one-sweep"


def assert_matches_reference(q, k, v, truth, causal, mask, gen):
    """float32 ``ata_attention`` against the float64 reference on the same inputs (``truth``, leaves
    that require grad): out, colsum, and the gradients of a random weighting of both."""
    out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    want_out, want_colsum = reference.attention_with_colsum(*truth, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum.double(), want_colsum, rtol=1e-5, atol=1e-5)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_col = torch.randn(colsum.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ((out.double() * w_out).sum() + (colsum.double() * w_col).sum()).backward()
    ((want_out * w_out).sum() + (want_colsum * w_col).sum()).backward()
    for got, ref in zip((q, k, v), truth):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_head_dim_256(causal, gen):
    """The largest head dim accepted (a 256-wide tile), forward and backward."""
    (q, k, v), truth = make_inputs((1, 2, 1, 20, 256), torch.float32, gen, requires_grad=True)
    assert_matches_reference(q, k, v, truth, causal, padding_mask(1, 20, "right", gen).to(DEVICE), gen)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["M32-N16", "M16-N32"])
@pytest.mark.parametrize("path", ["one-sweep", "two-pass"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_unequal_query_and_key_tiles(blocks, path, causal, gen, monkeypatch):
    """Every kernel with BLOCK_M != BLOCK_N, as the GPU tiles have them: the interpreter's default
    tiles are square, where a query/key block mixup in a causal bound cannot show."""
    block_m, block_n = blocks
    length = 45  # a multiple of neither tile
    monkeypatch.setattr(cudnn, "FLASH_PASS", "triton")
    set_short_limit(monkeypatch, 1 << 30 if path == "one-sweep" else 0)
    # On CPU the column-sum and backward tiles are the flash pass's (tiles.colsum_tiles, backward_tiles).
    flash_tiles, one_sweep_tiles = tiles.flash_tiles, tiles.one_sweep_tiles
    monkeypatch.setattr(tiles, "flash_tiles", lambda *args: dict(flash_tiles(*args), BLOCK_M=block_m, BLOCK_N=block_n))
    if path == "one-sweep":
        monkeypatch.setattr(
            tiles,
            "one_sweep_tiles",
            lambda device, dim, dtype, length, causal=True: dict(
                one_sweep_tiles(device, dim, dtype, length, causal),
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                CHUNKS=triton.cdiv(length, block_n),
            ),
        )
    (q, k, v), truth = make_inputs((2, 4, 2, length, 24), torch.float32, gen, requires_grad=True)
    assert_matches_reference(q, k, v, truth, causal, padding_mask(2, length, "left", gen).to(DEVICE), gen)
    assert attention.last_forward() == ("one-sweep" if path == "one-sweep" else "triton-flash")


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_k_and_v_in_different_layouts(causal, gen, forward_path):
    """k contiguous [B, H, L, D], q and v [B, L, H, D] transposed: each kernel reads v through v's
    own strides (elsewhere k and v share theirs)."""
    (q, k, v), truth = make_inputs((2, 4, 2, 23, 24), torch.float32, gen)
    q, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, v))
    k.requires_grad_()
    truth = [t.requires_grad_() for t in truth]
    assert k.stride() != v.stride() and not v.is_contiguous()
    assert_matches_reference(q, k, v, truth, causal, padding_mask(2, 23, "right", gen).to(DEVICE), gen)


# ---- cuDNN's flash pass followed by our column-sum pass ------------------------------------------


def fake_cudnn_attention(q, k, v, causal, scale):
    """A CPU stand-in for ``cudnn.attention`` with cuDNN's conventions: out in q's dtype
    laid out [B, L, H, D] underneath (cuDNN follows the query's memory layout, transformers hands
    over [B, L, H, D] views), lse in natural-log units, float32, [B, H, L, 1], here also laid out
    [B, L, H] underneath (the column-sum pass reads it through its strides)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        length = q.shape[2]
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    out = torch.softmax(scores, -1) @ v.float()
    blhd = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], 1).transpose(1, 2)
    return blhd.copy_(out), lse.copy_(torch.logsumexp(scores, -1, keepdim=True))


@pytest.fixture
def cudnn_pass(monkeypatch):
    """cuDNN's flash pass switched on. On CUDA, the real one: a test skips where PyTorch's cuDNN
    attention does not take its inputs. On CPU, ``fake_cudnn_attention`` takes every input our
    own conditions let through (what runs on CPU is all the glue around it: the log-sum-exp's units
    and shape, the output's strides, the column-sum pass and the backward on cuDNN's results).
    Returns the list of the stand-in's calls."""
    monkeypatch.setattr(cudnn, "FLASH_PASS", "cudnn")
    monkeypatch.setattr(cudnn, "REFUSED", set())
    calls = []
    if not CUDA:

        def fake(*args):
            calls.append(args)
            return fake_cudnn_attention(*args)

        monkeypatch.setattr(cudnn, "accepts", lambda q, k, v, causal: True)
        monkeypatch.setattr(cudnn, "attention", fake)
    return calls


CUDNN_SHAPES = [(1, 1, 1, 1, 16), (2, 2, 2, 23, 24), (1, 3, 3, 40, 64), (1, 2, 2, 33, 128), (2, 4, 2, 37, 64)]
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("shape", CUDNN_SHAPES, ids=lambda s: "B{}-H{}/{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cudnn_flash_pass_outputs_and_gradients(shape, causal, dtype, gen, cudnn_pass):
    (q, k, v), (q64, k64, v64) = make_inputs(shape, dtype, gen, requires_grad=True)
    if CUDA and not cudnn.accepts(q, k, v, causal):
        pytest.skip("PyTorch's cuDNN attention does not take these inputs")
    base_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    scale = 1 / math.sqrt(shape[4])
    out, colsum = ata_attention(q, k, v, causal=causal)
    assert attention.last_forward() == "cudnn-flash"
    want_out, want_colsum = reference.attention_with_colsum(q64, k64, v64, causal=causal)
    base_out, base_colsum = eager_same_precision(*base_inputs, causal, None, scale)
    assert_within_rule(out, base_out, want_out, dtype, "out")
    assert_within_rule(colsum, base_colsum, want_colsum, dtype, "colsum")

    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_col = torch.randn(shape[0], shape[3], generator=gen, dtype=torch.float64).to(DEVICE)
    for o, c in ((out, colsum), (want_out, want_colsum), (base_out, base_colsum)):
        ((o.double() * w_out).sum() + (c.double() * w_col).sum()).backward()
    for name, got, base, want in zip("qkv", (q, k, v), base_inputs, (q64, k64, v64)):
        assert_within_rule(got.grad, base.grad, want.grad, dtype, f"d{name}")


def test_cudnn_flash_pass_only_where_it_applies(gen, cudnn_pass):
    """Padding and float32 keep our flash pass (the one-sweep kernel is off: length limit 0); a
    mask that pads nothing is dropped, so cuDNN's pass takes it; GQA goes to cuDNN where PyTorch's
    gate (here the stand-in) accepts it."""
    if CUDA:
        pytest.skip("checks the conditions with the CPU stand-in")
    (q, k, v), _ = make_inputs((2, 4, 4, 20, 16), torch.float16, gen)
    (qf, kf, vf), _ = make_inputs((2, 4, 4, 20, 16), torch.float32, gen)
    mask = padding_mask(2, 20, "right", gen)
    mask[0, -1] = False  # at least one padded token (a mask that pads nothing is dropped)
    with pytest.MonkeyPatch.context() as patch:
        set_short_limit(patch, 0)
        for args, kwargs, want in [
            ((q, k, v), {}, "cudnn-flash"),
            ((q, k, v), dict(key_padding_mask=mask), "triton-flash"),
            ((q, k, v), dict(key_padding_mask=torch.ones(2, 20, dtype=torch.long)), "cudnn-flash"),
            ((q, k[:, :2], v[:, :2]), {}, "cudnn-flash"),
            ((qf, kf, vf), {}, "triton-flash"),
        ]:
            ata_attention(*args, **kwargs)
            assert attention.last_forward() == want, (kwargs, args[1].shape, args[0].dtype)
        patch.setattr(cudnn, "FLASH_PASS", "triton")
        ata_attention(q, k, v)
        assert attention.last_forward() == "triton-flash"
    assert len(cudnn_pass) == 3


def test_cudnn_refusal_falls_back_once_per_signature(monkeypatch, caplog, gen):
    """Where cuDNN raises, the Triton pass gives the same result; the warning names the inputs,
    and the same inputs do not ask cuDNN again."""
    monkeypatch.setattr(cudnn, "FLASH_PASS", "cudnn")
    monkeypatch.setattr(cudnn, "REFUSED", set())
    monkeypatch.setattr(cudnn, "accepts", lambda q, k, v, causal: True)
    set_short_limit(monkeypatch, 0)
    calls = []

    def refusing(*args):
        calls.append(args)
        raise RuntimeError("cuDNN Frontend error: no valid engine configs")

    monkeypatch.setattr(cudnn, "attention", refusing)
    (q, k, v), (q64, k64, v64) = make_inputs((1, 2, 2, 21, 32), torch.float16, gen)
    want_out, want_colsum = reference.attention_with_colsum(q64, k64, v64, causal=True)
    with caplog.at_level("WARNING", logger="mgh_kernels.attention"):
        for _ in range(2):
            out, colsum = ata_attention(q, k, v, causal=True)
            assert attention.last_forward() == "triton-flash"
            torch.testing.assert_close(out.double(), want_out, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(colsum.double(), want_colsum, rtol=2e-3, atol=2e-3)
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "[1, 2, 21, 32]" in warnings[0] and "no valid engine" in warnings[0]


@pytest.mark.skipif(not CUDA, reason="PyTorch's cuDNN attention needs CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cudnn_flash_pass_taken_at_benchmark_shapes(causal, gen):
    """The benchmark's MHA shapes (bf16, head dims 64 and 128) take cuDNN's pass by default."""
    for dim in (64, 128):
        q, k, v = (torch.randn(2, 4, 512, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ata_attention(q, k, v, causal=causal)
        assert attention.last_forward() == "cudnn-flash", dim


# ---- the PyTorch path (CPU without the interpreter) -------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_chunked_path_matches_reference(causal, dtype, gen):
    shape = (2, 4, 2, 13, 8)
    q, k, v = (t.detach().requires_grad_() for t in make_inputs(shape, dtype, gen)[0])
    q, k, v = (t.cpu().detach().requires_grad_() for t in (q, k, v))
    mask = padding_mask(2, 13, "left", gen)
    with use_backend("torch", chunk_elements=64):  # several query chunks per sequence
        out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert attention.last_backend() == "torch-chunked"
    assert colsum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want_out, want_colsum = reference.attention_with_colsum(*args, causal=causal, key_padding_mask=mask)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(colsum, want_colsum, rtol=tol, atol=tol)
    w = torch.randn(out.shape, generator=gen).to(dtype)
    ((out * w).sum() + colsum.square().sum()).backward()
    ((want_out * w).sum() + want_colsum.square().sum()).backward()
    for got, want in zip((q, k, v), args):
        torch.testing.assert_close(got.grad, want.grad, rtol=tol * 10, atol=tol * 10)


def test_forward_choice_by_length():
    """Which forward the defaults pick (the kernels behind both are tested above)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    short = tiles.one_sweep_tiles
    assert short(cuda, 128, torch.bfloat16, 200) == dict(
        BLOCK_M=64, BLOCK_N=128, CHUNKS=2, BLOCK_D=128, num_warps=4, num_stages=1
    )
    assert short(cuda, 64, torch.float16, 100)["CHUNKS"] == 1
    assert short(cuda, 128, torch.bfloat16, 257) is None  # beyond SHORT_MAX_LENGTH["half"]
    assert short(cuda, 128, torch.bfloat16, 200, causal=False) is None  # bidirectional: two passes above 128
    assert short(cuda, 128, torch.bfloat16, 128, causal=False)["CHUNKS"] == 1
    assert short(cuda, 256, torch.bfloat16, 100) is None  # head dim too large to keep on chip
    assert short(cuda, 64, torch.float32, 16) is None  # float32 keeps the two-pass forward
    assert short(cpu, 32, torch.float32, 64)["CHUNKS"] == 4
    assert short(cpu, 32, torch.float32, 65) is None


def test_backend_selection():
    """The default path per device and dtype (the interpreter's where the tests set it, no bf16
    there), and ``use_backend``: "torch" everywhere inside its block, restored after it; "triton"
    refuses inputs the kernels cannot run instead of falling back."""
    cpu = torch.zeros(1)
    if backend.INTERPRETED:
        assert backend.select(cpu) == "triton-interpreter"
        assert backend.select(cpu.half()) == "triton-interpreter"
    assert backend.select(cpu.bfloat16()) == "torch-chunked"  # no bf16 in the interpreter
    with use_backend("torch", chunk_elements=8):
        assert backend.select(cpu) == "torch-chunked" and backend.chunk_elements() == 8
        if CUDA:
            assert backend.select(cpu.cuda()) == "torch-chunked"
    assert backend.chunk_elements() == backend.CHUNK_ELEMENTS
    assert backend.select(cpu) == ("triton-interpreter" if backend.INTERPRETED else "torch-chunked")
    if CUDA:
        assert backend.select(cpu.cuda()) == "triton"
    with use_backend("triton"), pytest.raises(ValueError, match="^q: .*bfloat16 .* use_backend"):
        ata_attention(*(torch.randn(1, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3)))
    for bad, argument in ((dict(name="cuda"), "name"), (dict(chunk_elements=0), "chunk_elements")):
        with pytest.raises(ValueError, match=f"^{argument}: "), use_backend(**bad):
            pass


@pytest.mark.parametrize(
    "kwargs, argument, expected",
    [
        (dict(return_colsum=1), "return_colsum", "True or False"),
        (dict(q=torch.randn(1, 2, 4, 300), k=torch.randn(1, 2, 4, 300), v=torch.randn(1, 2, 4, 300)), "q", "D <= 256"),
        (dict(q=torch.randn(1, 2, 0, 8), k=torch.randn(1, 2, 0, 8), v=torch.randn(1, 2, 0, 8)), "q", "non-empty"),
        (dict(k=torch.randn(1, 3, 4, 8), v=torch.randn(1, 3, 4, 8)), "k", "divides"),
        (dict(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)), "key_padding_mask", "all padding"),
    ],
)
def test_bad_input_names_argument(kwargs, argument, expected):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), causal=False)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        ata_attention(**args)
    assert str(info.value).startswith(argument + ":") and expected in str(info.value), str(info.value)
