"""mgh_kernels: pooling and loss operations for LLM text embedders, with eager references.

Public API::

    from mgh_kernels import ata_attention  # fused attention + per-key column sums (Triton)
    from mgh_kernels import enable_ata     # transformers integration: ATA without output_attentions
    from mgh_kernels import infonce_loss, InfoNCELoss  # fused InfoNCE, never stores the logits
    from mgh_kernels import ata_pool, pool, mean_pool, weighted_mean_pool, last_token_pool, first_token_pool
    from mgh_kernels import trusted_inputs  # skip value checks that sync (the caller built the masks)
    from mgh_kernels import reference   # eager ground truth: attention_with_colsum, ata_weights, infonce, ...

This package never imports the trainer (``mgh_train``).
"""

from . import reference
from .attention import ata_attention
from .infonce import InfoNCELoss, infonce_loss
from .pooling import (
    ATA_ATTENTION,
    POOLING_METHODS,
    ATACapture,
    enable_ata,
    ata_pool,
    first_token_pool,
    last_token_pool,
    mean_pool,
    pool,
    weighted_mean_pool,
)
from .reference import ata_weights
from ._validation import trusted_inputs

__version__ = "0.1.0"

__all__ = [
    "ATA_ATTENTION",
    "ATACapture",
    "InfoNCELoss",
    "POOLING_METHODS",
    "enable_ata",
    "ata_attention",
    "ata_pool",
    "ata_weights",
    "first_token_pool",
    "infonce_loss",
    "last_token_pool",
    "mean_pool",
    "pool",
    "reference",
    "trusted_inputs",
    "weighted_mean_pool",
]
