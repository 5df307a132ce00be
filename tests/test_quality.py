"""benchmarks/quality.py end to end on a tiny random model: 2 arms (mgh curriculum, mean pooling
to keep the eval subprocess off the Triton interpreter, and the
sentence-transformers baseline) x 2 seeds x 2 steps, the base row, the table and its sources."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STSB_TEST = ROOT.parent / "shared" / "data" / "stsb" / "stsb-en-test.csv"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


@pytest.mark.slow
@pytest.mark.skipif(not STSB_TEST.is_file() or not SCIFACT.is_dir(), reason="needs ../shared/data/stsb, scifact")
def test_runner_end_to_end_and_table_traces_to_runs(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("mteb")
    import yaml

    from tiny_models import tiny_decoder, tiny_tokenizer

    base = tmp_path / "tiny"
    tiny_decoder("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    (tmp_path / "data" / "stsb").mkdir(parents=True)  # a small STS test split keeps eval fast
    lines = STSB_TEST.read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "data" / "stsb" / "stsb-en-test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    seed_data = str(resources.files("mgh_train") / "seed" / "short_short.jsonl")
    config = {
        "train": {
            "model": str(base),
            "data": [seed_data],
            "steps": 2,
            "batch_size": 4,
            "lora_r": 4,
            "max_length": 64,
            "pooling": "mean",
            "workers": 0,
            "report_to": ["none"],
        },
        "arms": {"curriculum": {}, "st-mnrl": {"trainer": "sentence-transformers"}},
        "seeds": [0, 1],
        "eval": {"tasks": "STSBenchmark", "data_dir": str(tmp_path / "data"), "batch_size": 16},
        "transfer": {"tasks": "SciFact", "data_dir": str(tmp_path / "beir"), "arms": "best", "seeds": [0]},
        "base": True,
        "threads": 1,
        "parallel": 2,
        "priority": ["st-mnrl"],
    }
    quality = _quality()  # the transfer task: the real SciFact queries over a 300-document subsample
    quality.subsample_beir(SCIFACT, tmp_path / "beir" / "scifact", docs=300)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality.py"),
        "run",
        str(tmp_path / "q.yaml"),
        "--output",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "table.json").read_text())
    assert set(summary) == {"base (untrained)", "curriculum", "st-mnrl"}
    for name, row in summary.items():
        assert len(row["runs"]) == (1 if name.startswith("base") else 2)
        values = row["tasks"]["STSBenchmark"]["values"]
        for run, value in zip(row["runs"], values):  # each figure is the score of a run folder
            done_json = json.loads((Path(run) / "done.json").read_text())
            assert done_json["scores"]["STSBenchmark"] == value
            assert (Path(run) / "commands.txt").read_text().count("mgh_train eval") == 1
            assert list((Path(run) / "eval").rglob("STSBenchmark.json"))
    for folder in (out / "base", out / "curriculum" / "seed0"):  # base and the best (only) mgh arm
        transfer = json.loads((folder / "transfer.json").read_text())
        assert "SciFact" in transfer["scores"] and "mgh_train eval" in transfer["commands"][0]
    assert not (out / "curriculum" / "seed1" / "transfer.json").exists()
    assert summary["curriculum"]["tasks"]["SciFact"]["values"] == [
        json.loads((out / "curriculum" / "seed0" / "transfer.json").read_text())["scores"]["SciFact"]
    ]
    assert not list(out.rglob(".running*"))  # every lock released
    table = (out / "table.md").read_text()
    assert "| curriculum | 2 |" in table and "±" in table and "(n=1)" in table
    # a second run finds everything done and retrains nothing
    stamp = (out / "curriculum" / "seed0" / "done.json").stat().st_mtime
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "curriculum" / "seed0" / "done.json").stat().st_mtime == stamp


def _quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _done(folder: Path, scores: dict, name: str = "done.json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"scores": scores, "seconds": 1.0, "commands": ["x"]}))


def test_subsample_beir_keeps_queries_qrels_and_every_relevant_document(tmp_path):
    quality = _quality()
    source = tmp_path / "src"
    (source / "qrels").mkdir(parents=True)
    (source / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(50))
    )
    (source / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "q"}) + "\n")
    (source / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td7\t1\nq1\td42\t1\n")
    assert quality.subsample_beir(source, tmp_path / "a", docs=10, seed=3) == 0
    kept = [json.loads(line)["_id"] for line in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()]
    assert len(kept) == 10 and {"d7", "d42"} <= set(kept)
    assert kept == sorted(kept, key=lambda i: int(i[1:]))  # the source's order
    assert (tmp_path / "a" / "qrels" / "test.tsv").read_text() == (source / "qrels" / "test.tsv").read_text()
    quality.subsample_beir(source, tmp_path / "b", docs=10, seed=3)
    assert (tmp_path / "b" / "corpus.jsonl").read_text() == (tmp_path / "a" / "corpus.jsonl").read_text()
    with pytest.raises(ValueError, match="docs: 1 is fewer than the 2 relevant"):
        quality.subsample_beir(source, tmp_path / "c", docs=1)


def test_best_arm_skips_the_baseline_and_table_adds_transfer_scores(tmp_path):
    quality = _quality()
    config = {
        "arms": {"curriculum": {}, "random": {"schedule": "random"}, "st-mnrl": {"trainer": "sentence-transformers"}},
        "eval": {"tasks": "STSBenchmark"},
    }
    for arm, values in {"curriculum": [50.0, 52.0], "random": [51.0, 53.0], "st-mnrl": [70.0, 71.0]}.items():
        for seed, value in enumerate(values):
            _done(tmp_path / arm / f"seed{seed}", {"STSBenchmark": value})
    _done(tmp_path / "base", {"STSBenchmark": 36.0})
    assert quality.best_arm(config, tmp_path) == "random"  # st-mnrl scores higher but is not an mgh arm
    _done(tmp_path / "random" / "seed0", {"SciFact": 40.0}, "transfer.json")
    _done(tmp_path / "base", {"SciFact": 30.0}, "transfer.json")
    text = quality.table(tmp_path)
    assert "| random | 2 | 52.00 ± 1.41 | 40.00 (n=1) |" in text
    assert "| base (untrained) | 1 | 36.00 | 30.00 |" in text
    assert "| curriculum | 2 | 51.00 ± 1.41 |  |" in text


def test_claim_takes_a_dead_runners_lock_and_waits_for_a_live_one(tmp_path):
    import threading

    quality = _quality()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "arm" / "seed0"
    folder.mkdir(parents=True)
    (folder / ".running").write_text(f"{dead.pid}\n")
    assert quality._claim(folder, "done.json") is True  # a killed runner's lock does not block
    assert (folder / ".running").read_text().split()[0] == str(__import__("os").getpid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / ".running").write_text(f"{live.pid}\n")
        assert quality._held_elsewhere(folder)
        threading.Timer(1.0, lambda: _done(folder, {"STSBenchmark": 1.0})).start()
        assert quality._claim(folder, "done.json") is False  # waited for the live runner's result
    finally:
        live.kill()


def test_run_only_names_an_unknown_run_in_one_line(tmp_path):
    config = {
        "train": {"model": "tiny", "steps": 1},
        "arms": {"curriculum": {}},
        "seeds": [0],
        "eval": {"tasks": "STSBenchmark"},
    }
    import yaml

    (tmp_path / "q.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            "run",
            str(tmp_path / "q.yaml"),
            "--output",
            str(tmp_path / "out"),
            "--only",
            "random:0",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: only: no run random:0 in " + str(tmp_path / "q.yaml") + " (runs: base, curriculum:0)"
    )
