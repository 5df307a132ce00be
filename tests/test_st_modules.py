"""ATAPooling after sentence-transformers' stock Transformer module: the fused ATA layer is turned on
in the decoder it follows, the vectors equal Embedder.encode's, and it saves and reloads."""

import json

import pytest
import torch

pytest.importorskip("peft")
st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules import Normalize, Transformer

from mgh_train import ATAPooling
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # kernels: see conftest.cpu_kernels

TEXTS = ["how do vaccines train the immune system?", "Rest a steak for five minutes.", "a", "why is the sky blue"]
TASK = "Retrieve a passage that answers the question"
NEWLINE_TEMPLATE = "Instruct: {instruction}\nQuery:\n"
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def stock_model(folder, pooling):
    """sentence-transformers' own Transformer (text modality only: no chat template) + ATAPooling + Normalize."""
    transformer = Transformer(str(folder), modality_config=TEXT_ONLY, module_output_name="token_embeddings")
    transformer.tokenizer.add_eos_token = True  # mgh appends EOS to every text
    return st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")


def reference(folder, **options):
    import transformers

    config = EmbedderConfig(base_model=None, pooling="ata", lora_r=0, **options)
    return Embedder.build(
        config,
        model=transformers.AutoModel.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
    ).eval()


def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_decoder("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("include_prompt", [True, False])
def test_ata_pooling_equals_embedder_and_reloads(tmp_path, include_prompt):
    folder = tiny_folder(tmp_path)
    embedder = reference(folder, query_template=NEWLINE_TEMPLATE, exclude_instruction=not include_prompt)
    prefix = embedder.prefix(TASK)
    model = stock_model(folder, ATAPooling(include_prompt=include_prompt))
    features = model[0].preprocess(TEXTS[:1])
    assert features["input_ids"][0].tolist() == embedder.tokenize(TEXTS[:1])["input_ids"][0].tolist()
    want_q, want_d = embedder.encode(TEXTS, instruction=TASK), embedder.encode(TEXTS)
    got_q = model.encode(TEXTS, prompt=prefix, convert_to_tensor=True)
    got_d = model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_d, want_d, atol=1e-5, rtol=1e-4)
    assert model[1].capture is not None and model[1].capture.colsum.shape[0] == len(TEXTS)

    model.save(str(tmp_path / "saved"), create_model_card=False)
    config = json.loads((tmp_path / "saved" / "1_ATAPooling" / "config.json").read_text())
    assert config == {"ata_layer": -1, "ata_mix": 0.0, "include_prompt": include_prompt}
    again = st.SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    assert isinstance(again[1], ATAPooling)
    torch.testing.assert_close(again.encode(TEXTS, prompt=prefix, convert_to_tensor=True), want_q, atol=1e-5, rtol=1e-4)


def test_ata_mix_and_layer_reach_the_pooling(tmp_path):
    folder = tiny_folder(tmp_path)
    embedder = reference(folder, ata_mix=0.3, ata_layer=0)
    model = stock_model(folder, ATAPooling(ata_layer=0, ata_mix=0.3))
    torch.testing.assert_close(
        model.encode(TEXTS, convert_to_tensor=True), embedder.encode(TEXTS), atol=1e-5, rtol=1e-4
    )
    plain = stock_model(folder, ATAPooling())
    assert (plain.encode(TEXTS, convert_to_tensor=True) - embedder.encode(TEXTS)).abs().max() > 1e-3


def test_ata_pooling_needs_a_transformer_before_it(tmp_path):
    pooling = ATAPooling()
    with pytest.raises(ValueError, match="^ATAPooling: not attached"):
        pooling({"token_embeddings": torch.zeros(1, 2, 4), "attention_mask": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="^model: ATAPooling must follow"):
        st.SentenceTransformer(modules=[ATAPooling()], device="cpu")
    with pytest.raises(ValueError, match="^ata_mix"):
        ATAPooling(ata_mix=2.0)


def test_ata_pooling_over_smollm2_through_the_stock_transformer(smollm2_plain):
    embedder = reference(smollm2_plain, max_length=64)
    model = stock_model(smollm2_plain, ATAPooling())
    assert "message" not in model[0].modality_config  # no chat template around the text
    prefix = embedder.prefix(TASK)
    torch.testing.assert_close(
        model.encode(TEXTS, prompt=prefix, convert_to_tensor=True),
        embedder.encode(TEXTS, instruction=TASK),
        atol=1e-5,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        model.encode(TEXTS, convert_to_tensor=True), embedder.encode(TEXTS), atol=1e-5, rtol=1e-4
    )
