"""Levels from the candidate window: rank bands (default) or score bands, level 4 = the hardest.

Rank bands ``b0 < b1 < b2 < b3 < b4`` (ranks among the candidates that survived the filters, 0 =
most similar, as sentence-transformers counts ``range_min``/``range_max``): level 4 takes ranks
``[b0, b1)``, level 3 ``[b1, b2)``, level 2 ``[b2, b3)``, level 1 ``[b3, b4)``. So ``b0`` is
``range_min`` and ``b4`` is ``range_max``.

Score bands ``s0 > s1 > s2 > s3 > s4`` (cosine similarity to the query): level 4 takes scores in
``(s1, s0]``, level 3 ``(s2, s1]``, level 2 ``(s3, s2]``, level 1 ``(s4, s3]``.

From each band one negative is picked: the most similar (``top``) or one at random (``random``,
seeded per row, so a resumed run picks the same).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

LEVELS_HARD_FIRST = (4, 3, 2, 1)
PICKS = ("random", "top")


def parse_bounds(text, kind=int) -> tuple:
    """``"0,4,16,48,128"`` (or a sequence) -> a tuple of five numbers."""
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"bands: expected five comma-separated {kind.__name__}s, got {text!r}") from None
    if len(out) != 5:
        raise ValueError(f"bands: expected five bounds (four bands, level 4 first), got {len(out)} in {text!r}")
    return out


@dataclass(frozen=True)
class Bands:
    """``rank`` (5 increasing ranks) or ``score`` (5 decreasing scores); exactly one is set."""

    rank: tuple | None = (0, 4, 16, 48, 128)
    score: tuple | None = None
    pick: str = "random"

    def __post_init__(self):
        if (self.rank is None) == (self.score is None):
            raise ValueError("bands: give rank bands or score bands, not both")
        if self.rank is not None:
            if (
                any(not isinstance(b, int) for b in self.rank)
                or self.rank[0] < 0
                or any(a >= b for a, b in zip(self.rank, self.rank[1:]))
            ):
                raise ValueError(f"bands: expected five increasing ranks >= 0, got {self.rank}")
        else:
            if any(a <= b for a, b in zip(self.score, self.score[1:])):
                raise ValueError(f"score_bands: expected five decreasing scores, got {self.score}")
        if self.pick not in PICKS:
            raise ValueError(f"pick: expected one of {', '.join(PICKS)}, got {self.pick!r}")

    @property
    def range_min(self) -> int:
        return self.rank[0] if self.rank is not None else 0

    def split(self, scores: Sequence[float], indices: Sequence[int]) -> dict:
        """level -> [(rank, corpus index, score)] for one query's window (scores descending,
        starting at rank ``range_min``; entries with index -1 are empty)."""
        out = {level: [] for level in LEVELS_HARD_FIRST}
        for offset, (score, index) in enumerate(zip(scores, indices)):
            if index < 0:
                continue
            rank = self.range_min + offset
            level = self._level(rank, score)
            if level is not None:
                out[level].append((rank, int(index), float(score)))
        return out

    def _level(self, rank: int, score: float) -> int | None:
        if self.rank is not None:
            for level, (lo, hi) in zip(LEVELS_HARD_FIRST, zip(self.rank, self.rank[1:])):
                if lo <= rank < hi:
                    return level
            return None
        for level, (hi, lo) in zip(LEVELS_HARD_FIRST, zip(self.score, self.score[1:])):
            if lo < score <= hi:
                return level
        return None

    def choose(self, banded: dict, rng: random.Random) -> dict | None:
        """level -> (rank, index, score), one per level; None when a band is empty."""
        if any(not banded[level] for level in LEVELS_HARD_FIRST):
            return None
        if self.pick == "top":
            return {level: banded[level][0] for level in LEVELS_HARD_FIRST}
        return {level: rng.choice(banded[level]) for level in LEVELS_HARD_FIRST}
