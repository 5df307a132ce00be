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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..synth.verify import DEFAULT_JUDGE, Judge
from ..synth.writer import RowWriter, beside, row_key
from .bands import LEVELS_HARD_FIRST, Bands
from .candidates import Filters, Window, mine_window
from .inputs import read_corpus, read_pairs
from .topk import chunked_topk, faiss_topk


@dataclass
class MineOptions:
    """Everything one ``mine`` run needs; see ``python -m mgh_train mine --help``."""

    pairs: Sequence[str]
    output: str
    corpus: Sequence[str] | None = None  # None: the positives themselves
    model: str = DEFAULT_JUDGE
    pair_min_score: float | None = None
    bands: Bands = field(default_factory=Bands)
    range_max: int = 128  # with score bands: candidates considered per query
    absolute_margin: float | None = None
    relative_margin: float | None = 0.05
    max_score: float | None = None
    min_score: float | None = None
    cross_encoder: str | None = None
    cross_encoder_max_score: float | None = None
    batch_size: int = 64
    query_chunk: int = 512
    use_faiss: bool = False
    seed: int = 0
    instruction: str | None = None
    task: str = "mined"
    task_type: str = "mined"
    limit: int = 0
    progress: bool | None = None

    def __post_init__(self):
        for name in ("batch_size", "query_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.limit, int) or self.limit < 0:
            raise ValueError(f"limit: expected an integer >= 0, got {self.limit!r}")
        if (self.cross_encoder is None) != (self.cross_encoder_max_score is None):
            raise ValueError(
                "cross_encoder_max_score: give it together with --cross-encoder (a threshold on "
                "the cross-encoder's score above which a candidate is a false-negative suspect)"
            )
        if Path(self.output).is_dir():
            raise ValueError(f"output: {self.output} is a folder; expected a .jsonl file path")
        self.filters()  # validates the range and margins

    def filters(self) -> Filters:
        lo, hi = (self.bands.rank[0], self.bands.rank[-1]) if self.bands.rank is not None else (0, self.range_max)
        return Filters(
            range_min=lo,
            range_max=hi,
            absolute_margin=self.absolute_margin,
            relative_margin=self.relative_margin,
            max_score=self.max_score,
            min_score=self.min_score,
            cross_encoder_max_score=self.cross_encoder_max_score,
        )

    @property
    def rejects_path(self) -> Path:
        return beside(Path(self.output), "rejects.jsonl")

    @property
    def cache_path(self) -> Path:
        return beside(Path(self.output), "corpus.pt")


@dataclass
class MineSummary:
    """What a ``mine`` run did (``done_before``: pairs in the output or rejects file before it), the
    sizes of its inputs, and what the filters removed; :meth:`lines` for the console."""

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
        out = [
            f"wrote {self.written} rows and rejected {self.rejected} pairs in this run ({self.done_before} "
            f"done before it) from {self.pairs} pairs over a corpus of {self.corpus} texts, {self.seconds:.1f} s"
        ]
        for name, count in sorted(self.removed.items()):
            out.append(f"  removed {count} candidates by {name}")
        if self.level_scores:
            out.append(
                "mean similarity per level: "
                + ", ".join(
                    f"{level}: {s / n:.3f}" for level, (s, n) in sorted(self.level_scores.items(), reverse=True) if n
                )
            )
        for line in self.dropped_torn_lines:
            out.append(f"dropped a torn last line (the previous run was killed mid-write): {line}")
        return out


class Encoder(Judge):
    """Unit-length embeddings (float32, CPU) from a sentence-transformers or mgh model folder."""

    def encode(self, texts: Sequence[str], instruction=None, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.empty(0)
        if self._mgh is not None:  # length-sorted batches inside Embedder.encode
            vectors = self._mgh.encode(
                list(texts), instruction=instruction, batch_size=self.batch_size, show_progress=progress
            )
            return torch.nn.functional.normalize(vectors.float(), dim=-1)
        return (
            self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_tensor=True,
                show_progress_bar=progress,
            )
            .float()
            .cpu()
        )


def mine(options: MineOptions, *, encoder: Encoder | None = None, cross_encoder=None) -> MineSummary:
    """Run ``mine`` (see the module docstring). ``encoder``/``cross_encoder`` replace the loaded ones
    (tests); ``cross_encoder`` is ``pairs of (query text, corpus text) -> scores``."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    inputs = _read_inputs(options)
    summary = MineSummary(pairs=len(inputs.pairs), corpus=len(inputs.corpus))
    files = _Files(options, summary)
    try:
        queries = list(dict.fromkeys(q for q, p in inputs.pairs if not files.done(_key(q, p))))
        if queries:
            progress = sys.stderr.isatty() if options.progress is None else options.progress
            encoder = encoder or Encoder(options.model, batch_size=options.batch_size)
            corpus_vectors = _corpus_vectors(encoder, inputs.corpus, options, progress)
            if cross_encoder is None and options.cross_encoder:
                cross_encoder = _cross_encoder(options.cross_encoder)
            bar = tqdm(total=len(queries), unit="query", desc="mine", dynamic_ncols=True, disable=not progress)
            for start in range(0, len(queries), options.query_chunk):
                chunk = queries[start : start + options.query_chunk]
                window = _window(chunk, inputs, corpus_vectors, encoder, cross_encoder, options)
                for name, count in window.removed.items():
                    summary.removed[name] = summary.removed.get(name, 0) + count
                _write_rows(chunk, window, inputs, files, options)
                bar.update(len(chunk))
            bar.close()
    finally:
        files.close()
    summary.seconds = time.monotonic() - started
    return summary


@dataclass
class _Inputs:
    """The pairs of a run and the corpus their negatives come from."""

    pairs: list[tuple[str, str]]
    positives_of: dict[str, list[str]]  # query -> its positives, in order, each once
    corpus: list[str]  # the corpus texts, then the positives; exact duplicates are one text
    where: dict[str, int]  # corpus text -> its index


def _read_inputs(options: MineOptions) -> _Inputs:
    pairs = read_pairs(options.pairs, min_score=options.pair_min_score)
    if options.limit:
        pairs = pairs[: options.limit]
    positives_of: dict[str, list[str]] = {}
    for query, positive in pairs:
        positives_of.setdefault(query, [])
        if positive not in positives_of[query]:
            positives_of[query].append(positive)
    corpus_texts = read_corpus(options.corpus) if options.corpus else []
    corpus = list(dict.fromkeys(corpus_texts + [p for _, p in pairs]))
    return _Inputs(pairs, positives_of, corpus, {text: i for i, text in enumerate(corpus)})


class _Files:
    """The output and rejects files of a run; what they take is counted in the run's summary."""

    def __init__(self, options: MineOptions, summary: MineSummary):
        self.summary = summary
        self.output = RowWriter(options.output)
        self.rejects = RowWriter(options.rejects_path)
        summary.done_before = self.output.rows + self.rejects.rows
        summary.dropped_torn_lines = [x for x in (self.output.dropped_torn_line, self.rejects.dropped_torn_line) if x]

    def done(self, key: str) -> bool:
        return key in self.output.seen or key in self.rejects.seen

    def write(self, record: dict, chosen: dict) -> None:
        self.output.write(record)
        self.summary.written += 1
        for level in LEVELS_HARD_FIRST:
            total = self.summary.level_scores.setdefault(level, [0.0, 0])
            total[0] += chosen[level][2]
            total[1] += 1

    def reject(self, pair: dict, banded: dict) -> None:
        empty = [level for level in LEVELS_HARD_FIRST if not banded[level]]
        self.rejects.write({**pair, "reason": "no candidate left in the band of level " + ", ".join(map(str, empty))})
        self.summary.rejected += 1

    def close(self) -> None:
        self.output.close()
        self.rejects.close()


def _key(query: str, positive: str) -> str:
    return row_key({"query": query, "positive": positive})


def _corpus_vectors(encoder: Encoder, corpus: list[str], options: MineOptions, progress: bool) -> torch.Tensor:
    digest = hashlib.sha256(repr((options.model, corpus)).encode()).hexdigest()
    path = options.cache_path
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == digest:
                return cached["vectors"]
        except Exception:  # noqa: BLE001 - a cache torn by a kill: embed again
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


def _window(
    chunk: list[str],
    inputs: _Inputs,
    corpus_vectors: torch.Tensor,
    encoder: Encoder,
    cross_encoder,
    options: MineOptions,
) -> Window:
    """Embed a chunk of queries and keep the candidate window of each (:func:`mine_window`)."""
    rescore = None
    if cross_encoder is not None:

        def rescore(rows):  # (row in the chunk, corpus index) pairs -> cross-encoder scores
            return cross_encoder([(chunk[r], inputs.corpus[i]) for r, i in rows])

    return mine_window(
        encoder.encode(chunk, instruction=options.instruction),
        corpus_vectors,
        [[inputs.where[p] for p in inputs.positives_of[q]] for q in chunk],
        [inputs.where.get(q, -1) for q in chunk],
        options.filters(),
        topk=faiss_topk if options.use_faiss else chunked_topk,
        cross_encoder_scores=rescore,
    )


def _write_rows(chunk: list[str], window: Window, inputs: _Inputs, files: _Files, options: MineOptions) -> None:
    """A row, or a reject, for each pair of the chunk's queries not done before; which negative a band
    gives is drawn from ``(seed, row key)``."""
    for row, query in enumerate(chunk):
        banded = options.bands.split(window.scores[row].tolist(), window.indices[row].tolist())
        for positive in inputs.positives_of[query]:
            key = _key(query, positive)
            if files.done(key):
                continue
            pair = {"query": query, "positive": positive}
            chosen = options.bands.choose(banded, random.Random(f"{options.seed}/{key}"))
            if chosen is None:
                files.reject(pair, banded)
            else:
                files.write(_record(pair, chosen, float(window.positive_scores[row]), inputs.corpus, options), chosen)


def _record(pair: dict, chosen: dict, positive_score: float, corpus: list[str], options: MineOptions) -> dict:
    """The MGH row of ``pair`` (query and positive) with the negatives ``chosen`` (level -> (rank, index, score))."""
    negatives = []
    for level in LEVELS_HARD_FIRST:
        rank, index, score = chosen[level]
        negatives.append({"text": corpus[index], "level": level, "score": round(score, 6), "rank": rank})
    record = {
        **pair,
        "negatives": negatives,
        "positive_score": round(positive_score, 6),
        "task": options.task,
        "task_type": options.task_type,
        "miner": options.model,
    }
    if options.instruction:
        record["instruction"] = options.instruction
    return record
