"""The ``mine`` run: embed, retrieve, filter, band, and write MGH rows, resumably.

Files (append-only JSON Lines, one fsync per row, :class:`mgh_train.synth.writer.RowWriter`):

* ``--output``: one MGH row per (query, positive) pair: ``query``, ``positive``, ``negatives``
  (four: ``text``, ``level`` 4..1, ``score`` = cosine similarity to the query, ``rank`` among the
  surviving candidates), ``positive_score``, ``task``, ``task_type``, optional ``instruction``,
  ``miner`` (the embedder);
* the rejects file (``<output>.rejects.jsonl``): pairs with an empty band, with the reason;
* the corpus embeddings (``<output>.corpus.pt``), keyed by the embedder and the corpus texts, so a
  resumed run does not embed the corpus again.

A pair is done when its row (key: normalised query and positive) is in the output or the rejects
file: kill the run and start the same command again, and it goes on with the pairs not done.
Queries are processed in chunks of ``query_chunk``; rows of a chunk are written as soon as it is
ranked. Which negative a band gives is drawn from ``(seed, row key)``: the same on a resumed run.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..synth.verify import DEFAULT_JUDGE, Judge
from ..synth.writer import RowWriter, beside, row_key
from .bands import LEVELS_HARD_FIRST, Bands
from .candidates import Filters, mine_window
from .inputs import read_corpus, read_pairs
from .topk import chunked_topk, faiss_topk


@dataclass
class MineOptions:
    """Everything one ``mine`` run needs; see ``python -m mgh_train mine --help``."""

    pairs: Sequence[str]
    output: str
    corpus: Optional[Sequence[str]] = None  # None: the positives themselves
    model: str = DEFAULT_JUDGE
    pair_min_score: Optional[float] = None
    bands: Bands = field(default_factory=Bands)
    range_max: int = 128  # with score bands: candidates considered per query
    absolute_margin: Optional[float] = None
    relative_margin: Optional[float] = 0.05
    max_score: Optional[float] = None
    min_score: Optional[float] = None
    cross_encoder: Optional[str] = None
    cross_encoder_max_score: Optional[float] = None
    batch_size: int = 64
    query_chunk: int = 512
    use_faiss: bool = False
    seed: int = 0
    instruction: Optional[str] = None
    task: str = "mined"
    task_type: str = "mined"
    limit: int = 0
    progress: Optional[bool] = None

    def __post_init__(self):
        for name in ("batch_size", "query_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.limit, int) or self.limit < 0:
            raise ValueError(f"limit: expected an integer >= 0, got {self.limit!r}")
        if (self.cross_encoder is None) != (self.cross_encoder_max_score is None):
            raise ValueError("cross_encoder_max_score: give it together with --cross-encoder (a threshold on "
                             "the cross-encoder's score above which a candidate is a false-negative suspect)")
        if Path(self.output).is_dir():
            raise ValueError(f"output: {self.output} is a folder; expected a .jsonl file path")
        self.filters()  # validates the range and margins

    def filters(self) -> Filters:
        lo, hi = (self.bands.rank[0], self.bands.rank[-1]) if self.bands.rank is not None else (0, self.range_max)
        return Filters(range_min=lo, range_max=hi, absolute_margin=self.absolute_margin,
                       relative_margin=self.relative_margin, max_score=self.max_score, min_score=self.min_score,
                       cross_encoder_max_score=self.cross_encoder_max_score)

    @property
    def rejects_path(self) -> Path:
        return beside(Path(self.output), "rejects.jsonl")

    @property
    def cache_path(self) -> Path:
        return beside(Path(self.output), "corpus.pt")


@dataclass
class MineSummary:
    written: int = 0
    rejected: int = 0
    done_before: int = 0
    pairs: int = 0
    corpus: int = 0
    removed: dict = field(default_factory=dict)
    level_scores: dict = field(default_factory=dict)  # level -> [sum, count] of this run's negatives
    dropped_torn_lines: list = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"wrote {self.written} rows and rejected {self.rejected} pairs in this run ({self.done_before} "
               f"done before it) from {self.pairs} pairs over a corpus of {self.corpus} texts, {self.seconds:.1f} s"]
        for name, count in sorted(self.removed.items()):
            out.append(f"  removed {count} candidates by {name}")
        if self.level_scores:
            out.append("mean similarity per level: " + ", ".join(
                f"{level}: {s / n:.3f}" for level, (s, n) in sorted(self.level_scores.items(), reverse=True) if n))
        for line in self.dropped_torn_lines:
            out.append(f"dropped a torn last line (the previous run was killed mid-write): {line}")
        return out


class Encoder(Judge):
    """Unit-length embeddings (float32, CPU) from a sentence-transformers or mgh model folder."""

    def encode(self, texts: Sequence[str], instruction=None, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.empty(0)
        if self._mgh is not None:  # length-sorted batches inside Embedder.encode
            vectors = self._mgh.encode(list(texts), instruction=instruction, batch_size=self.batch_size,
                                       show_progress=progress)
            return torch.nn.functional.normalize(vectors.float(), dim=-1)
        return self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_tensor=True, show_progress_bar=progress).float().cpu()


def _corpus_vectors(encoder: Encoder, corpus: list[str], options: MineOptions, progress: bool) -> torch.Tensor:
    digest = hashlib.sha256(repr((options.model, corpus)).encode()).hexdigest()
    path = options.cache_path
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == digest:
                return cached["vectors"]
        except Exception:  # a cache torn by a kill: embed again
            pass
    vectors = encoder.encode(corpus, progress=progress)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": digest, "vectors": vectors}, tmp)
    tmp.replace(path)
    return vectors


def _cross_encoder(name: str) -> Callable[[list[tuple[str, str]]], Sequence[float]]:
    """The cross-encoder ``name`` as ``pairs of (query text, corpus text) -> scores``."""
    from sentence_transformers import CrossEncoder

    try:
        model = CrossEncoder(name, device="cpu")
    except OSError as error:
        raise ValueError(f"cross_encoder: cannot load {name!r}: {error}") from None
    return lambda pairs: model.predict(list(pairs), show_progress_bar=False)


def mine(options: MineOptions, *, encoder: Optional[Encoder] = None, cross_encoder=None) -> MineSummary:
    """Run ``mine`` (see the module docstring). ``encoder``/``cross_encoder`` replace the loaded ones
    (tests); ``cross_encoder`` is ``pairs of (query text, corpus text) -> scores``."""
    started = time.monotonic()
    summary = MineSummary()
    pairs = read_pairs(options.pairs, min_score=options.pair_min_score)
    if options.limit:
        pairs = pairs[:options.limit]
    positives_of: dict[str, list[str]] = {}
    for query, positive in pairs:
        positives_of.setdefault(query, [])
        if positive not in positives_of[query]:
            positives_of[query].append(positive)
    corpus_texts = read_corpus(options.corpus) if options.corpus else []
    corpus = list(dict.fromkeys(corpus_texts + [p for _, p in pairs]))  # exact duplicates are one text
    where = {text: i for i, text in enumerate(corpus)}
    summary.pairs, summary.corpus = len(pairs), len(corpus)

    output = RowWriter(options.output)
    rejects = RowWriter(options.rejects_path)
    try:
        summary.done_before = output.rows + rejects.rows
        summary.dropped_torn_lines = [x for x in (output.dropped_torn_line, rejects.dropped_torn_line) if x]
        todo = [(q, p) for q, p in pairs if row_key({"query": q, "positive": p}) not in output.seen
                and row_key({"query": q, "positive": p}) not in rejects.seen]
        queries = list(dict.fromkeys(q for q, _ in todo))
        if not queries:
            summary.seconds = time.monotonic() - started
            return summary
        progress = sys.stderr.isatty() if options.progress is None else options.progress
        encoder = encoder or Encoder(options.model, batch_size=options.batch_size)
        corpus_vectors = _corpus_vectors(encoder, corpus, options, progress)
        topk = (lambda q, c, k: faiss_topk(q, c, k)) if options.use_faiss else chunked_topk
        if cross_encoder is None and options.cross_encoder:
            cross_encoder = _cross_encoder(options.cross_encoder)
        filters = options.filters()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(queries), unit="query", desc="mine", dynamic_ncols=True)
        for start in range(0, len(queries), options.query_chunk):
            chunk = queries[start:start + options.query_chunk]
            vectors = encoder.encode(chunk, instruction=options.instruction)
            ce = None
            if cross_encoder is not None:
                ce = (lambda offset: lambda rows: cross_encoder(
                    [(queries[offset + r], corpus[i]) for r, i in rows]))(start)
            window = mine_window(vectors, corpus_vectors, [[where[p] for p in positives_of[q]] for q in chunk],
                                 [where.get(q, -1) for q in chunk], filters, topk=topk, cross_encoder_scores=ce)
            for name, count in window.removed.items():
                summary.removed[name] = summary.removed.get(name, 0) + count
            for row, query in enumerate(chunk):
                banded = options.bands.split(window.scores[row].tolist(), window.indices[row].tolist())
                for positive in positives_of[query]:
                    base = {"query": query, "positive": positive}
                    key = row_key(base)
                    if key in output.seen or key in rejects.seen:
                        continue
                    rng = random.Random(f"{options.seed}/{key}")
                    chosen = options.bands.choose(banded, rng)
                    if chosen is None:
                        empty = [level for level in LEVELS_HARD_FIRST if not banded[level]]
                        rejects.write({**base, "reason": "no candidate left in the band of level "
                                       + ", ".join(map(str, empty))})
                        summary.rejected += 1
                        continue
                    negatives = []
                    for level in LEVELS_HARD_FIRST:
                        rank, index, score = chosen[level]
                        negatives.append({"text": corpus[index], "level": level, "score": round(score, 6),
                                          "rank": rank})
                        total = summary.level_scores.setdefault(level, [0.0, 0])
                        total[0] += score
                        total[1] += 1
                    record = {**base, "negatives": negatives,
                              "positive_score": round(float(window.positive_scores[row]), 6),
                              "task": options.task, "task_type": options.task_type, "miner": options.model}
                    if options.instruction:
                        record["instruction"] = options.instruction
                    output.write(record)
                    summary.written += 1
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    finally:
        output.close()
        rejects.close()
    summary.seconds = time.monotonic() - started
    return summary
