"""ATA inside a transformers model: ``enable_ata`` points one layer's attention at ``ata_attention``
and captures its column sums, so ATA pooling needs no ``output_attentions`` (model patching).

How: an attention function registered with transformers 5's ``AttentionInterface`` under
``ATA_ATTENTION`` (and SDPA's mask builder under the same name), and a config view in the chosen
layer alone (``hf_private.ConfigView``) whose attention implementation is that name. transformers
looks the function up by the module's config at each call, so every other layer keeps the model's
own attention and masks. ``remove()`` undoes it. Every private transformers name this relies on is
reached through ``hf_private``.

Scope and caveats: transformers 5 decoders whose attention goes through ``AttentionInterface``
(the Llama, Mistral, Qwen2 and Qwen3 families; GGUF-loaded, peft-wrapped and vision-language
ones). The fused layer reads only masks that are padding plus causal or bidirectional: packed
sequences, sliding windows shorter than the input, flex attention's block masks, attention
dropout and KV caches are refused with a ``ValueError`` rather than misread. With
``enable_ata(model, packed=True)`` packed rows are taken instead: every layer runs our kernels
(``VARLEN_ATTENTION``: ``ata_attention_varlen`` per text, flash-attention's masks), the ATA layer
with column sums. transformers is imported only when ``enable_ata`` runs.
"""

from __future__ import annotations

import torch

from . import hf_private
from ._validation import check_bool, checks_values
from .attention import ata_attention, ata_attention_varlen
from .pooling import ata_pool

__all__ = ["ATA_ATTENTION", "ATACapture", "VARLEN_ATTENTION", "enable_ata", "enable_varlen"]

VARLEN_ATTENTION = "mgh_varlen"
"""The name ``enable_ata(model, packed=True)`` gives every other layer: ``ata_attention_varlen``
(column sums off) on packed rows, ``ata_attention`` on padded ones, with flash-attention's masks."""

ATA_ATTENTION = "mgh_ata"
"""The name ``enable_ata`` registers with transformers' ``AttentionInterface``; only the chosen
layer looks it up (through its ``hf_private.ConfigView``)."""

_CAPTURE_ATTR = "_mgh_ata_capture"

# The keyword arguments by which transformers hands flash-attention functions packed sequences
# (all four given: its varlen path).
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class ATACapture:
    """Handle returned by :func:`enable_ata`: holds the column sums of the latest forward pass.

    Attributes:
        colsum: [B, L] float32 column sums of the chosen layer from the latest forward (part of the
            autograd graph when gradients are on), or None before the first forward.
        layer: index of the layer that runs the fused kernel.

    Use it as a context manager, or call :meth:`remove`, to restore the model's attention. A deep
    copy (or pickle) of an enabled model is enabled too, with a capture of its own that starts
    without column sums (``ATACapture.of(copy)`` finds it); ``remove()`` before copying gives a
    plain model.

    Example::

        with enable_ata(model) as capture:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state   # [B, L, H]
            emb = capture.pool(hidden, mask)                                         # [B, H]

    What ``output_attentions=True`` plus summing the last layer's probabilities gives, for one
    layer and without the [B, H, L, L] tensors; no transformers counterpart.
    """

    @staticmethod
    def of(model) -> ATACapture | None:
        """The capture active on ``model`` (a model ``enable_ata`` was called on, or a copy of one),
        or None."""
        for module in model.modules():
            capture = getattr(module, _CAPTURE_ATTR, None)
            if capture is not None:
                return capture
        return None

    def __init__(self, model, module, layer: int, previous: str | None, replaced_by: str | None = None):
        """``previous``: the attention implementation of the layers' config before; ``replaced_by``:
        the one ``enable_ata`` set there for the other layers, or None where it kept ``previous``."""
        self.model, self.module, self.layer = model, module, layer
        self._previous, self._replaced_by = previous, replaced_by
        self.colsum: torch.Tensor | None = None
        self.packed = replaced_by == VARLEN_ATTENTION
        self.cu_seqlens: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # colsum belongs to the latest forward's autograd graph, which deepcopy and pickle refuse
        return {**self.__dict__, "colsum": None}

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, *, mix: float = 0.0) -> torch.Tensor:
        """``ata_pool(hidden_states, attention_mask, colsum=self.colsum, mix=mix)``: [B, L, H] hidden
        states and their [B, L] mask -> [B, H] embeddings."""
        if self.colsum is None:
            raise ValueError("colsum: no forward pass has run since enable_ata; run the model first")
        return ata_pool(hidden_states, attention_mask, colsum=self.colsum, mix=mix)

    def remove(self) -> None:
        """Restore the model's previous attention implementation (unless it was set anew since
        ``enable_ata``); the capture stops."""
        if getattr(self.module, _CAPTURE_ATTR, None) is self:
            delattr(self.module, _CAPTURE_ATTR)
            config = self.module.config = hf_private.model_config(self.module.config)
            if self._replaced_by is not None and hf_private.attn_implementation(config) == self._replaced_by:
                hf_private.set_attn_implementation(config, self._previous)

    def __enter__(self) -> ATACapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        """The chosen layer's attention: fused kernel, column sums kept. Shapes as transformers'."""
        if dropout:
            raise ValueError(
                f"dropout: the ATA layer has no attention dropout, got {dropout} (set the model's "
                "attention_dropout to 0)"
            )
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"key: the ATA layer needs self-attention over the whole sequence, got {query.shape[2]} "
                f"queries and {key.shape[2]} keys (is a KV cache in use?)"
            )
        length = query.shape[2]
        window = kwargs.get("sliding_window")
        if window is not None and length > window:
            raise ValueError(f"sliding_window: the ATA layer attends to the whole sequence; L={length} > {window}")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        if self.packed:
            varlen = _varlen_arguments(attention_mask, query.shape[0], kwargs)
            self.cu_seqlens = None if varlen is None else varlen[0]
            if varlen is not None:
                out, colsum = _attend_packed(query, key, value, varlen, causal, scaling, True)
                self.colsum = colsum[None]  # [1, total]: the packed row's tokens
                return out, None
        _check_not_packed(module, attention_mask, query.shape[0], kwargs)
        key_padding_mask = _key_padding_mask(attention_mask, causal, length)
        out, colsum = ata_attention(query, key, value, causal=causal, key_padding_mask=key_padding_mask, scale=scaling)
        self.colsum = colsum
        return out.transpose(1, 2).contiguous(), None


def _check_not_packed(module, attention_mask, batch: int, kwargs) -> None:
    """Refuse the packed sequences (several per row) that the model's other layers would attend to
    one by one but the mask does not show. Where the model builds flash-attention's masks ([B, L]
    padding or None), transformers' flash path (``_flash_attention_forward``) packs only without a
    mask: by the four varlen arguments ``cu_seq_lens_*`` / ``max_length_*`` or, in a batch of one
    row, by ``position_ids`` that are not consecutive. SDPA's masks show packing themselves (a
    block-diagonal [B, 1, L, L] mask, which ``_key_padding_mask`` refuses); with no mask, SDPA
    attends over the whole row, and so does the ATA layer."""
    if attention_mask is not None or not _builds_flash_masks(module):
        return
    if all(kwargs.get(name) is not None for name in _VARLEN_KWARGS):
        raise ValueError(
            "cu_seq_lens_q: the ATA layer attends to one sequence per row; packed sequences "
            "(flash-attention's varlen arguments) are not supported"
        )
    positions = kwargs.get("position_ids")
    if batch == 1 and positions is not None and positions.shape[-1] > 1 and checks_values():
        row = positions.reshape(-1)
        if bool((row - row.min() != torch.arange(row.numel(), device=row.device)).any()):
            raise ValueError(
                "position_ids: the ATA layer attends to one sequence per row; positions that are not "
                "consecutive in an unpadded row (packed sequences, under flash-attention) are not supported"
            )


def _varlen_arguments(attention_mask, batch: int, kwargs):
    """(cu_seqlens int32, max_seqlen) of a packed row as transformers' flash-attention path takes
    it, or None for an ordinary batch: the ``cu_seq_lens_q`` / ``max_length_q`` keyword arguments
    (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), else, in a batch of one row
    without a padding mask, ``position_ids`` that restart at 0 (each restart begins a sequence; a
    host sync per layer, which the keyword arguments avoid)."""
    if attention_mask is not None:
        if attention_mask.dim() == 2 and checks_values() and not bool(attention_mask.bool().all()):
            return None  # padding: one sequence per row
        if attention_mask.dim() != 2:
            return None
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None and longest is not None:
        cu_k, longest_k = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
            raise ValueError("cu_seq_lens_k: the packed ATA path is self-attention; expected cu_seq_lens_q")
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q: expected packed sequences in a batch of one row, got {batch} rows")
        return cu.to(torch.int32), int(max(longest, longest_k or 0))
    positions = kwargs.get("position_ids")
    if batch != 1 or positions is None or positions.shape[-1] < 2:
        return None
    row = positions.reshape(-1)
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0 or starts.numel() == 1:
        return None  # one sequence (or positions that do not start at 0): the ordinary path
    bounds = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32).cpu()
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def _attend_packed(query, key, value, varlen, causal: bool, scaling, return_colsum: bool):
    """A packed row [1, H, T, D] through ``ata_attention_varlen``: (out [1, T, Hq, D], colsum [T] or None)."""
    cu, longest = varlen
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out, colsum = ata_attention_varlen(q, k, v, cu, longest, causal=causal, scale=scaling, return_colsum=return_colsum)
    return out[None], colsum


def _varlen_dispatch(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The attention function registered as ``mgh_varlen`` (the other layers under
    ``enable_ata(model, packed=True)``): packed rows through ``ata_attention_varlen`` without column
    sums, each sequence attending to itself and never a total x total mask; ordinary batches (a
    [B, L] padding mask or none) through ``ata_attention`` without column sums."""
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None:
        return capture.attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if dropout:
        raise ValueError(f"dropout: the packed attention has no attention dropout, got {dropout}")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    varlen = _varlen_arguments(attention_mask, query.shape[0], kwargs)
    if varlen is not None:
        return _attend_packed(query, key, value, varlen, causal, scaling, False)[0], None
    out, _ = ata_attention(
        query,
        key,
        value,
        causal=causal,
        key_padding_mask=_key_padding_mask(attention_mask, causal, query.shape[2]),
        scale=scaling,
        return_colsum=False,
    )
    return out.transpose(1, 2).contiguous(), None


def _builds_flash_masks(module) -> bool:
    """Whether the model of this attention module builds flash-attention's masks (its other layers
    run a flash-attention implementation); the ATA layer's own config is a ``ConfigView``."""
    from transformers.masking_utils import flash_attention_mask

    config = hf_private.model_config(getattr(module, "config", None))
    return hf_private.registered_mask(hf_private.attn_implementation(config)) is flash_attention_mask


def _key_padding_mask(attention_mask, causal: bool, length: int) -> torch.Tensor | None:
    """[B, L] key padding from the mask transformers hands an attention function.

    transformers builds [B, 1, L, L] masks (bool: True = attend; float: 0 = attend); padding masks
    keys only, so the last query row of a causal mask, or any row of a bidirectional one, is the
    key padding. The whole mask is then checked to be exactly padding + (causal or not): packed
    sequences, sliding windows or other custom masks are refused rather than silently mis-read.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask: the ATA layer reads tensor masks (SDPA's, flash-attention's), got "
            f"{type(attention_mask).__name__} (flex attention?)"
        )
    if attention_mask.dim() == 2:
        return attention_mask.bool()
    if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (length, length):
        raise ValueError(
            f"attention_mask: expected a [B, 1, L, L] mask with L={length}, got {list(attention_mask.shape)}"
        )
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    keys = allowed[:, 0, -1, :]
    expected = keys[:, None, :].expand(-1, length, -1)
    if causal:
        expected = expected & torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
    if checks_values() and not torch.equal(
        allowed.expand(-1, -1, length, length), expected[:, None].expand_as(allowed)
    ):
        raise ValueError(
            "attention_mask: the ATA layer supports padding with causal or bidirectional attention "
            f"only (causal={causal}); got a mask of another pattern (packed sequences, sliding window?)"
        )
    return keys


def _dispatch(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The attention function registered as ``mgh_ata``: fused ATA in the chosen layer (SDPA in a
    module that has no capture, e.g. one whose model was set to ``mgh_ata`` by hand)."""
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return capture.attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

    AttentionInterface.register(ATA_ATTENTION, _dispatch)
    AttentionMaskInterface.register(ATA_ATTENTION, sdpa_mask)  # for a model set to mgh_ata by hand
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_dispatch)
    AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)  # [B, L] padding or None


def _other_layers_implementation(name: str | None) -> str:
    """The attention the layers other than the ATA one run: the model's own where the masks it
    builds are ones the ATA layer reads (SDPA's boolean [B, 1, L, L] masks, flash-attention's
    [B, L] padding masks, and implementations registered with those), else SDPA: eager attention
    (our kernel is what replaces it), flex attention's block masks, unknown masks."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    builder = hf_private.registered_mask(name)
    return name if builder in (sdpa_mask, flash_attention_mask) and name != ATA_ATTENTION else "sdpa"


def _attention_layers(model) -> list:
    """The self-attention modules of a transformers decoder, in layer order."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")]
    return sorted(layers, key=lambda m: m.layer_idx)


def enable_ata(model, layer: int = -1, *, packed: bool = False) -> ATACapture:
    """Run ``model``'s attention in ``layer`` with the fused ATA kernel and capture its column sums.

    Every other layer keeps the model's attention where it is a fused one (PyTorch's SDPA, or
    flash-attention where the model was loaded with ``attn_implementation="flash_attention_2"``);
    a model loaded with eager attention (or flex attention) runs SDPA in them, restored by
    ``remove()``. After a forward pass, ``capture.colsum``
    ([B, L] float32, differentiable) holds the chosen layer's per-key column sums, so ATA pooling
    needs no ``output_attentions``::

        capture = enable_ata(model)                 # or: with enable_ata(model) as capture:
        out = model(input_ids=ids, attention_mask=mask)
        emb = ata_pool(out.last_hidden_state, mask, colsum=capture.colsum)

    Works for transformers 5 decoders whose attention goes through ``AttentionInterface`` (the
    Llama, Mistral, Qwen2 and Qwen3 families, GGUF-loaded ones and peft-wrapped ones included),
    causal or bidirectional (a layer with ``is_causal=False``), left or right padding. Packed
    sequences that the model's own attention would separate (a block-diagonal mask, or
    flash-attention's varlen arguments and restarting ``position_ids``) are refused with a
    ``ValueError``, as is any mask that is not padding plus causal or bidirectional.

    Args:
        model: a transformers ``PreTrainedModel`` (or a peft model wrapping one).
        layer: which layer runs the kernel; negative counts from the end (-1 = last).
        packed: accept packed rows (padding-free batches) as transformers' flash-attention path
            takes them: one row of concatenated texts with ``position_ids`` restarting at 0 per
            text, and optionally the ``cu_seq_lens_q/k`` / ``max_length_q/k`` keyword arguments
            (``DataCollatorWithFlattening``). Every layer then runs our kernels with
            flash-attention's masks (``VARLEN_ATTENTION``; never a total x total mask): the other
            layers ``ata_attention_varlen`` with the column sums off (``ata_attention`` on padded
            batches), the ATA layer with them on, so ``capture.colsum`` is [1, total] and
            ``capture.cu_seqlens`` the sequences' bounds (None after an ordinary batch). Pool with
            ``packed_pool(hidden[0], capture.cu_seqlens, "ata", colsum=capture.colsum[0])``.
            ``mgh_kernels.attention.varlen.last_backend()`` says which path ran.

    Returns:
        An :class:`ATACapture`; ``capture.remove()`` (or leaving its ``with`` block) restores the
        previous attention implementation.

    What ``model.set_attn_implementation("eager")`` with ``output_attentions=True`` gives for one
    layer, without the [B, H, L, L] tensors; model patching in the manner of Liger-Kernel's
    ``apply_liger_kernel_to_*``, but reversible and confined to one layer.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a transformers model (a torch.nn.Module), got {type(model).__name__}")
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            f"model: expected a transformers decoder with attention layers (modules with layer_idx), "
            f"got {type(model).__name__}"
        )
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer: expected an index in [-{len(layers)}, {len(layers) - 1}], got {layer!r}")
    module = layers[layer]
    if any(getattr(m, _CAPTURE_ATTR, None) is not None for m in layers):
        raise ValueError("model: enable_ata is already active on this model; remove() the first capture")
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"model: expected transformers attention modules with a config, got {type(module).__name__}")
    # The layers' own config: the text model's in a multimodal model, whose vision tower keeps its attention.
    check_bool("packed", packed)
    previous = hf_private.attn_implementation(config)
    others = VARLEN_ATTENTION if packed else _other_layers_implementation(previous)
    replaced_by = others if others != previous else None
    _register()
    if replaced_by is not None:
        hf_private.set_attn_implementation(config, replaced_by)
    capture = ATACapture(model, module, module.layer_idx, previous, replaced_by)
    setattr(module, _CAPTURE_ATTR, capture)
    module.config = hf_private.ConfigView(config, ATA_ATTENTION)
    return capture


def enable_varlen(model) -> str | None:
    """Run every attention layer of ``model`` through ``VARLEN_ATTENTION`` without any ATA layer: packed
    rows (as :func:`enable_ata` with ``packed=True`` takes them) through ``ata_attention_varlen`` with
    the column sums off, padded batches through ``ata_attention`` (for poolings other than ATA over
    packed rows). Returns the implementation it replaced (None if already set); set it back with
    ``hf_private.set_attn_implementation(model.config, previous)`` to undo. Idempotent."""
    layers = _attention_layers(model)
    if not layers:
        raise ValueError(
            f"model: expected a transformers decoder with attention layers (modules with layer_idx), "
            f"got {type(model).__name__}"
        )
    config = hf_private.model_config(layers[0].config)
    previous = hf_private.attn_implementation(config)
    if previous == VARLEN_ATTENTION:
        return None
    _register()
    hf_private.set_attn_implementation(config, VARLEN_ATTENTION)
    return previous
