"""Fused InfoNCE with in-batch and hard negatives that never stores the logit matrix.

``infonce_loss(q, pos, neg, ...)`` has the semantics of ``reference.infonce`` (cosine similarities
over L2-normalised vectors, temperature ``tau``, "global" or "own" candidates): with "global" it is
sentence-transformers' MultipleNegativesRankingLoss, loss and gradients.

Scope and caveats: the inputs are never normalised in memory; the kernels take the raw embeddings
and their inverse norms, O(B(1+K)) floats. With N = B(1+K) candidates, one "GEMM" is 2 B N D
FLOPs: "global" costs one in the forward and three in the backward (four when memory is short),
against three for the eager loss plus several passes over B x N matrices. Memory beyond inputs
and gradients: O(B(1+K)) statistics and the backward's scratch, at most a byte per logit it does
not store (or 1 MiB), E at most 256 MiB. The kernels recompute the similarities over the whole
of D per tile; GPU tiles were chosen from static measures (``benchmarks/RESULTS.md``).

Where each concept lives:

* ``loss.py``: ``infonce_loss``, ``InfoNCELoss``, ``last_backend`` (checks, path, autocast, gather);
* ``ops.py``: the autograd Function and the torch.library custom ops, on the same host code;
* ``forward.py``: inverse norms, the "global" split statistics, the "own" logits (Triton);
* ``backward.py``: logit gradients, gradient scale, projections, the "own" backward (Triton);
* ``logits.py``: the Triton arithmetic forward and backward share, so both round alike;
* ``planner.py``: candidate splits and the backward's chunking within its budget (pure Python);
* ``tiles.py``: the kernels' tiles (documented, overridable);
* ``gather.py``: the cross-rank gather (functional collectives);
* ``torch_path.py``: the PyTorch path;
* ``eager.py``: ``eager_infonce``, the same loss with its logits in memory (the eager baseline).

Only the Triton files import triton; without it ``infonce_loss`` runs its PyTorch path.
"""

from __future__ import annotations

from . import gather, planner, tiles
from .eager import eager_infonce
from .loss import InfoNCELoss, infonce_loss, last_backend

__all__ = ["InfoNCELoss", "eager_infonce", "gather", "infonce_loss", "last_backend", "planner", "tiles"]
