"""sentence-transformers modules over an mgh model folder (``modules.json`` names them).

``SentenceTransformer(folder, trust_remote_code=True)`` builds: :class:`MGHTransformer` (tokenizer +
LLM + adapter; emits token states, the pooling mask and, under ATA, the fused column sums), then
:class:`MGHPooling` (mean / last-token / weighted-mean / first-token / ATA), then Normalize. The
vectors equal :meth:`mgh_train.model.Embedder.encode`'s. A prompt passed to ``encode`` is the query
prefix, e.g. ``prompt="Instruct: ...\\nQuery: "`` (the saved prompt ``"query"`` holds the default).
Importing this module needs sentence-transformers (``pip install mgh[eval]``).
"""

from __future__ import annotations

from typing import Optional

from sentence_transformers.base.modules import InputModule, Module

from .model import Embedder


class MGHTransformer(InputModule):
    """Input module: an :class:`~mgh_train.model.Embedder` up to its last hidden states."""

    save_in_root = True

    def __init__(self, model_name_or_path: str, embedder: Optional[Embedder] = None):
        super().__init__()
        self.embedder = embedder if embedder is not None else Embedder.load(model_name_or_path)
        self.tokenizer = self.embedder.tokenizer

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "MGHTransformer":
        return cls(model_name_or_path)

    def preprocess(self, inputs, prompt: Optional[str] = None, **kwargs) -> dict:
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
        self.embedder.save(output_path)


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


__all__ = ["MGHPooling", "MGHTransformer"]
