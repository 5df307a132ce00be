"""Padding-free training (``--packing``): a micro-batch's texts concatenated into packed rows, each
text attending only to itself, so no FLOP is spent on padding.

    collate = PackingCollate(tokenizer, config, max_tokens=4096)     # instead of Collate's buckets
    batch = collate(plan)                          # MicroBatch whose buckets are packed rows
    emb = embedder(batch.buckets[0])               # Embedder.forward sees cu_seqlens: packed_embeddings

A packed row is what transformers' ``DataCollatorWithFlattening`` makes for its flash-attention
path: ``input_ids`` and ``position_ids`` [1, T] (positions restart at 0 at each text), with
flash-attention's varlen arguments ``cu_seqlens`` [n + 1] int32 and ``max_seqlen`` (an int), and
here ``pool_mask`` [T] (the instruction's tokens excluded as in the padded ``pool_mask``). The
embedder's attention layers then run ``mgh_kernels.ata_attention_varlen``
(``enable_ata(model, packed=True)``; ``VARLEN_ATTENTION`` in every layer for the other poolings),
and the pooling is ``mgh_kernels.packed_pool``: never a padded tensor nor a T x T mask.

Texts go into rows by first-fit decreasing under a token budget (``max_tokens``: real tokens per
forward; a longer text is a row of its own), or without one in runs of ``chunk_size`` texts (0:
the whole micro-batch is one row). Under GradCache the rows are its chunks, so chunks are cut by
real tokens. Where every forward is collective (FSDP2) a rank cannot know the others' rows, so a
budget is refused there and the rows are as many on every rank (one, or one per ``chunk_size``
texts).

Relation to the padded path (:class:`mgh_train.batches.Collate`): the same texts, embeddings,
loss and gradients within float32 rounding (tests/test_packing.py), in one forward instead of up
to ``max_buckets`` padded ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .batches import Collate, MicroBatch, Plan, chunks
from .model.packed import packed_embeddings, use_packed_attention


def is_packed(features: dict) -> bool:
    """Whether ``features`` is a packed row (:func:`pack`) rather than a padded batch."""
    return "cu_seqlens" in features


def texts_in(features: dict) -> int:
    """How many texts (embeddings) a packed row or a padded batch holds."""
    return features["cu_seqlens"].numel() - 1 if is_packed(features) else features["input_ids"].shape[0]


def pack_bins(lengths: Sequence[int], *, tokens: int = 0, size: int = 0) -> list[list[int]]:
    """The texts of these token ``lengths`` grouped into packed rows, longest text first in each.

    With a budget ``tokens`` (real tokens per row): first-fit decreasing, at most ``size`` texts a
    row (0: no cap); a text longer than the budget is a row of its own. Without one: the texts,
    longest first, in runs of ``size`` (0: one row), as many rows on every rank of equal batches.
    """
    if not tokens:
        return chunks(lengths, size=size, multiple=1)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free and (not size or len(rows[r]) < size):
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(tokens - lengths[i])
    return rows


def pack(rows: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]]) -> dict:
    """One packed row of tokenized texts (ids and pooled flags as :func:`mgh_train.model.token_ids`
    gives them): ``input_ids``, ``position_ids`` [1, T] int64, ``pool_mask`` [T] int64,
    ``cu_seqlens`` [n + 1] int32 and ``max_seqlen`` (int)."""
    lengths = [len(r) for r in rows]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"rows: expected texts of at least one token, got lengths {lengths}")
    return {
        "input_ids": torch.tensor([t for r in rows for t in r], dtype=torch.long)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "pool_mask": torch.tensor([bool(f) for row in flags for f in row], dtype=torch.long),
        "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
        "max_seqlen": max(lengths),
    }


def from_padded(features: dict) -> dict:
    """The packed row of a padded batch (``input_ids``, ``attention_mask``, ``pool_mask`` [B, L], left
    or right padding): each row's real tokens in order, the padding dropped."""
    mask = features["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    ids, pooled = features["input_ids"][mask].tolist(), features["pool_mask"][mask].tolist()
    bounds = [0, *itertools.accumulate(lengths)]
    return pack([ids[a:b] for a, b in zip(bounds, bounds[1:])], [pooled[a:b] for a, b in zip(bounds, bounds[1:])])


class PackingCollate(Collate):
    """:class:`~mgh_train.batches.Collate` whose micro-batches hold packed rows instead of padded
    buckets (picklable: it runs in DataLoader workers).

    Args:
        tokenizer, config: the embedder's tokenizer and :class:`~mgh_train.model.EmbedderConfig`.
        max_tokens: real tokens per packed row (0: no budget); see :func:`pack_bins`.
        chunk_size: texts per row at most (GradCache's ``--chunk-size``; 0: no cap).
        one_forward: every forward is collective (FSDP2): no token budget.
    """

    def __init__(self, tokenizer, config, *, max_tokens: int = 0, chunk_size: int = 0, one_forward: bool = False):
        super().__init__(tokenizer, config, chunk_size=chunk_size, one_forward=one_forward)
        check_max_tokens(max_tokens, collective=one_forward)
        self.max_tokens = max_tokens

    def assemble(
        self,
        rows: Sequence[Sequence[int]],
        flags: Sequence[Sequence[bool]],
        *,
        queries: int,
        k: int,
        plan: Plan | None = None,
    ) -> MicroBatch:
        """The :class:`MicroBatch` of tokenized texts (B queries, B positives, B * k negatives) in
        packed rows; ``inverse`` maps text t to its row of the rows' embeddings, concatenated."""
        lengths = [len(r) for r in rows]
        bins = pack_bins(lengths, tokens=self.max_tokens, size=self.chunk_size)
        features, position, offset = [], [0] * len(rows), 0
        for group in bins:
            for i, text in enumerate(group):
                position[text] = offset + i
            offset += len(group)
            features.append(pack([rows[i] for i in group], [flags[i] for i in group]))
        return MicroBatch(features, torch.tensor(position), queries, k, sum(lengths), plan, [False] * len(bins))


def collate_for(cfg, tokenizer, config, *, one_forward: bool) -> PackingCollate:
    """The trainer's :class:`PackingCollate` for a ``TrainConfig`` with ``packing``: rows of at most
    ``max_tokens_per_forward`` real tokens, or ``chunk_tokens`` (GradCache's chunks), the smaller."""
    budgets = [b for b in (cfg.max_tokens_per_forward, cfg.chunk_tokens) if b]
    return PackingCollate(
        tokenizer, config, max_tokens=min(budgets) if budgets else 0, chunk_size=cfg.chunk_size, one_forward=one_forward
    )


def check_options(cfg) -> None:
    """Refuse ``--packing`` with what it cannot run with (ValueError naming the option)."""
    if not cfg.packing:
        return
    if cfg.compile:
        raise ValueError(
            "packing: --compile is not supported with --packing (the varlen attention kernels run "
            "eagerly, a graph break per layer); drop one of them"
        )
    check_max_tokens(cfg.max_tokens_per_forward, collective=cfg.parallel == "fsdp")


def check_max_tokens(max_tokens: int, *, collective: bool) -> None:
    """Refuse a token budget on packed rows where every forward is a collective (FSDP2): every rank
    must then run as many forwards, which a budget cut from each rank's own texts does not promise
    (``batches.check_chunk_tokens`` is the same rule for GradCache's chunks)."""
    if collective and max_tokens:
        raise ValueError(
            "max_tokens_per_forward: under --parallel fsdp every forward is collective, so every "
            "process must run as many: bound the packed rows by --chunk-size only"
        )


def describe(cfg, device: torch.device) -> str:
    """One line for the log: how the micro-batches are packed and which attention path runs on
    ``device`` (mgh_kernels.backend's default choice: Triton on CUDA, PyTorch elsewhere)."""
    from mgh_kernels import backend

    budget = [b for b in (cfg.max_tokens_per_forward, cfg.chunk_tokens) if b]
    rows = (
        f"rows of at most {min(budget)} real tokens"
        if budget
        else (f"rows of at most {cfg.chunk_size} texts" if cfg.chunk_size else "one row per micro-batch")
    )
    path = (
        "Triton's varlen kernels"
        if backend.TRITON_AVAILABLE and device.type == "cuda"
        else "PyTorch's path: SDPA per text, the ATA layer's column sums by ata_attention per text"
    )
    return (
        f"packing: texts packed without padding into {rows}; every layer attends within its texts through "
        f"ata_attention_varlen ({path})"
    )


__all__ = [
    "PackingCollate",
    "check_max_tokens",
    "check_options",
    "collate_for",
    "describe",
    "from_padded",
    "is_packed",
    "pack",
    "pack_bins",
    "packed_embeddings",
    "texts_in",
    "use_packed_attention",
]
