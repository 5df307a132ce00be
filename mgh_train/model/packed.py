"""The embedder's forward over packed rows (:mod:`mgh_train.packing` makes them): every attention
layer attends within its texts (``mgh_kernels.ata_attention_varlen``) and the pooling runs on the
packed hidden states (``mgh_kernels.packed_pool``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgh_kernels import enable_ata, packed_pool


def use_packed_attention(embedder) -> None:
    """Make the embedder's attention layers take packed rows: ATA pooling's capture re-enabled with
    ``packed=True``; other poolings ``VARLEN_ATTENTION`` in every layer (idempotent)."""
    from mgh_kernels.transformers import enable_varlen

    if embedder.capture is not None:
        if not embedder.capture.packed:
            embedder.capture.remove()
            embedder.capture = enable_ata(embedder.model, embedder.config.ata_layer, packed=True)
    else:
        enable_varlen(embedder.model)


def packed_embeddings(embedder, features: dict) -> torch.Tensor:
    """[n, H] float32 embeddings (unit length if ``normalize``) of a packed row's n texts: one forward
    of the [1, T] row with flash-attention's varlen arguments, then ``packed_pool``.
    What :meth:`~mgh_train.model.Embedder.forward` gives for the same texts padded."""
    use_packed_attention(embedder)
    device = embedder.device
    cu = features["cu_seqlens"].to(device, non_blocking=True)
    longest = int(features["max_seqlen"])
    out = embedder.model(
        input_ids=features["input_ids"].to(device),
        position_ids=features["position_ids"].to(device),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=longest,
        max_length_k=longest,
    )
    hidden = out.last_hidden_state[0]
    cfg = embedder.config
    extra = {"colsum": embedder.capture.colsum[0], "mix": cfg.ata_mix} if cfg.pooling == "ata" else {}
    emb = packed_pool(hidden.float(), cu, cfg.pooling, pool_mask=features["pool_mask"].to(device), **extra)
    return F.normalize(emb, dim=-1) if cfg.normalize else emb
