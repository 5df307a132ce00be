"""Exact top-k of cosine similarities, in chunks: never a queries x corpus matrix for the whole corpus.

:func:`chunked_topk` is ``torch.topk(queries @ corpus.T, k)`` computed over ``query_chunk x
corpus_chunk`` blocks with a running merge, so memory is bounded by one block plus the [Q, k]
result. :func:`faiss_topk` does the same with a ``faiss.IndexFlatIP`` (inner product, exact) for
corpora whose scores should not go through torch; faiss is an optional extra.
"""

from __future__ import annotations

import torch


def _check(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> None:
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"queries/corpus: expected [Q, D] and [N, D] with the same D, got "
            f"{tuple(queries.shape)} and {tuple(corpus.shape)}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")


def chunked_topk(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, query_chunk: int = 1024, corpus_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query over the corpus.

    Args:
        queries: [Q, D] float (unit vectors for cosine similarity).
        corpus: [N, D] float, same dtype.
        k: candidates per query; when ``k > N`` the result is padded with score ``-inf`` and index -1
            (as sentence-transformers pads its faiss results).
    Returns:
        (scores [Q, k] float32 descending, indices [Q, k] int64): equal to
        ``torch.topk(queries @ corpus.T, min(k, N))`` up to the order of exact ties.
    """
    _check(queries, corpus, k)
    if query_chunk < 1 or corpus_chunk < 1:
        raise ValueError(f"query_chunk/corpus_chunk: expected positive sizes, got {query_chunk}, {corpus_chunk}")
    n = corpus.shape[0]
    kept = min(k, n)
    out_scores = torch.full((queries.shape[0], k), float("-inf"), dtype=torch.float32)
    out_indices = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk]
        best_s = best_i = None
        for c0 in range(0, n, corpus_chunk):
            block = (q @ corpus[c0 : c0 + corpus_chunk].T).float()  # [q, c]: one block at a time
            s, i = torch.topk(block, min(kept, block.shape[1]), dim=1)
            i = i + c0
            if best_s is not None:  # merge with the best so far
                s, j = torch.topk(torch.cat([best_s, s], 1), kept, dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, j)
            best_s, best_i = s, i
        if best_s is not None:
            out_scores[q0 : q0 + q.shape[0], :kept] = best_s
            out_indices[q0 : q0 + q.shape[0], :kept] = best_i
    return out_scores, out_indices


def faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def faiss_topk(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, query_chunk: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`chunked_topk` through ``faiss.IndexFlatIP`` (exact); ValueError when faiss is missing."""
    _check(queries, corpus, k)
    if not faiss_available():
        raise ValueError(
            "use_faiss: faiss is not installed (pip install faiss-cpu), or mine without --faiss "
            "(exact chunked top-k with torch)"
        )
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus.float().numpy()))
    scores, indices = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        s, i = index.search(np.ascontiguousarray(queries[q0 : q0 + query_chunk].float().numpy()), k)
        scores.append(torch.from_numpy(s))
        indices.append(torch.from_numpy(i).long())
    scores, indices = torch.cat(scores), torch.cat(indices)
    scores[indices < 0] = float("-inf")
    return scores, indices
