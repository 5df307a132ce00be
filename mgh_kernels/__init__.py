"""mgh_kernels: fused attention with column sums, fused InfoNCE, poolings and eager references for
LLM text embedders.

Public API::

    from mgh_kernels import ata_attention   # attention + per-key column sums, never L x L (Triton)
    from mgh_kernels import ata_attention_varlen   # the same over packed sequences (varlen convention)
    from mgh_kernels import infonce_loss, InfoNCELoss   # fused InfoNCE, never stores the logits
    from mgh_kernels import eager_infonce   # the same loss with its logits in memory (the eager baseline)
    from mgh_kernels import enable_ata      # transformers integration: ATA without output_attentions
    from mgh_kernels import ata_pool, pool, mean_pool, weighted_mean_pool, last_token_pool, first_token_pool
    from mgh_kernels import packed_pool     # the same poolings over packed rows [total, H] with cu_seqlens
    from mgh_kernels import ata_weights, colsum_from_attentions, NonFiniteError
    from mgh_kernels import trusted_inputs  # skip value checks that sync (the caller built the masks)
    from mgh_kernels import use_backend     # force the PyTorch path, or refuse it
    from mgh_kernels import reference       # eager oracles of the above, for tests and benchmarks only

Layout: ``attention/`` and ``infonce/`` (one package per fused op: kernels, tiles, registrations,
PyTorch path), ``pooling.py`` (``packed_pooling.py`` over packed rows), ``transformers.py`` (model
patching; ``hf_private.py`` holds every private transformers name it relies on), ``backend.py``
(which path runs), ``reference.py`` (the oracles: attention_with_colsum, attention_varlen_with_colsum,
colsum_from_attentions, infonce) and ``testing.py`` (poisoned outputs, recorded launches). Only this
front door imports ``reference``, to export it for tests and benchmarks (as FlagAttention's
``flag_attn`` exports its ``testing`` oracles): no other module here or in ``mgh_train`` does. Only the Triton kernel
files import triton: without it (macOS, Windows) everything runs on the PyTorch paths. This package
never imports the trainer (``mgh_train``).
"""

from . import backend as backend  # the module itself is public API: mgh_kernels.backend
from . import reference as reference  # the eager oracles, public as FlagAttention's testing module
from ._validation import NonFiniteError, trusted_inputs
from .attention import ata_attention, ata_attention_varlen
from .backend import use_backend
from .infonce import InfoNCELoss, eager_infonce, infonce_loss
from .packed_pooling import packed_pool
from .pooling import (
    POOLING_METHODS,
    ata_pool,
    ata_weights,
    colsum_from_attentions,
    first_token_pool,
    last_token_pool,
    mean_pool,
    pool,
    weighted_mean_pool,
)
from .transformers import ATA_ATTENTION, VARLEN_ATTENTION, ATACapture, enable_ata

__version__ = "0.1.0"

__all__ = [
    "ATA_ATTENTION",
    "ATACapture",
    "InfoNCELoss",
    "NonFiniteError",
    "POOLING_METHODS",
    "VARLEN_ATTENTION",
    "enable_ata",
    "ata_attention",
    "ata_attention_varlen",
    "ata_pool",
    "ata_weights",
    "colsum_from_attentions",
    "eager_infonce",
    "first_token_pool",
    "infonce_loss",
    "last_token_pool",
    "mean_pool",
    "packed_pool",
    "pool",
    "reference",
    "trusted_inputs",
    "use_backend",
    "weighted_mean_pool",
]
