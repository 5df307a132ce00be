"""The embedder: a transformers decoder LLM + LoRA + optional bidirectional attention + pooling.

:class:`Embedder` ties the package's parts together: :mod:`.base` loads the base model and adds
LoRA, :mod:`.tokens` turns texts into padded ids, ``mgh_kernels.pool`` pools the last hidden
states, and :mod:`.saved` writes and reads its folder. See :mod:`mgh_train.model` for usage.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mgh_kernels import enable_ata, pool

from ..files import atomic_folder
from ..precision import Precision, resolve
from . import saved
from .base import add_lora, base_of, builds_sdpa_masks, load_base, sdpa_mask_of, set_bidirectional
from .options import EmbedderConfig
from .packed import packed_embeddings
from .tokens import pad, token_ids


class Embedder(torch.nn.Module):
    """A decoder LLM turned into a text embedder. Build with :meth:`build`, reload with :meth:`load`.

    Attributes:
        model: the transformers model (a peft ``PeftModel`` when LoRA is on).
        tokenizer: its tokenizer.
        config: the :class:`EmbedderConfig`.
        capture: the ``mgh_kernels.enable_ata`` handle when pooling is "ata", else None.
        precision: the :class:`~mgh_train.precision.Precision` set by :meth:`set_precision`, or
            None: then :meth:`encode` runs the device's default autocast (bfloat16 on CUDA, none
            on the CPU).
    """

    def __init__(self, model, tokenizer, config: EmbedderConfig):
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.precision: Precision | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.capture = enable_ata(model, config.ata_layer) if config.pooling == "ata" else None

    @classmethod
    def build(
        cls, config: EmbedderConfig, *, model=None, tokenizer=None, adapter: str | None = None, trainable: bool = True
    ) -> Embedder:
        """Load (or take) the base model, set its attention direction, add LoRA, set up pooling.

        Args:
            config: the options.
            model, tokenizer: a base model already in memory (then ``config.base_model`` may be None).
            adapter: a saved peft adapter folder to load instead of a fresh LoRA.
            trainable: whether the adapter's weights take gradients.
        """
        if (model is None) != (tokenizer is None):
            raise ValueError("model, tokenizer: pass both or neither")
        if model is None:
            model, tokenizer = load_base(config)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and 2 <= positions < config.max_length:
            # as sentence-transformers caps max_seq_length at the model's positions: said, not silent
            warnings.warn(
                f"max_length: {config.max_length} tokens is more than the model's {positions} positions; "
                f"texts are truncated to {positions} tokens",
                stacklevel=2,
            )
            config = dataclasses.replace(config, max_length=positions)
        set_bidirectional(model, config.bidirectional)
        model = add_lora(model, config, adapter=adapter, trainable=trainable)
        return cls(model, tokenizer, config)

    # -- inputs ---------------------------------------------------------------------------------

    def prefix(self, instruction: str | None) -> str:
        """The query prefix for ``instruction`` ("" for documents, i.e. no instruction)."""
        return self.config.query_template.format(instruction=instruction) if instruction else ""

    def tokenize(
        self, texts: Sequence[str], *, instruction=None, prefix=None, pad_to_multiple_of: int | None = None
    ) -> dict:
        """Tokenize ``texts`` with the query prefix of ``instruction``, or a literal ``prefix``.

        ``instruction`` / ``prefix`` is one string for every text or a list with one per text
        (None or "" for a document). Returns ``input_ids``, ``attention_mask`` and ``pool_mask``
        ([B, L] int64, padded on the tokenizer's side, L rounded up to ``pad_to_multiple_of``):
        ``pool_mask`` is the attention mask without the prefix's tokens when
        ``exclude_instruction`` is set. A token belongs to the text when it ends after the prefix's
        last character, so a BPE token that merges the prefix's trailing space with the text's
        first word counts as text.
        """
        return self.pad(
            *self.token_ids(texts, instruction=instruction, prefix=prefix), pad_to_multiple_of=pad_to_multiple_of
        )

    def token_ids(self, texts: Sequence[str], *, instruction=None, prefix=None) -> tuple[list, list]:
        """(token ids, pooled flags) per text, unpadded: what :meth:`tokenize` pads (see
        :func:`token_ids`)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a list of strings")
        if not texts:
            raise ValueError("texts: expected at least one text, got an empty list")
        if instruction is not None and prefix is not None:
            raise ValueError("instruction, prefix: pass one or the other")
        if prefix is None:
            per_text = instruction if isinstance(instruction, (list, tuple)) else [instruction] * len(texts)
            heads = [self.prefix(i) for i in per_text]
        else:
            heads = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * len(texts)
        if len(heads) != len(texts):
            raise ValueError(f"instruction: expected one per text ({len(texts)}), got {len(heads)}")
        return token_ids(self.tokenizer, self.config, texts, heads)

    def pad(
        self, rows: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], *, pad_to_multiple_of: int | None = None
    ) -> dict:
        """:func:`pad` with this embedder's tokenizer."""
        return pad(self.tokenizer, rows, flags, pad_to_multiple_of=pad_to_multiple_of)

    # -- forward --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_precision(self, precision: Precision) -> Embedder:
        """Cast the frozen floating-point weights to ``precision.weights`` (the trainable LoRA weights
        stay float32) and run :meth:`encode` under its autocast.

        Under autocast, peft's LoRA layers stop casting their input to the adapter's float32 (two
        casts per layer and forward for nothing: autocast casts it back for the matmul)."""
        for p in self.model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != precision.weights:
                p.data = p.data.to(precision.weights)
        for module in self.model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = precision.autocast is None
        self.precision = precision
        return self

    def autocast(self):
        """The autocast context this embedder's forward runs in (see :attr:`precision`)."""
        return (self.precision or resolve(self.device)).autocast_context()

    def token_states(self, features: dict, *, padded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden states [B, L, H] and, with ATA, the column sums [B, L] float32 (else None).

        ``padded`` is whether ``attention_mask`` pads anything, as the caller knows it from the host
        (None: unknown). transformers finds that out by reading the mask on the host (a sync per
        forward); told, the model gets no mask (``False``) or, where its attention builds SDPA's
        masks, the [B, 1, L, L] mask transformers would build, which it uses as given."""
        mask = features["attention_mask"]
        if padded is False:
            mask = None
        elif padded and builds_sdpa_masks(self.model, mask.shape[1]):
            mask = sdpa_mask_of(mask, causal=not self.config.bidirectional)
        out = self.model(input_ids=features["input_ids"], attention_mask=mask)
        return out.last_hidden_state, (self.capture.colsum if self.capture is not None else None)

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor, colsum: torch.Tensor | None) -> torch.Tensor:
        """[B, L, H] hidden states -> [B, H] float32 embeddings (unit length if ``normalize``)."""
        cfg = self.config
        extra = {"colsum": colsum, "mix": cfg.ata_mix} if cfg.pooling == "ata" else {}
        embeddings = pool(hidden.float(), pool_mask, cfg.pooling, **extra)
        return F.normalize(embeddings, dim=-1) if cfg.normalize else embeddings

    def forward(self, features: dict, *, padded: bool | None = None) -> torch.Tensor:
        """Embeddings [B, H] float32 of a :meth:`tokenize` batch (moved to the model's device);
        ``padded`` as in :meth:`token_states`. A packed row (:mod:`mgh_train.packing`) gives its
        texts' embeddings [n, H] the same way."""
        if "cu_seqlens" in features:
            return packed_embeddings(self, features)
        features = {k: v.to(self.device) for k, v in features.items()}
        hidden, colsum = self.token_states(features, padded=padded)
        return self.pool(hidden, features["pool_mask"], colsum)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], *, instruction=None, batch_size: int = 32, show_progress: bool = False
    ) -> torch.Tensor:
        """Embed ``texts`` ([N, H] float32 on the CPU), in batches sorted by length.

        ``instruction`` (one string, or one per text) marks them as queries of that task; documents
        take none. Runs under :meth:`autocast`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        texts = list(texts)
        per_text = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction] * len(texts)
        if len(per_text) != len(texts):
            raise ValueError(f"instruction: expected one per text ({len(texts)}), got {len(per_text)}")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [None] * len(texts)
        was_training = self.training
        self.eval()
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        try:
            for start in starts:
                chunk = order[start : start + batch_size]
                features = self.tokenize([texts[i] for i in chunk], instruction=[per_text[i] for i in chunk])
                with self.autocast():
                    vectors = self(features).float().cpu()
                for i, v in zip(chunk, vectors):
                    out[i] = v
        finally:
            self.train(was_training)
        return torch.stack(out) if out else torch.empty(0)

    def enable_gradient_checkpointing(self) -> None:
        """Re-compute each layer in backward (non-reentrant, so the ATA column sums keep their graph)."""
        base = base_of(self.model)
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- save / load ----------------------------------------------------------------------------

    def save(
        self,
        path,
        *,
        merged: bool = False,
        training: dict | None = None,
        eval_results=None,
        state_dict: dict | None = None,
    ) -> Path:
        """Write a folder that :meth:`load` and sentence-transformers read back.

        The LoRA adapter alone by default (the base is named in ``mgh_config.json``; a base built in
        memory is written to ``base/``); with ``merged=True`` the adapter is merged into the base
        and the whole model is written to ``base/``, in ``config.dtype`` (a GGUF base is written as
        its dequantised weights). The folder also gets a model card, ``README.md``, with the run's
        options ``training`` and, given an mteb result folder ``eval_results``, its scores. The
        folder is written under a temporary name and renamed into place: a failed save leaves
        ``path`` as it was. ``state_dict`` (names as :meth:`state_dict` gives them; the trainable
        weights at least, every weight for a base built in memory) replaces the module's own
        tensors: the whole weights of a sharded (FSDP2) embedder, gathered on one rank.
        """
        path = Path(path)
        if state_dict is not None and merged:
            raise ValueError("merged: a merged save needs the embedder's own weights, not a state_dict")
        from ..model_card import card_name

        with atomic_folder(path, markers=(saved.CONFIG_NAME, "modules.json")) as tmp:
            self._write(
                tmp,
                merged=merged,
                training=training,
                eval_results=eval_results,
                name=card_name(path),
                state_dict=state_dict,
            )
        return path

    def _write(
        self,
        path: Path,
        *,
        merged: bool = False,
        training: dict | None = None,
        eval_results=None,
        name: str | None = None,
        state_dict: dict | None = None,
    ) -> None:
        """Write the folder's files into ``path`` (an existing folder), as :meth:`save` describes."""
        saved.write_folder(
            self, path, merged=merged, training=training, eval_results=eval_results, name=name, state_dict=state_dict
        )

    @property
    def origin(self) -> str | None:
        """The base model this embedder was built from (kept across merged saves), for model cards."""
        return self.__dict__.get("_origin") or self.config.base_model

    @origin.setter
    def origin(self, value: str | None) -> None:
        self.__dict__["_origin"] = value

    @property
    def run_options(self) -> dict | None:
        """The training run's options saved with this model, if any."""
        return self.__dict__.get("_run_options")

    @run_options.setter
    def run_options(self, value: dict | None) -> None:
        self.__dict__["_run_options"] = value

    def merged_model(self):
        """A copy of the base model with the LoRA adapter merged in (the embedder is unchanged)."""
        if not hasattr(self.model, "peft_config"):
            return copy.deepcopy(base_of(self.model))
        if self.capture is not None:
            self.capture.remove()  # a deep copy must not carry the capture hook
        try:
            return copy.deepcopy(self.model).merge_and_unload()
        finally:
            if self.capture is not None:
                self.capture = enable_ata(self.model, self.config.ata_layer)

    @classmethod
    def load(cls, path, *, device=None, trainable: bool = False) -> Embedder:
        """Read a folder written by :meth:`save`; ``trainable`` keeps the adapter trainable."""
        folder = saved.read_folder(path)
        embedder = cls.build(
            folder.config, model=folder.model, tokenizer=folder.tokenizer, adapter=folder.adapter, trainable=trainable
        )
        embedder.origin, embedder.run_options = folder.origin, folder.training
        if device is not None:
            embedder.to(device)
        return embedder.train(trainable)
