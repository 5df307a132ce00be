"""Pairwise subsets of parametrised test grids, for the default test run.

A test parametrised over several independent choices (shape, dtype, causal, padding side, path)
runs every combination: their product. Most bugs show with one or two choices set a certain way;
a set of cases holding every *pair* of values (every shape with every dtype, every dtype with
every padding side, ...) finds those at a small fraction of the cost (about 20 of 144 cases for
6 shapes x 2 x 3 x 2 x 2). The default run keeps such a subset; the other combinations carry the
``slow`` mark, so ``pytest -m slow`` runs them and the two runs together cover the whole product.
"""

from __future__ import annotations

from itertools import combinations


def pairs_of(params: dict) -> set:
    """The (name, value) pairs one case sets: every value alone, and every two together."""
    values = sorted((name, repr(value)) for name, value in params.items())
    return set(((v,) for v in values)) | set(combinations(values, 2))


def pairwise_cover(cases: list[dict]) -> list[int]:
    """Indices of a subset of ``cases`` (each a {parameter: value} dict) holding every value and
    every pair of values that any case holds; greedy (the case adding most new pairs next, the
    earliest on a tie), so the same cases give the same subset in every process."""
    wanted = [pairs_of(case) for case in cases]
    uncovered = set().union(*wanted) if wanted else set()
    chosen: list[int] = []
    while uncovered:
        best = max(range(len(cases)), key=lambda i: (len(wanted[i] & uncovered), -i))
        chosen.append(best)
        uncovered -= wanted[best]
    return sorted(chosen)
