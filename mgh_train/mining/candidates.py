"""Candidate negatives per query, with sentence-transformers' false-negative filters.

:func:`mine_window` follows ``sentence_transformers.util.mine_hard_negatives`` (6.3) step by step,
so that with the same embeddings, range and margins it keeps the same candidates in the same order:

1. retrieve the top ``range_max + max_positives + 1`` corpus entries per query (exact, chunked);
2. drop the query itself (when it is a corpus text) and every positive of the query;
3. drop candidates within a margin of the query's hardest positive (the lowest positive score):
   ``absolute_margin``: ``score + absolute_margin > positive``; ``relative_margin``:
   ``score > positive - |positive| * relative_margin``; then ``score > max_score`` and
   ``score < min_score``;
4. optionally drop candidates a cross-encoder scores above ``cross_encoder_max_score`` (ours:
   sentence-transformers rescores with the cross-encoder instead);
5. keep the ``range_max`` best survivors and drop the first ``range_min``: the *window*.

Ranks are counted among survivors, as sentence-transformers counts ``range_min``/``range_max``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .topk import chunked_topk


@dataclass(frozen=True)
class Filters:
    """The false-negative filters and the rank range (see the module docstring)."""

    range_min: int = 0
    range_max: int = 128
    absolute_margin: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None
    cross_encoder_max_score: float | None = None

    def __post_init__(self):
        if not isinstance(self.range_min, int) or self.range_min < 0:
            raise ValueError(f"range_min: expected an integer >= 0, got {self.range_min!r}")
        if not isinstance(self.range_max, int) or self.range_max <= self.range_min:
            raise ValueError(
                f"range_max: expected an integer above range_min ({self.range_min}), got {self.range_max!r}"
            )
        for name in ("absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


@dataclass
class Window:
    """Per query: ``scores`` [Q, W] float32 (descending, ``-inf`` where no candidate survived),
    ``indices`` [Q, W] int64 into the corpus (-1 there), ``positive_scores`` [Q] (the hardest
    positive's score) and ``removed`` (filter name -> candidates it dropped)."""

    scores: torch.Tensor
    indices: torch.Tensor
    positive_scores: torch.Tensor
    removed: dict


def mine_window(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    positives: Sequence[Sequence[int]],
    query_in_corpus: Sequence[int],
    filters: Filters,
    *,
    topk: Callable = chunked_topk,
    cross_encoder_scores: Callable[[list[tuple[int, int]]], Sequence[float]] | None = None,
) -> Window:
    """The candidate window of each query (see the module docstring).

    Args:
        queries: [Q, D] unit vectors; corpus: [N, D] unit vectors (cosine similarity = dot product).
        positives: per query, the corpus indices of its positives (at least one each).
        query_in_corpus: per query, its own corpus index or -1.
        filters: :class:`Filters`.
        topk: ``(queries, corpus, k) -> (scores, indices)``; :func:`chunked_topk` or ``faiss_topk``.
        cross_encoder_scores: given (query row, corpus index) pairs, their cross-encoder scores.
    """
    if len(positives) != queries.shape[0] or len(query_in_corpus) != queries.shape[0]:
        raise ValueError("positives/query_in_corpus: expected one entry per query")
    if any(len(p) == 0 for p in positives):
        raise ValueError("positives: every query needs at least one positive")
    max_positives = max((len(p) for p in positives), default=1)
    scores, indices = topk(queries, corpus, filters.range_max + max_positives + 1)
    scores = _without_query_and_positives(scores.clone(), indices, positives, query_in_corpus)
    positive_scores = (
        torch.stack([(queries[row].float() @ corpus[list(own)].float().T).min() for row, own in enumerate(positives)])
        if queries.shape[0]
        else torch.empty(0)
    )
    removed = _drop_false_negatives(scores, indices, positive_scores.unsqueeze(1), filters, cross_encoder_scores)
    k = min(filters.range_max, scores.shape[1])
    top, local = torch.topk(scores, k, dim=1)
    picked = torch.gather(indices, 1, local)
    top, picked = top[:, filters.range_min :], picked[:, filters.range_min :]
    picked = torch.where(torch.isfinite(top), picked, torch.full_like(picked, -1))
    return Window(top, picked, positive_scores, removed)


def _without_query_and_positives(
    scores: torch.Tensor, indices: torch.Tensor, positives: Sequence[Sequence[int]], query_in_corpus: Sequence[int]
) -> torch.Tensor:
    """``scores`` with ``-inf`` at empty slots (index -1), at the query itself and at its positives (step 2)."""
    scores[indices == -1] = float("-inf")
    scores[indices == torch.tensor(list(query_in_corpus)).unsqueeze(1)] = float("-inf")
    for row, own in enumerate(positives):
        scores[row, torch.isin(indices[row], torch.tensor(list(own)))] = float("-inf")
    return scores


def _drop_false_negatives(
    scores: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor, filters: Filters, cross_encoder_scores
) -> dict:
    """Set to ``-inf`` the candidates the filters drop (steps 3 and 4), in place; filter name -> how many
    it dropped. ``threshold`` [Q, 1]: each query's hardest positive score."""
    removed = {}

    def drop(name: str, mask: torch.Tensor) -> None:
        mask = mask & torch.isfinite(scores)
        if int(mask.sum()):
            removed[name] = removed.get(name, 0) + int(mask.sum())
        scores[mask] = float("-inf")

    if filters.absolute_margin is not None:
        drop("absolute_margin", scores + filters.absolute_margin > threshold)
    if filters.relative_margin is not None:
        drop("relative_margin", scores > threshold - threshold.abs() * filters.relative_margin)
    if filters.max_score is not None:
        drop("max_score", scores > filters.max_score)
    if filters.min_score is not None:
        drop("min_score", scores < filters.min_score)
    if cross_encoder_scores is not None and filters.cross_encoder_max_score is not None:
        alive = torch.isfinite(scores).nonzero().tolist()
        if alive:
            judged = torch.tensor([float(s) for s in cross_encoder_scores([(r, int(indices[r, c])) for r, c in alive])])
            mask = torch.zeros_like(scores, dtype=torch.bool)
            rows, cols = torch.tensor(alive).T
            mask[rows, cols] = judged > filters.cross_encoder_max_score
            drop("cross_encoder", mask)
    return removed
