"""The cross-rank gather behind ``infonce_loss(..., gather=True)``: every rank's positives and
negatives become candidates of every rank's queries.

It uses PyTorch's functional collectives (``torch.distributed._functional_collectives``), which
carry gradients (the backward is a reduce-scatter with sum: each rank's embeddings get the
gradient of every rank's loss) and which torch.compile traces into the graph. Averaged over
ranks as DDP does, loss and gradients then equal one process holding the whole batch.

Caveats: every rank must hold the same batch size B and number of negatives K; the group is the
default (world) group.
"""

from __future__ import annotations

import torch

__all__ = ["gather_candidates"]


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """[W * rows, D]: ``t`` [rows, D] of every rank in rank order, differentiable."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd  # torch < 2.13
    return fc.wait_tensor(gather(t, 0, dist.group.WORLD))


def gather_candidates(pos: torch.Tensor, neg: torch.Tensor, batch: int):
    """(all ranks' positives [W * B, D], all ranks' negatives [W * B * K, D], this rank's positive
    offset ``rank * batch``): query i of this rank targets row ``offset + i`` of the positives.

    Example (inside ``infonce_loss``)::

        pos_all, neg_all, offset = gather_candidates(pos, neg.reshape(-1, D), B)

    Like sentence-transformers' ``gather_across_devices``, on the non-deprecated collectives.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather: expected an initialised torch.distributed process group, found none")
    return _all_gather(pos), _all_gather(neg), dist.get_rank() * batch
