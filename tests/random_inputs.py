"""Random test inputs shared by the test modules."""

import torch


def padding_mask(batch, length, side, gen):
    """[B, L] bool mask with per-row lengths 1..L: 'none', 'left', 'right', or 'one' (one real token).
    With 'left' or 'right', the first of several rows is full and a single row of L > 1 pads."""
    if side == "none":
        return torch.ones(batch, length, dtype=torch.bool)
    if side == "one":
        lengths = torch.ones(batch, dtype=torch.long)
    else:
        longest = length if batch > 1 else max(1, length - 1)  # a single row pads (where it can)
        lengths = torch.randint(1, longest + 1, (batch,), generator=gen)
        if batch > 1:
            lengths[0] = length  # keep one full row
    pos = torch.arange(length)[None, :]
    if side in ("right", "one"):
        return pos < lengths[:, None]
    return pos >= (length - lengths)[:, None]
