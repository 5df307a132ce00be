"""``python -m mgh_train mine``: graded hard negatives mined from a corpus with an existing embedder.

Modules: :mod:`.topk` (exact chunked top-k, optional faiss), :mod:`.candidates` (false-negative
filters with sentence-transformers' ``mine_hard_negatives`` meaning), :mod:`.bands` (rank or score
bands -> levels 4..1), :mod:`.inputs` (pairs and corpus readers), :mod:`.run` (the resumable
writer), :mod:`.cli` (flags).
"""
