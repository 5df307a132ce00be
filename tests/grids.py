"""Pairwise subsets of parametrised test grids, for the default test run.

A test parametrised over several independent choices (shape, dtype, causal, padding side, path)
runs every combination: their product. Most bugs show with one or two choices set a certain way;
a set of cases holding every *pair* of values (every shape with every dtype, every dtype with
every padding side, ...) finds those at a small fraction of the cost (18 of 144 cases for
6 shapes x 2 x 3 x 2 x 2). The default run keeps such a subset; the other combinations carry the
``slow`` mark, so ``pytest -m slow`` runs them and the two runs together cover the whole product.
"""

from __future__ import annotations

from itertools import combinations

PAIRWISE_GRIDS = {
    # The default run keeps a pairwise subset of these tests' parameter grids (conftest.py marks
    # the other combinations slow: `pytest -m slow` runs them).
    "tests/test_attention.py::test_forward_matches_reference",
    "tests/test_attention.py::test_gradients_through_out_and_colsum",
    "tests/test_attention.py::test_unequal_query_and_key_tiles",
    "tests/test_attention.py::test_row_with_one_valid_token",
    "tests/test_attention_padding_values.py::test_nonfinite_padding_changes_nothing",
    "tests/test_autocast.py::test_enable_ata_under_autocast_matches_eager_attention",
    "tests/test_compile.py::test_infonce_in_a_full_graph",
    "tests/test_enable_ata.py::test_matches_eager_output_attentions",
    "tests/test_enable_ata_packed.py::test_packed_row_equals_padded_eager",
    "tests/test_infonce.py::test_backward_in_chunks",
    "tests/test_infonce.py::test_loss_and_gradients_match_reference",
    "tests/test_step.py::test_bucketed_micro_batch_equals_encoding_queries_and_documents_apart",
    "tests/test_varlen_attention.py::test_forward_matches_reference",
    "tests/test_varlen_attention.py::test_forward_without_colsum_matches_reference",
    "tests/test_varlen_attention.py::test_gradients_through_out_and_colsum",
}


def pairs_of(params: dict) -> set:
    """The (name, value) pairs one case sets: every value alone, and every two together."""
    values = sorted((name, repr(value)) for name, value in params.items())
    return set((v,) for v in values) | set(combinations(values, 2))


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
