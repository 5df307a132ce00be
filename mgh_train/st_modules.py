"""sentence-transformers modules: ATA pooling after a stock ``Transformer``, and the modules of an
mgh model folder (``modules.json`` names them).

:class:`ATAPooling` goes after sentence-transformers' own ``Transformer`` module over any decoder
LLM that ``mgh_kernels.enable_ata`` supports: it turns on the fused ATA layer in that model and
pools with its column sums. ``SentenceTransformer(path, trust_remote_code=True)`` reloads it.

For mgh's own folders:

``SentenceTransformer(folder, trust_remote_code=True)`` builds: :class:`MGHTransformer` (tokenizer +
LLM + adapter; emits token states, the pooling mask and, under ATA, the fused column sums), then
:class:`MGHPooling` (mean / last-token / weighted-mean / first-token / ATA), then Normalize. The
vectors equal :meth:`mgh_train.model.Embedder.encode`'s. A prompt passed to ``encode`` is the query
prefix, e.g. ``prompt="Instruct: ...\\nQuery: "`` (the saved prompt ``"query"`` holds the default).
Importing this module needs sentence-transformers (``pip install mgh[eval]``).
"""

from __future__ import annotations

import torch
from sentence_transformers.base.modules import InputModule, Module

from .model import Embedder


class MGHTransformer(InputModule):
    """Input module: an :class:`~mgh_train.model.Embedder` up to its last hidden states."""

    save_in_root = True

    def __init__(self, model_name_or_path: str, embedder: Embedder | None = None):
        super().__init__()
        self.embedder = embedder if embedder is not None else Embedder.load(model_name_or_path)
        self.tokenizer = self.embedder.tokenizer

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> MGHTransformer:
        return cls(model_name_or_path)

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        """Tokenize texts; ``prompt`` is the query prefix (excluded from pooling if so configured)."""
        return self.embedder.tokenize(list(inputs), prefix=prompt or "")

    def forward(self, features: dict, **kwargs) -> dict:
        hidden, colsum = self.embedder.token_states(features)
        features["token_embeddings"] = hidden
        if colsum is not None:
            features["colsum"] = colsum
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.embedder.model.config.hidden_size

    def get_embedding_dimension(self) -> int:
        return self.get_sentence_embedding_dimension()

    def save(self, output_path: str, *args, **kwargs) -> None:
        from pathlib import Path

        # sentence-transformers owns the folder (its other modules' files are written around ours)
        self.embedder._write(Path(output_path))


class MGHPooling(Module):
    """Pooling module: token states -> one float32 vector per text, by the saved method."""

    config_keys = ["pooling", "ata_mix"]

    def __init__(self, pooling: str = "ata", ata_mix: float = 0.0):
        super().__init__()
        self.pooling, self.ata_mix = pooling, ata_mix

    def forward(self, features: dict, **kwargs) -> dict:
        from mgh_kernels import pool

        extra = {"colsum": features["colsum"], "mix": self.ata_mix} if self.pooling == "ata" else {}
        hidden = features["token_embeddings"].float()
        features["sentence_embedding"] = pool(hidden, features["pool_mask"], self.pooling, **extra)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)


class ATAPooling(Module):
    """Anchor-token-aware pooling for a sentence-transformers model over a decoder LLM.

    Put it after sentence-transformers' stock ``Transformer`` module (and before ``Normalize``)::

        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from mgh_train import ATAPooling

        text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
        transformer = Transformer("HuggingFaceTB/SmolLM2-135M-Instruct", modality_config=text_only,
                                  module_output_name="token_embeddings")
        model = SentenceTransformer(modules=[transformer, ATAPooling(), Normalize()])

    When the model is built (sentence-transformers calls :meth:`on_model_ready`), it runs
    ``mgh_kernels.enable_ata`` on the preceding module's model: the chosen layer's attention runs
    the fused kernel, which also returns each key's column sum, and this module pools the token
    embeddings with those sums (``mgh_kernels.ata_pool``): weight of token j = attention it
    receives in that layer, summed over the valid queries and averaged over heads, normalised over
    the pooled tokens; ``ata_mix`` blends in mean pooling. A module added to an already built model
    needs ``attach(model)``.

    ``include_prompt=False`` pools over the text's tokens only, with sentence-transformers'
    ``Pooling`` rule (the first ``prompt_length`` real tokens are the prompt's; a prompt that ends
    in a space shares its last token with the text's first word, which then counts as prompt).
    Sentence-transformers 6 renders a decoder's text through its chat template unless the
    ``Transformer``'s ``modality_config`` holds the ``text`` modality alone (as above).

    Args:
        ata_layer: the layer whose attention weights the tokens (-1 = last).
        ata_mix: share of mean-pooling weights mixed in, in [0, 1].
        include_prompt: pool over the prompt's tokens too.
    """

    config_keys = ["ata_layer", "ata_mix", "include_prompt"]

    def __init__(self, ata_layer: int = -1, ata_mix: float = 0.0, include_prompt: bool = True):
        super().__init__()
        if isinstance(ata_layer, bool) or not isinstance(ata_layer, int):
            raise ValueError(f"ata_layer: expected a layer index, got {ata_layer!r}")
        if not 0.0 <= ata_mix <= 1.0:
            raise ValueError(f"ata_mix: expected a share in [0, 1], got {ata_mix!r}")
        self.ata_layer, self.ata_mix, self.include_prompt = ata_layer, float(ata_mix), bool(include_prompt)
        self.capture = None

    def on_model_ready(self, model) -> None:
        self.attach(model)

    def attach(self, model) -> None:
        """Turn the fused ATA layer on in the module before this one (in ``model``, a SentenceTransformer)."""
        from mgh_kernels import enable_ata

        modules = list(model._modules.values())
        if self not in modules or modules.index(self) == 0:
            raise ValueError("model: ATAPooling must follow the Transformer module in the SentenceTransformer")
        before = modules[modules.index(self) - 1]
        target = getattr(before, "auto_model", None) or getattr(before, "model", None)
        if target is None:
            raise ValueError(f"model: ATAPooling needs a Transformer module before it, got {type(before).__name__}")
        if self.capture is not None and self.capture.model is target:
            return
        if self.capture is not None:
            self.capture.remove()
        self.capture = enable_ata(target, self.ata_layer)

    def forward(self, features: dict, **kwargs) -> dict:
        from sentence_transformers.sentence_transformer.modules import Pooling

        from mgh_kernels import ata_pool

        if self.capture is None:
            raise ValueError(
                "ATAPooling: not attached to a model; build it inside SentenceTransformer(modules=[...]) "
                "or call attach(model)"
            )
        colsum = self.capture.colsum
        hidden = features["token_embeddings"]
        mask = features.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if colsum is None or colsum.shape != hidden.shape[:2]:
            raise ValueError(
                "colsum: the fused ATA layer did not run for these token embeddings (was the "
                "Transformer's attention layer replaced, or its inputs packed?)"
            )
        if not self.include_prompt and features.get("prompt_length"):
            length = features["prompt_length"]
            length = int(length[0]) if isinstance(length, torch.Tensor) else int(length)
            mask = Pooling._exclude_prompt_from_mask(mask, length)
        features["sentence_embedding"] = ata_pool(hidden, mask, colsum=colsum, mix=self.ata_mix)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)


__all__ = ["ATAPooling", "MGHPooling", "MGHTransformer"]
