"""Tokenization: texts with their query prefixes -> token ids and pooled flags -> padded tensors.

Module functions of a tokenizer and an :class:`EmbedderConfig`, so that DataLoader workers need
only the tokenizer (:mod:`mgh_train.batches`); :meth:`Embedder.tokenize` is both in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .options import EmbedderConfig


def token_ids(tokenizer, config: EmbedderConfig, texts: Sequence[str], heads: Sequence[str]) -> tuple[list, list]:
    """(token ids, pooled flags) per text, unpadded, for texts each preceded by its prefix in
    ``heads`` ("" for none). The ids hold the prefix, the text (truncated to ``max_length``) and the
    EOS token (``add_eos``); a flag says whether its token is pooled: False for the prefix's tokens
    under ``exclude_instruction`` (a token is the text's when it ends after the prefix's last
    character, so a BPE token merging the prefix's trailing space with the first word counts)."""
    room = config.max_length - (1 if config.add_eos else 0)
    exclude = config.exclude_instruction and any(heads)
    encoded = tokenizer(
        [h + t for h, t in zip(heads, texts)],
        add_special_tokens=True,
        truncation=True,
        max_length=room,
        return_offsets_mapping=exclude and tokenizer.is_fast,
    )
    eos = tokenizer.eos_token_id if config.add_eos else None
    rows, flags = [], []
    for i, (ids, head) in enumerate(zip(encoded["input_ids"], heads)):
        ids = list(ids)
        if head and exclude:
            if "offset_mapping" in encoded:
                keep = [end > len(head) for _, end in encoded["offset_mapping"][i]]
            else:  # slow tokenizer: count the prefix's tokens, as sentence-transformers does
                n = len(tokenizer(head, add_special_tokens=True)["input_ids"])
                keep = [j >= n for j in range(len(ids))]
        else:
            keep = [True] * len(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            keep.append(True)
        if not any(keep):
            raise ValueError(f"texts[{i}]: nothing left to pool after the instruction prefix (empty text?)")
        rows.append(ids)
        flags.append(keep)
    return rows, flags


def pad(
    tokenizer, rows: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], *, pad_to_multiple_of: int | None = None
) -> dict:
    """:func:`token_ids`'s output padded into ``input_ids``, ``attention_mask`` and ``pool_mask``
    ([B, L] int64) by the tokenizer's own batched padding (its side, its pad token)."""
    padded = tokenizer.pad(
        {"input_ids": [list(r) for r in rows]},
        padding=True,
        pad_to_multiple_of=pad_to_multiple_of,
        return_attention_mask=True,
        return_tensors="pt",
    )
    attention_mask = padded["attention_mask"].long()
    pool_mask = torch.zeros_like(attention_mask)
    # row-major order: each row's real tokens, in order, as its flags list them
    pool_mask[attention_mask.bool()] = torch.tensor([f for row in flags for f in row], dtype=torch.long)
    return {"input_ids": padded["input_ids"].long(), "attention_mask": attention_mask, "pool_mask": pool_mask}
