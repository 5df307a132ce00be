"""The transformers internals mgh relies on, in one place: when a transformers release moves one,
this module is what changes (``tests/test_hf_private.py`` names the moved name and the version).

* ``_attn_implementation``, a private config attribute: transformers' attention modules pick
  their function by ``self.config._attn_implementation`` at each call, and the model builds its
  masks by the same name. The public ``model.set_attn_implementation`` validates the name and sets
  it on every sub-config of the whole model; ``enable_ata`` needs one layer's name changed (a
  :class:`ConfigView` of its config) and a save needs a name swapped and restored, so both set the
  attribute itself (:func:`set_attn_implementation`).
* The mask builder of each implementation: read through the public mapping
  ``masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`` (:func:`registered_mask`), as transformers' own
  ``create_causal_mask`` reads it, not through its private ``_global_mapping``.

``REQUIRED`` lists every transformers name the two modules that patch models reach (this one and
``mgh_kernels.transformers``), public ones under internal module paths included; :func:`moved`
says which of them the installed release lacks. transformers is imported only when a function
here runs (or ``moved``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = [
    "ATTN_IMPLEMENTATION",
    "REQUIRED",
    "ConfigView",
    "attn_implementation",
    "model_config",
    "moved",
    "registered_mask",
    "set_attn_implementation",
]

ATTN_IMPLEMENTATION = "_attn_implementation"
"""The config attribute transformers' attention modules and mask builders look their function up by."""

REQUIRED = (
    ("transformers", "PretrainedConfig", ATTN_IMPLEMENTATION),
    ("transformers", "AttentionInterface", "register"),
    ("transformers.masking_utils", "AttentionMaskInterface", "register"),
    ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS", "get"),
    ("transformers.masking_utils", "sdpa_mask", None),
    ("transformers.masking_utils", "flash_attention_mask", None),
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward", None),
)
"""(module, name, attribute or None): every transformers name ``mgh_kernels`` reaches."""


def attn_implementation(config) -> str | None:
    """The attention implementation a config (or a :class:`ConfigView`) names, e.g. "sdpa"; None if
    it names none. ``config._attn_implementation`` in transformers 5."""
    return getattr(config, ATTN_IMPLEMENTATION, None)


def set_attn_implementation(config, name: str | None) -> None:
    """Make ``config``'s attention modules (and, on the model's config, its masks) use the
    implementation registered as ``name``, from their next call on. Unlike
    ``PreTrainedModel.set_attn_implementation`` it neither checks the name nor touches other configs."""
    setattr(config, ATTN_IMPLEMENTATION, name)


def registered_mask(name) -> Callable | None:
    """The function transformers builds implementation ``name``'s attention masks with (e.g.
    ``masking_utils.sdpa_mask`` for "sdpa"), or None for a name without one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS.get(name) if isinstance(name, str) else None


class ConfigView:
    """A config as one module sees it: every setting is ``config``'s (read and written through),
    except the attention implementation, which is ``implementation``.

    transformers' attention modules look their function up by ``self.config._attn_implementation``
    at each call, and the model builds its masks from the model's own config, so a module given this
    view runs ``implementation`` while every other layer keeps the model's attention and masks.
    Copies and pickles of the view are views of a copy of the config.
    """

    def __init__(self, config, implementation: str):
        object.__setattr__(self, "model_config", config)
        object.__setattr__(self, ATTN_IMPLEMENTATION, implementation)

    def __getattr__(self, name):
        if name.startswith("__") or name == "model_config":  # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.model_config, name)

    def __setattr__(self, name, value):
        setattr(self.model_config, name, value)


def model_config(config):
    """The config under a :class:`ConfigView` (any other config as it is)."""
    return config.model_config if isinstance(config, ConfigView) else config


def moved() -> list:
    """The entries of ``REQUIRED`` the installed transformers lacks, as "module.name[.attribute]"
    strings (empty when every one is where mgh reaches it)."""
    missing = []
    for module_name, name, attribute in REQUIRED:
        path = ".".join(part for part in (module_name, name, attribute) if part)
        try:
            value = getattr(importlib.import_module(module_name), name)
            if attribute is not None and not hasattr(value, attribute):
                raise AttributeError(attribute)
        except (ImportError, AttributeError):
            missing.append(path)
    return missing
