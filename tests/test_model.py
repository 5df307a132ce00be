"""mgh_train.model: instruction handling, bidirectional attention, gradient checkpointing, and the
save/load round trip through sentence-transformers (ATA included) and the merged export."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import FAMILIES, tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # kernels: see conftest.cpu_kernels

TEXTS = ["how do vaccines train the immune system?", "Rest a steak for five minutes.", "a", "why is the sky blue"]
TASK = "Retrieve a passage that answers the question"


def build(family="llama", side="right", seed=0, perturb=True, **options):
    options.setdefault("lora_r", 4)
    config = EmbedderConfig(base_model=None, **options)
    embedder = Embedder.build(
        config, model=tiny_decoder(family, seed=seed), tokenizer=tiny_tokenizer(padding_side=side)
    )
    if perturb:  # LoRA starts as a no-op (B = 0): give the adapter weights that matter
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in embedder.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return embedder.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_embeds_with_lora(family):
    embedder = build(family)
    vectors = embedder.encode(TEXTS, instruction=TASK)
    assert vectors.shape == (4, 32) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(4), atol=1e-5)
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("pooling", ["ata", "mean", "last_token", "weighted_mean", "first_token"])
def test_left_and_right_padding_give_the_same_vectors(pooling):
    right = build(pooling=pooling, side="right", exclude_instruction=True).encode(TEXTS, instruction=TASK)
    left = build(pooling=pooling, side="left", exclude_instruction=True).encode(TEXTS, instruction=TASK)
    torch.testing.assert_close(left, right, atol=2e-5, rtol=1e-4)


def test_instruction_tokens_are_excluded_from_pooling_exactly():
    embedder = build(exclude_instruction=True)
    prefix = embedder.prefix(TASK)
    features = embedder.tokenize(TEXTS, instruction=TASK)
    tok = embedder.tokenizer
    for row, text in enumerate(TEXTS):
        valid = features["attention_mask"][row].bool()
        ids = features["input_ids"][row][valid].tolist()
        pooled = features["pool_mask"][row][valid].bool().tolist()
        assert ids[-1] == tok.eos_token_id and pooled[-1]
        # The pooled tokens decode to the text (a merged leading space aside): no instruction in them.
        text_part = tok.decode([i for i, keep in zip(ids[:-1], pooled[:-1]) if keep])
        assert text_part.strip() == text.strip()
        # Tokens before the first pooled one decode to the prefix.
        first = pooled.index(True)
        assert prefix.startswith(tok.decode(ids[:first]).rstrip())
    documents = embedder.tokenize(TEXTS)
    assert torch.equal(documents["pool_mask"], documents["attention_mask"])
    included = build(exclude_instruction=False).tokenize(TEXTS, instruction=TASK)
    assert torch.equal(included["pool_mask"], included["attention_mask"])


def test_the_instruction_changes_queries_and_exclusion_changes_pooling():
    with_instruction = build(exclude_instruction=False).encode(TEXTS, instruction=TASK)
    plain = build(exclude_instruction=False).encode(TEXTS)
    excluded = build(exclude_instruction=True).encode(TEXTS, instruction=TASK)
    assert (with_instruction - plain).abs().max() > 1e-3
    assert (with_instruction - excluded).abs().max() > 1e-3


def test_bidirectional_attention_sees_later_tokens_and_matches_eager():
    causal, bidir = build(bidirectional=False), build(bidirectional=True)
    features = causal.tokenize(["one two three four", "one two three five"])
    with torch.no_grad():
        h_causal, _ = causal.token_states(features)
        h_bidir, colsum = bidir.token_states(features)
    # The first token cannot see the last under causal attention, and does see it bidirectionally.
    assert torch.allclose(h_causal[0, 0], h_causal[1, 0])
    assert not torch.allclose(h_bidir[0, 0], h_bidir[1, 0])
    # The same weights under eager attention with an explicit padding-only 4D mask: same states.
    eager = build(bidirectional=True)
    eager.capture.remove()
    eager.model.set_attn_implementation("eager")
    mask = features["attention_mask"].bool()
    length = mask.shape[1]
    full = torch.zeros(mask.shape[0], 1, length, length).masked_fill(
        ~mask[:, None, None, :], torch.finfo(torch.float32).min
    )
    with torch.no_grad():
        reference = eager.model(input_ids=features["input_ids"], attention_mask=full).last_hidden_state
    torch.testing.assert_close(h_bidir[mask], reference[mask], atol=1e-5, rtol=1e-4)  # padded rows are junk
    assert colsum.shape == mask.shape


def _lora_grads(embedder, checkpointing):
    embedder.train()
    if checkpointing:
        embedder.enable_gradient_checkpointing()
    features = embedder.tokenize(TEXTS, instruction=TASK)
    embeddings = embedder(features)
    (embeddings @ torch.arange(32.0)).square().sum().backward()
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("pooling", ["ata", "mean"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(pooling):
    plain = _lora_grads(build(pooling=pooling), False)
    checkpointed = _lora_grads(build(pooling=pooling), True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling,exclude", [("ata", True), ("mean", False), ("last_token", False)])
def test_saved_folder_loads_in_sentence_transformers_with_the_same_vectors(tmp_path, pooling, exclude):
    st = pytest.importorskip("sentence_transformers")
    embedder = build(pooling=pooling, exclude_instruction=exclude, bidirectional=pooling == "mean")
    queries = embedder.encode(TEXTS, instruction=TASK)
    documents = embedder.encode(TEXTS)
    folder = embedder.save(tmp_path / "model")
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert json.loads((folder / "mgh_config.json").read_text())["adapter"] == "adapter"

    loaded = st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    st_queries = loaded.encode(TEXTS, prompt=embedder.prefix(TASK), convert_to_tensor=True)
    st_documents = loaded.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(st_queries.cpu(), queries, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st_documents.cpu(), documents, atol=1e-6, rtol=1e-5)
    again = Embedder.load(folder)
    torch.testing.assert_close(again.encode(TEXTS, instruction=TASK), queries, atol=1e-6, rtol=1e-5)


def test_sentence_transformers_refuses_without_trust_remote_code(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = build().save(tmp_path / "model")
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(folder), device="cpu")


def test_merged_export_encodes_like_the_adapter(tmp_path):
    embedder = build(pooling="ata")
    expected = embedder.encode(TEXTS, instruction=TASK)
    folder = embedder.save(tmp_path / "model")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgh_train",
            "export",
            "--model",
            str(folder),
            "--output",
            str(tmp_path / "merged"),
            "--merge",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    merged_folder = tmp_path / "merged"
    saved = json.loads((merged_folder / "mgh_config.json").read_text())
    assert saved["adapter"] is None and saved["base_folder"] == "base"
    assert not (merged_folder / "adapter").exists()
    merged = Embedder.load(merged_folder)
    assert not hasattr(merged.model, "peft_config")
    torch.testing.assert_close(merged.encode(TEXTS, instruction=TASK), expected, atol=2e-5, rtol=1e-4)
    # Merging did not change the embedder it came from.
    torch.testing.assert_close(embedder.encode(TEXTS, instruction=TASK), expected)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="pooling: expected one of"):
        EmbedderConfig(pooling="max")
    with pytest.raises(ValueError, match="query_template"):
        EmbedderConfig(query_template="Query: ")
    with pytest.raises(ValueError, match="lora_layers"):
        build(lora_layers=[5])
    with pytest.raises(ValueError, match="not an mgh model folder"):
        Embedder.load(tmp_path)
    with pytest.raises(ValueError, match="base_model: GGUF file"):
        Embedder.build(EmbedderConfig(base_model=str(tmp_path / "missing.gguf")))
    embedder = build()
    with pytest.raises(ValueError, match="texts: expected a list of strings"):
        embedder.tokenize("one string")
    with pytest.raises(ValueError, match="texts: expected at least one"):
        embedder.tokenize([])
    with pytest.raises(ValueError, match="instruction: expected one per text"):
        embedder.tokenize(["a", "b"], instruction=["x"])
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(["a"], batch_size=0)
