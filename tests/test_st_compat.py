"""A sentence-transformers user's data and workflows in mgh: pairs with in-batch negatives only,
columns bound by order, a curriculum over data without levels explained or refused.

Where sentence-transformers defines the behaviour (MultipleNegativesRankingLoss on pairs, the
column order of a dataset), the test compares with it."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from tiny_models import tiny_decoder, tiny_tokenizer  # noqa: E402

from mgh_train import trainer  # noqa: E402
from mgh_train.config import TrainConfig  # noqa: E402
from mgh_train.data import needs_of, parse_row, read_examples, schedule_notes  # noqa: E402
from mgh_train.model import Embedder, EmbedderConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def tiny_embedder(**options):
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    torch.manual_seed(0)
    return Embedder.build(EmbedderConfig(base_model=None, **options), model=tiny_decoder("llama", seed=0),
                          tokenizer=tiny_tokenizer())


def config(tmp_path, name="run", **options):
    base = dict(steps=4, batch_size=4, lr=5e-3, warmup=0.0, output=str(tmp_path / name), progress=False,
                max_length=64)
    return TrainConfig(**{**base, **options})


def pair_rows(n=24):
    return [{"anchor": f"question number {i} about topic {i % 7}", "positive": f"the answer to {i} is {i * 3}"}
            for i in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# 1. pairs, column order, curriculum without levels
# ---------------------------------------------------------------------------------------------


def test_the_fused_loss_on_pairs_equals_mnrl(gen):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from mgh_kernels import infonce_loss

    q = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    theirs = st_losses.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([q, p], None)
    (gq, gp) = torch.autograd.grad(theirs, (q, p))
    for neg in (None, torch.zeros(7, 0, 16, dtype=torch.float64)):  # K = 0 both ways
        ours = infonce_loss(q, p, neg, tau=0.05)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        oq, op = torch.autograd.grad(ours, (q, p))
        assert torch.allclose(oq.double(), gq, rtol=1e-4, atol=1e-7) and torch.allclose(op.double(), gp, rtol=1e-4,
                                                                                          atol=1e-7)


@pytest.mark.parametrize("loss", ["fused", "eager"])
def test_pairs_train_with_in_batch_negatives(tmp_path, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    logged = []
    result = trainer.train(config(tmp_path, loss=loss, data=[str(data)]), embedder=tiny_embedder(),
                           log=logged.append, report_accuracy=False)
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert any("every example is a pair" in line and "in-batch negatives only" in line for line in logged), logged


def test_fused_and_eager_agree_on_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    runs = [trainer.train(config(tmp_path, name=loss, loss=loss, data=[str(data)], steps=2), embedder=tiny_embedder(),
                          log=lambda _: None, report_accuracy=False).losses for loss in ("fused", "eager")]
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_columns_bind_by_order_as_in_sentence_transformers(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"} for i in range(3)]
    table = datasets.Dataset.from_list(rows)
    # sentence-transformers feeds a dataset's columns to the loss in this order: anchor, positive, negatives
    anchor, positive, negative = table.column_names
    example = parse_row(rows[0])
    assert (example.query, example.positive, [n.text for n in example.negatives]) == (
        rows[0][anchor], rows[0][positive], [rows[0][negative]])
    pair = parse_row({"sentence1": "s one", "sentence2": "s two"})
    assert (pair.query, pair.positive, pair.negatives) == ("s one", "s two", ())
    table.save_to_disk(str(tmp_path / "folder"))
    read = read_examples(tmp_path / "folder", needs=needs_of("random", 8)).examples
    assert [(e.query, e.positive, e.negatives[0].text) for e in read] == [(f"q{i}", f"a{i}", f"n{i}") for i in range(3)]
    with pytest.raises(ValueError, match="unknown row format"):
        parse_row({"query": "q", "label": 1.0})  # a score column is not a text column
    with pytest.raises(ValueError, match="unknown row format"):
        parse_row({"text": "only one column"})


def test_a_schedule_over_data_without_levels_is_explained_or_refused():
    unlevelled = [parse_row({"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"}) for i in range(4)]
    notes = schedule_notes(unlevelled, "curriculum")
    assert len(notes) == 1 and "no difficulty levels" in notes[0] and "--schedule random" in notes[0]
    assert schedule_notes(unlevelled, "random") == [] and schedule_notes(unlevelled, "all") == []
    for schedule in ("level:2", "reverse"):
        with pytest.raises(ValueError, match=f"schedule: '{schedule}' picks negatives by level"):
            schedule_notes(unlevelled, schedule)
    pairs = [parse_row(r) for r in pair_rows(3)]
    assert "every example is a pair" in schedule_notes(pairs, "level:3")[0]
    mixed = unlevelled + pairs
    assert any("3 of 7 examples are pairs" in n for n in schedule_notes(mixed, "random"))


def test_a_level_schedule_over_triplets_without_levels_stops_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"}
                                              for i in range(12)])
    with pytest.raises(ValueError, match="picks negatives by level"):
        trainer.train(config(tmp_path, data=[str(data)], schedule="level:4"), embedder=tiny_embedder(),
                      log=lambda _: None)


# ---------------------------------------------------------------------------------------------
# 2. portable model folders
# ---------------------------------------------------------------------------------------------


def test_a_model_folder_loads_from_another_directory_and_from_a_copy(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    tiny_decoder("llama").save_pretrained(work / "tiny")
    tiny_tokenizer().save_pretrained(work / "tiny")
    monkeypatch.chdir(work)
    data = write_jsonl(work / "pairs.jsonl", pair_rows())
    cfg = config(work, model="tiny", data=["pairs.jsonl"], steps=1, lora_r=4, output="run")
    trainer.train(cfg, log=lambda _: None, report_accuracy=False)
    saved = json.loads((work / "run" / "model" / "mgh_config.json").read_text())
    assert saved["embedder"]["base_model"] == str((work / "tiny").resolve())
    here = Embedder.load(work / "run" / "model").encode(["hello"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert torch.equal(Embedder.load(work / "run" / "model").encode(["hello"]), here)
    shutil.copytree(work / "run" / "model", elsewhere / "copy")
    assert torch.equal(Embedder.load("copy").encode(["hello"]), here)
    shutil.rmtree(work / "tiny")  # the base is gone: one line naming it, no traceback
    with pytest.raises(ValueError, match=r"names the base model .*tiny, which does not exist here"):
        Embedder.load("copy")
    config_file = elsewhere / "copy" / "mgh_config.json"
    saved["embedder"]["base_model"] = "tiny"  # as older folders stored it: a name the hub does not know
    config_file.write_text(json.dumps(saved))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "mgh_train", "export", "--model", "copy", "--output", "out"],
                            capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "names the base model 'tiny'" in result.stderr, result.stderr
