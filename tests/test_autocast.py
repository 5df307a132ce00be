"""Autocast, as the trainer's defaults run it on a GPU (bfloat16 autocast over float32 or bfloat16
weights), stood in for by CPU autocast: float16 runs the Triton kernels under the interpreter,
bfloat16 the PyTorch path (the interpreter has no bfloat16). On CUDA the same tests run the
kernels in both dtypes.

Every entry point follows PyTorch's rule for its lower-precision ops (SDPA, matmul): inputs of
mixed float dtypes are cast once to the autocast dtype, outside autocast they are an error.
"""

import contextlib
import copy
import math
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

from mgh_kernels import ata_attention, ata_pool, attention, enable_ata, infonce, infonce_loss, pool, reference
from mgh_kernels import transformers as model_patching
from random_inputs import padding_mask
from tiny_models import FAMILIES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
AMP = [torch.float16, torch.bfloat16]
KERNEL_PATH = "triton" if CUDA else "triton-interpreter"


def expected_backend(amp):
    return KERNEL_PATH if CUDA or amp == torch.float16 else "torch-chunked"


def autocast(amp):
    return torch.autocast(DEVICE, dtype=amp)


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_casts_mixed_inputs_once(amp, causal, gen):
    """q and k float32 beside a v in the autocast dtype (rotary embedding's doing): the result is the
    call on the inputs cast by hand, outputs in the autocast dtype, column sums float32, and the
    gradients reach each input in its own dtype."""
    q = torch.randn(2, 4, 21, 16, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(2, 2, 21, 16, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(2, 2, 21, 16, generator=gen).to(DEVICE, amp).requires_grad_()
    mask = padding_mask(2, 21, "left", gen).to(DEVICE)
    with autocast(amp):
        out, colsum = ata_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert attention.last_backend() == expected_backend(amp)
    assert out.dtype == amp and colsum.dtype == torch.float32
    leaves = [t.detach().to(amp).requires_grad_() for t in (q, k, v)]
    want_out, want_colsum = ata_attention(*leaves, causal=causal, key_padding_mask=mask)
    assert torch.equal(out, want_out) and torch.equal(colsum, want_colsum)
    upstream = torch.randn(out.shape, generator=gen).to(DEVICE, amp), torch.rand(colsum.shape, generator=gen).to(DEVICE)
    torch.autograd.backward((out, colsum), upstream)
    torch.autograd.backward((want_out, want_colsum), upstream)
    for got, want in zip((q, k, v), leaves):
        assert got.grad.dtype == got.dtype
        assert torch.equal(got.grad, want.grad.to(got.dtype))


def test_mixed_dtypes_are_refused_outside_autocast():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    v = k.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^v: expected dtype torch.float32 like q, got torch.bfloat16$"):
        ata_attention(q, k, v)
    with pytest.raises(ValueError, match=r"^pos: expected dtype torch.float32 like q, got torch.float16$"):
        infonce_loss(torch.randn(3, 8), torch.randn(3, 8).half())
    other = "cuda" if DEVICE == "cpu" else "cpu"
    if torch.amp.is_autocast_available(other):  # autocast for another device type does not apply
        with torch.autocast(other, dtype=torch.float16), pytest.raises(ValueError, match="^v: expected dtype"):
            ata_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE))


def test_float64_is_left_alone_as_autocast_does(gen):
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    with autocast(torch.bfloat16):
        out, colsum = ata_attention(q, k, v)
        loss = infonce_loss(q[0, 0], k[0, 0])
    assert out.dtype == torch.float64 and colsum.dtype == torch.float64 and loss.dtype == torch.float64
    with autocast(torch.bfloat16), pytest.raises(ValueError, match="^k: expected dtype torch.float64 like q"):
        ata_attention(q, k.float(), v)


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("negatives", ["global", "own"])
def test_infonce_casts_like_sentence_transformers_matmul(amp, negatives, gen):
    """Under autocast the similarities' inputs are cast to the autocast dtype (as autocast casts the
    matmul of MultipleNegativesRankingLoss) and the loss is float32 (as autocast's cross-entropy)."""
    q = torch.randn(9, 24, generator=gen).to(DEVICE).requires_grad_()
    pos = torch.randn(9, 24, generator=gen).to(DEVICE, amp).requires_grad_()
    neg = torch.randn(9, 3, 24, generator=gen).to(DEVICE).requires_grad_()
    with autocast(amp):
        loss = infonce_loss(q, pos, neg, tau=0.05, negatives=negatives)
    assert infonce.last_backend() == expected_backend(amp)
    assert loss.dtype == torch.float32
    leaves = [t.detach().to(amp).requires_grad_() for t in (q, pos, neg)]
    want = infonce_loss(*leaves, tau=0.05, negatives=negatives)
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    for got, ref in zip((q, pos, neg), leaves):
        assert got.grad.dtype == got.dtype and torch.equal(got.grad, ref.grad.to(got.dtype))


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("method", ["mean", "weighted_mean", "last_token", "first_token", "ata"])
def test_pooling_returns_float32_under_autocast(amp, method, gen):
    """Every pooling computes in float32 whatever autocast says (its einsum would otherwise run in
    the autocast dtype) and returns float32 there, as sentence-transformers' Pooling does under CUDA
    autocast; outside it, the hidden states' dtype."""
    hidden = torch.randn(3, 11, 16, generator=gen).to(DEVICE, amp)
    mask = padding_mask(3, 11, "right", gen).to(DEVICE)
    extra = {"colsum": torch.rand(3, 11, generator=gen).to(DEVICE)} if method == "ata" else {}
    with autocast(amp):
        got = pool(hidden, mask, method, **extra)
    assert got.dtype == torch.float32
    want = pool(hidden.float(), mask, method, **extra)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert pool(hidden, mask, method, **extra).dtype == amp


# --------------------------------------------------------------------------------------------
# The custom ops under torch.compile: their own autocast rule, not the eager wrapper's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_custom_ops_cast_under_autocast(amp, gen):
    """Called directly, the ops cast q, k, v (and q, pos, neg) to the autocast dtype and leave the
    float32 key bias alone; compiled with fullgraph, the wrappers reach them with the inputs as
    given, and the results equal eager autocast's."""
    q = torch.randn(2, 2, 13, 16, generator=gen).to(DEVICE)
    k = torch.randn(2, 1, 13, 16, generator=gen).to(DEVICE)
    v = k.to(amp)
    bias = torch.zeros(2, 13, device=DEVICE)
    bias[1, :4] = float("-inf")
    with autocast(amp):
        out, colsum, lse = torch.ops.mgh.ata_attention_forward(q, k, v, bias, True, 0.25, True)
    want = torch.ops.mgh.ata_attention_forward(q.to(amp), k.to(amp), v, bias, True, 0.25, True)
    assert out.dtype == amp and colsum.dtype == lse.dtype == torch.float32
    for got, ref in zip((out, colsum, lse), want):
        assert torch.equal(got, ref)
    e = torch.randn(5, 16, generator=gen).to(DEVICE)
    with autocast(amp):
        losses = torch.ops.mgh.infonce_forward(e, e.to(amp), e[:0], 0.05, True, False, 0)[0]
    assert torch.equal(
        losses, torch.ops.mgh.infonce_forward(e.to(amp), e.to(amp), e[:0].to(amp), 0.05, True, False, 0)[0]
    )

    mask = bias == 0

    def fn(q, k, v, pos):
        out, colsum = ata_attention(q, k, v, causal=True, key_padding_mask=mask)
        return out, colsum, infonce_loss(out[:, 0, 0], pos)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, q[:, 0, 0])]
    with autocast(amp):
        got = compiled(*leaves)
        want = fn(*(t.detach().clone().requires_grad_() for t in leaves))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    sum(t.float().sum() for t in got).backward()
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in leaves)


# --------------------------------------------------------------------------------------------
# enable_ata inside transformers models, against their eager attention under the same autocast
# --------------------------------------------------------------------------------------------

# (base weights, autocast): the trainer's two GPU recipes (float32 weights under autocast, and
# bfloat16 weights under bfloat16 autocast), and float16 autocast (the kernels on the CPU)
PRECISIONS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)]


def lora_model(family, causal, weights, seed=0):
    """A tiny decoder with a random (non-zero) LoRA adapter on every linear, base weights in
    ``weights``, LoRA weights float32 (peft's own choice for half-precision bases)."""
    from peft import LoraConfig, get_peft_model

    config = FAMILIES[family][0](
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    base = FAMILIES[family][1](config)
    for module in base.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = causal
    base.config.is_causal = causal
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base.to(weights), lora).to(DEVICE)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    return model


def embed_and_grads(model, ids, mask, target, *, fused, amp):
    """(ATA embeddings, {LoRA parameter: gradient}) of sum(embeddings * target) under ``amp``
    autocast (None: none): ``fused`` True runs the fused layer, "eager" the same layer with the eager
    attention it replaces (``reference.attention_with_colsum``, PyTorch ops under the same autocast;
    SDPA in the other layers, as in the fused path), False every layer's eager attention with
    ``output_attentions`` (the float64 truth)."""
    model.zero_grad()
    context = autocast(amp) if amp is not None else torch.autocast(DEVICE, enabled=False)
    with context:
        if fused:
            with enable_ata(model) as capture, contextlib.ExitStack() as stack:
                if fused == "eager":
                    eager = lambda q, k, v, **kw: reference.attention_with_colsum(q, k, v, **kw)
                    stack.enter_context(mock.patch.object(model_patching, "ata_attention", eager))
                out = model(input_ids=ids, attention_mask=mask)
                emb = ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)
        else:
            model.base_model.model.set_attn_implementation("eager")
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            emb = ata_pool(out.last_hidden_state, mask, attentions=out.attentions)
    (emb.double() * target).sum().backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.requires_grad}
    return emb.double().detach(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: f"{p[0]}-autocast-{p[1]}".replace("torch.", ""))
def test_enable_ata_under_autocast_matches_eager_attention(family, causal, precision, gen):
    """The fused layer under autocast against the same model with that layer's eager attention under
    the same autocast, both measured against the float64 model (the same weights, eager attention
    with output_attentions, no autocast): flash-attention's rule, on the embeddings and on every
    LoRA gradient. The other layers run SDPA in both, so the comparison is of the layer ATA fuses:
    with eager attention in every layer of the baseline, the rule measured SDPA against eager
    attention in the other layers, where SDPA's bfloat16 backward on the CPU misses by up to 2.5x
    eager's."""
    weights, amp = precision
    model = lora_model(family, causal, weights)
    truth_model = copy.deepcopy(model).double()
    ids = torch.randint(0, 128, (3, 17), generator=gen).to(DEVICE)
    # right padding: eager attention's fully masked query rows (left padding, causal) are NaN in
    # a float64 model, whose softmax runs in float32
    mask = padding_mask(3, 17, "right", gen).long().to(DEVICE)
    target = torch.randn(3, 64, generator=gen, dtype=torch.float64).to(DEVICE)

    ours = embed_and_grads(model, ids, mask, target, fused=True, amp=amp)
    assert attention.last_backend() == expected_backend(amp)
    eager = embed_and_grads(copy.deepcopy(model), ids, mask, target, fused="eager", amp=amp)
    truth = embed_and_grads(truth_model, ids, mask, target, fused=False, amp=None)
    check_against_truth(ours, eager, truth, amp)


def check_against_truth(ours, eager, truth, amp):
    """Flash-attention's rule on (embeddings, gradients) triples: ours misses the float64 truth by
    at most twice what the eager baseline misses it by, plus a small absolute term."""
    atol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[amp]

    def check(name, got, base, want):
        err, own = (got - want).abs().max().item(), (base - want).abs().max().item()
        bound = 2 * own + atol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} against float64, eager attention's {own:.3g}"

    check("embeddings", ours[0], eager[0], truth[0])
    assert ours[1].keys() == eager[1].keys() == truth[1].keys() and len(ours[1]) > 20
    for name in truth[1]:
        check(name, ours[1][name], eager[1][name], truth[1][name])


@pytest.mark.parametrize("amp", [torch.float16] + ([torch.bfloat16] if CUDA else []), ids=str)
def test_compiled_enabled_model_under_autocast(amp, gen):
    """torch.compile of an enabled model under autocast against the eager enabled model under the
    same autocast, both measured against the float64 model: flash-attention's rule on embeddings and
    LoRA gradients (compilation reorders casts, so bit equality is not expected)."""
    model = lora_model("qwen3", True, torch.float32)
    ids = torch.randint(0, 128, (2, 13), generator=gen).to(DEVICE)
    mask = torch.ones(2, 13, dtype=torch.long, device=DEVICE)
    mask[1, 9:] = 0
    target = torch.randn(2, 64, generator=gen, dtype=torch.float64).to(DEVICE)
    truth = embed_and_grads(copy.deepcopy(model).double(), ids, mask, target, fused=False, amp=None)
    want = embed_and_grads(model, ids, mask, target, fused=True, amp=amp)
    compiled = copy.deepcopy(model)
    with enable_ata(compiled) as capture:
        forward = torch.compile(compiled, backend="aot_eager", dynamic=False)
        compiled.zero_grad()
        with autocast(amp):
            out = forward(input_ids=ids, attention_mask=mask)
            emb = ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)
        (emb.double() * target).sum().backward()
    grads = {n: p.grad.double() for n, p in compiled.named_parameters() if p.requires_grad}
    check_against_truth((emb.double().detach(), grads), want, truth, amp)


# --------------------------------------------------------------------------------------------
# The trainer in the precision asked for
# --------------------------------------------------------------------------------------------

POOLINGS = ["mean", "weighted_mean", "last_token", "first_token", "ata"]


def train_tiny(tmp_path, name, pooling, **options):
    from mgh_train import trainer
    from mgh_train.config import TrainConfig
    from mgh_train.model import Embedder, EmbedderConfig
    from tiny_models import tiny_decoder, tiny_tokenizer

    lines = []
    torch.manual_seed(0)
    embedder = Embedder.build(
        EmbedderConfig(base_model=None, pooling=pooling, lora_r=4, lora_alpha=8, max_length=48),
        model=tiny_decoder("llama", seed=0),
        tokenizer=tiny_tokenizer(),
    )
    cfg = TrainConfig(
        steps=2,
        batch_size=4,
        lr=1e-3,
        warmup=0.0,
        output=str(tmp_path / name),
        progress=False,
        max_length=48,
        schedule="level:4",
        device=DEVICE,
        **options,
    )
    result = trainer.train(cfg, embedder=embedder, log=lines.append, report_accuracy=False)
    return result, embedder, lines


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("pooling", POOLINGS)
def test_training_step_under_autocast_with_every_pooling(tmp_path, pooling):
    """--bf16 with bfloat16 base weights (the GPU default) trains with every pooling: the run says so,
    the base weights are bfloat16 and the LoRA weights float32, and the first loss (the same
    weights and batch) is the float32 run's within bfloat16's precision."""
    plain, _, _ = train_tiny(tmp_path, "fp32", pooling, bf16=False)
    mixed, embedder, lines = train_tiny(tmp_path, "bf16", pooling, bf16=True, dtype="bfloat16")
    assert f"precision: base weights bfloat16, LoRA float32, autocast bfloat16 on {DEVICE}" in lines
    params = list(embedder.model.named_parameters())
    assert all(p.dtype == torch.float32 for _, p in params if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for _, p in params if not p.requires_grad and p.is_floating_point())
    assert all(math.isfinite(x) for x in mixed.losses)
    assert mixed.losses[0] == pytest.approx(plain.losses[0], rel=3e-2)
    assert mixed.model_path is not None


@pytest.mark.usefixtures("cpu_kernels")
def test_fp16_trains_with_a_gradient_scaler(tmp_path):
    """--fp16: float16 autocast with a gradient scaler, whose state the checkpoint keeps."""
    result, embedder, lines = train_tiny(tmp_path, "fp16", "ata", fp16=True)
    assert (
        f"precision: base weights float32, LoRA float32, autocast float16 with a gradient scaler on {DEVICE}" in lines
    )
    assert all(math.isfinite(x) for x in result.losses)
    state = torch.load(tmp_path / "fp16" / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0


def test_precision_defaults_and_bad_choices():
    from mgh_train.precision import resolve

    cpu = resolve(torch.device("cpu"))
    assert (cpu.weights, cpu.autocast, cpu.scaler) == (torch.float32, None, False)
    assert resolve("cpu", bf16=True).autocast == torch.bfloat16
    assert resolve("cpu", fp16=True).scaler
    if CUDA:
        gpu = resolve(torch.device("cuda"))
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert gpu.weights == gpu.autocast == expected
        assert resolve("cuda", bf16=False).autocast is None
    with pytest.raises(ValueError, match="^fp16: expected at most one of --bf16 and --fp16"):
        resolve("cpu", bf16=True, fp16=True)
    with pytest.raises(ValueError, match="^dtype: expected one of float32, bfloat16, float16, got 'int8'"):
        resolve("cpu", dtype="int8")
