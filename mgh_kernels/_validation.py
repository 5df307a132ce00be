"""Argument checks shared by every public function of ``mgh_kernels``, and the errors they raise.

Each check raises ``ValueError`` whose message starts with the argument's name and says what was
expected and what was received, so a user can fix the call without reading our code. Values are
checked only where that needs no host synchronisation per call or is cheap beside the op (masks);
NaN and infinity in the data are not looked for.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

from ._precision import cast_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class NonFiniteError(ValueError):
    """Values that should be finite and positive are not: e.g. ``ata_weights`` got a row whose
    column sums over its real tokens total no positive number (all zero, negative or NaN), which is
    what NaN activations upstream produce. A ``ValueError`` whose message starts with the argument's
    name, like every argument error of ``mgh_kernels``; catch this class to tell it from a mistake
    in the call.

    Example::

        try:
            weights = ata_weights(colsum, mask)
        except NonFiniteError:
            ...  # the model's activations went non-finite
    """


_trust = threading.local()


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the checks that read tensor values on the host, inside the ``with`` block.

    A mask's 0/1 values, its rows without a real token, the pattern of a transformers attention
    mask and the positive totals of ATA's weights are checked by reading device values, and each
    such read is a host-device sync that drains the GPU's queue. A caller that built its masks on
    the host (the trainer's collate does) vouches for them here; ranks, dtypes, shapes and devices
    are still checked. Bad values then give wrong or non-finite results instead of an error.
    Torch.compile skips the value checks in its graphs anyway. Thread-local and re-entrant::

        with mgh_kernels.trusted_inputs():
            loss = step(batch)
    """
    depth = getattr(_trust, "depth", 0)
    _trust.depth = depth + 1
    try:
        yield
    finally:
        _trust.depth = depth


def checks_values() -> bool:
    """Whether the value checks run here: not inside :func:`trusted_inputs` nor a compiled graph."""
    return not getattr(_trust, "depth", 0) and not torch.compiler.is_compiling()


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, value, *, ndim: int, layout: str) -> torch.Tensor:
    """Require a tensor of rank ``ndim``; ``layout`` names the dimensions, e.g. "[B, L, H]"."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {layout}, got shape {_shape(value)}")
    return value


def check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
        )


def check_same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name}: expected to be on {ref.device} like {ref_name}, got {value.device}")


def check_same_dtype(
    name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, amp: torch.dtype | None = None
) -> None:
    """Require ``value``'s dtype to be ``ref``'s; under autocast (``amp``, the autocast dtype), the
    dtypes they compute in after autocast's cast (so float32 and bfloat16 agree under bf16 autocast)."""
    if cast_dtype(value, amp) != cast_dtype(ref, amp):
        raise ValueError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {value.dtype}")


def check_dim(name: str, value: torch.Tensor, dim: int, size: int, what: str) -> None:
    if value.shape[dim] != size:
        raise ValueError(f"{name}: expected size {size} in dimension {dim} ({what}), got shape {_shape(value)}")


def check_mask(
    name: str,
    mask,
    *,
    batch: int,
    length: int,
    device: torch.device,
    allow_empty_rows: bool = False,
) -> torch.Tensor:
    """Validate a [B, L] padding mask (True/1 = real token) and return it as bool.

    Bool and integer 0/1 masks are accepted (transformers' ``attention_mask`` is int64). Unless
    ``allow_empty_rows``, a row with no real token is an error: nothing could be pooled from it.
    These two checks of the mask's values are skipped inside :func:`trusted_inputs` and under
    ``torch.compile`` (they read the values on the host: a sync, and in a graph a graph break); its
    rank, dtype, shape and device are still checked.
    """
    check_tensor(name, mask, ndim=2, layout="[B, L] (True or 1 = real token)")
    if mask.dtype not in MASK_DTYPES:
        raise ValueError(f"{name}: expected a bool or integer 0/1 mask, got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name}: expected shape [{batch}, {length}] (B, L), got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name}: expected to be on {device}, got {mask.device}")
    values = checks_values()
    if mask.dtype != torch.bool:
        if values and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name}: expected only 0 and 1 values in an integer mask")
        mask = mask != 0
    if values and not allow_empty_rows and mask.numel():
        empty = rows_where(~mask.any(dim=1))
        if empty:
            raise ValueError(f"{name}: every row needs at least one real token; rows {empty} are all padding")
    return mask


def check_attentions(attentions, attention_mask) -> torch.Tensor:
    """Validate one layer's attention probabilities [B, H, L, L] (transformers' ``output_attentions``)
    and their [B, L] padding mask; return the mask as bool."""
    check_tensor("attentions", attentions, ndim=4, layout="[B, H, L, L]")
    check_float("attentions", attentions)
    batch, _, length, length_k = attentions.shape
    if length_k != length:
        raise ValueError(
            f"attentions: expected square self-attention probabilities [B, H, L, L], got shape {_shape(attentions)}"
        )
    return check_mask("attention_mask", attention_mask, batch=batch, length=length, device=attentions.device)


def rows_where(flags: torch.Tensor) -> str:
    """The indices where the [B] bool ``flags`` are True, as "0, 3, 5" (the first eight; "" for none)."""
    return ", ".join(str(int(r)) for r in flags.flatten().nonzero().flatten()[:8])


def check_bool(name: str, value) -> bool:
    """Require True or False (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def check_positive(name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _check_qkv(q, k, v, layout: str, amp) -> None:
    """q, k, v are tensors of ``layout`` ({heads}: Hq for q, Hkv for k and v), q floating, k and v of
    q's dtype (or autocast's alike) and device."""
    ndim = layout.count(",") + 1
    check_tensor("q", q, ndim=ndim, layout=layout.format(heads="Hq"))
    check_tensor("k", k, ndim=ndim, layout=layout.format(heads="Hkv"))
    check_tensor("v", v, ndim=ndim, layout=layout.format(heads="Hkv"))
    check_float("q", q)
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q, amp)
        check_same_device(name, t, "q", q)


def check_attention_args(q, k, v, *, causal, key_padding_mask, scale, amp=None):
    """Validate self-attention arguments; return (bool mask [B, L] or None, scale as float).

    q: [B, Hq, L, D]; k, v: [B, Hkv, L, D] with Hq a multiple of Hkv; same device and same dtype,
    or under autocast (``amp``, the autocast dtype) dtypes that autocast casts alike.
    """
    _check_qkv(q, k, v, "[B, {heads}, L, D]", amp)
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    check_dim("k", k, 0, batch, "batch B of q")
    check_dim("k", k, 2, length, "sequence length L of q")
    check_dim("k", k, 3, dim, "head dim D of q")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: expected a number of kv heads Hkv that divides the query heads Hq={hq}, got Hkv={hkv}")
    check_bool("causal", causal)
    scale = check_positive("scale", scale, allow_none=True)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    mask = None
    if key_padding_mask is not None:
        mask = check_mask("key_padding_mask", key_padding_mask, batch=batch, length=length, device=q.device)
    return mask, scale


NEGATIVE_MODES = ("global", "own")
REDUCTIONS = ("mean", "sum", "none")


def check_infonce_args(q, pos, neg, *, tau, negatives, reduction, amp=None) -> float:
    """Validate InfoNCE arguments (q, pos [B, D]; neg None or [B, K, D]); return tau as float.
    Dtypes as in :func:`check_attention_args`."""
    check_tensor("q", q, ndim=2, layout="[B, D]")
    check_float("q", q)
    check_tensor("pos", pos, ndim=2, layout="[B, D]")
    check_same_dtype("pos", pos, "q", q, amp)
    check_same_device("pos", pos, "q", q)
    if tuple(pos.shape) != tuple(q.shape):
        raise ValueError(f"pos: expected the shape of q {list(q.shape)}, got {list(pos.shape)}")
    batch, dim = q.shape
    if batch == 0 or dim == 0:
        raise ValueError(
            f"q: expected at least one query (B >= 1) of at least one dimension, got shape {list(q.shape)}"
        )
    if neg is not None:
        check_tensor("neg", neg, ndim=3, layout="[B, K, D]")
        check_same_dtype("neg", neg, "q", q, amp)
        check_same_device("neg", neg, "q", q)
        check_dim("neg", neg, 0, batch, "batch B of q")
        check_dim("neg", neg, 2, dim, "embedding dim D of q")
    check_choice("negatives", negatives, NEGATIVE_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    return check_positive("tau", tau)


def check_cu_seqlens(
    name: str, cu_seqlens, *, total: int, device: torch.device, max_seqlen=None
) -> tuple[torch.Tensor | None, torch.Tensor, int | None]:
    """Validate flash-attention's varlen ``cu_seqlens`` (int32 [n + 1]: 0, then non-decreasing, ending at
    ``total``) and, when given, ``max_seqlen`` (an int at least the longest length).

    ``cu_seqlens`` may be on the CPU (host data: its values are always checked, free of syncs) or on
    ``device`` (checked outside :func:`trusted_inputs` only: reading them is a sync). Returns (the
    CPU tensor or None, the tensor on ``device``, ``max_seqlen`` as int or None).
    """
    check_tensor(name, cu_seqlens, ndim=1, layout="[n + 1] (cumulative sequence lengths)")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{name}: expected dtype torch.int32 (flash-attention's varlen convention), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name}: expected at least two entries [0, ..., total] (one sequence), got shape {_shape(cu_seqlens)}"
        )
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"{name}: expected to be on the CPU or on {device}, got {cu_seqlens.device}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1):
        raise ValueError(f"max_seqlen: expected a positive int (the longest sequence's length), got {max_seqlen!r}")
    host = cu_seqlens if cu_seqlens.device.type == "cpu" else None
    if host is not None or checks_values():
        values = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(values[:-1], values[1:])]
        if values[0] != 0:
            raise ValueError(f"{name}: expected to start at 0, got {values[0]}")
        if values[-1] != total:
            raise ValueError(f"{name}: expected to end at total = {total} (the tokens of q), got {values[-1]}")
        bad = [i for i, n in enumerate(lengths) if n < 0]
        if bad:
            raise ValueError(
                f"{name}: expected non-decreasing values; it decreases after entries {', '.join(map(str, bad[:8]))}"
            )
        if max_seqlen is not None and max(lengths) > max_seqlen:
            raise ValueError(
                f"max_seqlen: expected at least the longest sequence's length {max(lengths)}, got {max_seqlen}"
            )
    on_device = cu_seqlens if cu_seqlens.device == device else cu_seqlens.to(device, non_blocking=True)
    return host, on_device, max_seqlen


def check_varlen_args(q, k, v, cu_seqlens, max_seqlen, *, causal, scale, amp=None):
    """Validate packed self-attention arguments (q [total, Hq, D], k, v [total, Hkv, D], dtypes and
    devices as :func:`check_attention_args`); return (cu_seqlens on the CPU or None, cu_seqlens on
    q's device, max_seqlen, scale)."""
    _check_qkv(q, k, v, "[total, {heads}, D]", amp)
    total, hq, dim = q.shape
    if total == 0 or dim == 0 or hq == 0:
        raise ValueError(f"q: expected a non-empty tensor, got shape {_shape(q)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    check_dim("k", k, 0, total, "total tokens of q")
    check_dim("k", k, 2, dim, "head dim D of q")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: expected a number of kv heads Hkv that divides the query heads Hq={hq}, got Hkv={hkv}")
    check_bool("causal", causal)
    scale = check_positive("scale", scale, allow_none=True)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    if max_seqlen is None:
        raise ValueError("max_seqlen: expected a positive int (the longest sequence's length), got None")
    host, cu, max_seqlen = check_cu_seqlens(
        "cu_seqlens", cu_seqlens, total=total, device=q.device, max_seqlen=max_seqlen
    )
    return host, cu, max_seqlen, scale
