"""``benchmarks/bench_command.py`` run once on the tiny Llama (so the command-level benchmark cannot
rot between the runs that time it): every entry trains in its own process, the two mgh entries on
the same rows (same real tokens per step, same first loss), sentence-transformers with the same LoRA
on the same triplets; and its pieces (rows, LoRA targets, the steady-state rate) checked on their own."""

import json

import pytest
import torch

import benchmark_modules
from tiny_models import save_tiny_llama, tiny_decoder, tiny_tokenizer

pytest.importorskip("peft")
pytest.importorskip("sentence_transformers")
bench = benchmark_modules.load("bench_command")


def test_seed_triplets_are_the_seed_sets_rows_with_their_level_4_negative():
    from importlib import resources

    rows = [
        json.loads(line)
        for path in sorted((resources.files("mgh_train") / "seed").iterdir())
        if path.name.endswith(".jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    triplets = bench.seed_triplets()
    assert len(triplets) == len(rows) > 100
    for (anchor, positive, negative), row in zip(triplets, rows):
        assert anchor.endswith(row["query"]) and row["task"] in anchor
        assert positive == row["positive"]
        assert negative == next(n["text"] for n in row["negatives"] if n["level"] == 4)


def test_sentence_transformers_lora_trains_what_the_embedder_trains(tmp_path):
    from mgh_train.model import Embedder, EmbedderConfig

    folder = save_tiny_llama(tmp_path / "base")
    embedder = Embedder.build(
        EmbedderConfig(base_model=None, lora_layers=[-1], **bench.LORA),
        model=tiny_decoder("llama"),
        tokenizer=tiny_tokenizer(),
    )
    ours = {n.split("base_model.model.")[-1]: p.numel() for n, p in embedder.named_parameters() if p.requires_grad}
    model = bench.st_model(str(folder), 32, lora_last=1, workdir=tmp_path / "st")
    theirs = {n.split("base_model.model.")[-1]: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    strip = lambda names: {n.split(".layers.", 1)[-1]: v for n, v in names.items()}
    assert strip(ours) == strip(theirs) and len(ours) == 14  # q k v o gate up down, A and B, in the last layer


def test_steady_rate_leaves_out_the_warmup_steps():
    rows = [(1, 100, 10.0, 3.0), (2, 250, 11.0, 2.0), (3, 400, 13.0, 1.0)]  # step, tokens so far, seconds so far
    got = bench.steady(rows, warmup=1)
    assert got["tokens"] == 300 and got["seconds"] == pytest.approx(3.0) and got["tokens_per_s"] == pytest.approx(100)
    assert bench.steady(rows, warmup=0)["tokens_per_s"] == pytest.approx(400 / 13)
    with pytest.raises(ValueError, match="warmup"):
        bench.steady(rows, warmup=3)


@pytest.mark.slow
def test_every_entry_runs_on_the_tiny_llama(tmp_path):
    folder = save_tiny_llama(tmp_path / "base")
    lines = []
    results = bench.run(
        str(folder),
        tmp_path / "out",
        entries=list(bench.ENTRIES),
        rounds=1,
        steps=3,
        warmup=1,
        batch_size=4,
        max_length=32,
        log_every=2,
        lora_last=1,
        report=lines.append,
    )
    by = {r["entry"]: r for r in results}
    assert set(by) == set(bench.ENTRIES)
    for r in results:
        assert r["steps"] == 2 and r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > r["seconds"]
    # the two mgh entries train on the same rows: the same real tokens and the same first loss
    assert by["packed"]["tokens"] == by["buckets"]["tokens"]
    assert by["packed"]["first_loss"] == pytest.approx(by["buckets"]["first_loss"], rel=1e-4)
    # sentence-transformers' two entries take different batches (its sampler, our loop's order)
    # but the same triplets truncated alike: within a tenth of mgh's tokens (mgh adds an EOS)
    for name in ("st-trainer", "st-loop"):
        assert by[name]["tokens"] == pytest.approx(by["buckets"]["tokens"], rel=0.1)
        assert torch.isfinite(torch.tensor(by[name]["first_loss"] or 0.0))
    assert "| python -m mgh_train train --packing |" in lines[-1]
