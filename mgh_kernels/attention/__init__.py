"""Flash attention that also emits per-key column sums (the weights of ATA pooling).

``ata_attention(q, k, v, ...)`` returns the attention output and, for each key, the attention it
receives: the sum over valid queries of the softmax probabilities, averaged over query heads, with
the semantics of ``reference.attention_with_colsum``, never storing an L x L matrix.

Scope and caveats: self-attention only (queries and keys are the same L positions), causal or
bidirectional, a [B, L] key padding mask (left or right), GQA, head dims up to 256; no dropout, no
sliding window, no KV cache. Forward and backward are exact through both outputs (the column-sum
gradient flows through the softmax). bfloat16 runs on CUDA only (Triton's interpreter has none);
the GPU tile choices were measured on an H100 (``benchmarks/RESULTS.md``).

Where each concept lives:

* ``functional.py``: ``ata_attention`` (checks, path, autocast), ``last_backend``, ``last_forward``;
* ``ops.py``: which forward runs, the autograd Function and the torch.library custom ops;
* ``forward.py``: the flash pass and the one-sweep forward of short sequences (Triton);
* ``colsum.py``: the column-sum pass (Triton);
* ``backward.py``: the three backward kernels (Triton);
* ``masking.py``: the Triton helpers and conventions every kernel shares;
* ``tiles.py``: the tile choices and ``SHORT_MAX_LENGTH`` (documented, overridable);
* ``cudnn.py``: the cuDNN gate and ``FLASH_PASS`` (documented, overridable);
* ``torch_path.py``: the PyTorch path; ``cpu_flash.py`` its CPU forward and backward;
* ``varlen.py``: ``ata_attention_varlen`` (packed sequences, flash-attention's varlen convention),
  its autograd Function and PyTorch path; ``varlen_kernels.py`` its Triton kernels.

Only the Triton files import triton; without it ``ata_attention`` runs its PyTorch path.
"""

from __future__ import annotations

from . import cudnn, tiles
from .functional import MAX_HEAD_DIM, ata_attention, last_backend, last_forward
from .varlen import ata_attention_varlen

__all__ = ["MAX_HEAD_DIM", "ata_attention", "ata_attention_varlen", "cudnn", "last_backend", "last_forward", "tiles"]
