"""Tiny, fast stand-ins for real models in trainer and model tests: a byte-level BPE tokenizer
trained on the packaged seed texts, and randomly initialised decoders of the supported families."""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch
import transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaModel),
    "mistral": (transformers.MistralConfig, transformers.MistralModel),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2Model),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3Model),
}


def seed_texts() -> list[str]:
    texts = []
    for path in sorted((resources.files("mgh_train") / "seed").iterdir()):
        if path.name.endswith(".jsonl"):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                texts += [row["query"], row["positive"], *(n["text"] for n in row["negatives"])]
    return texts


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(seed_texts(), trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400, padding_side: str = "right"):
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)), eos_token="</s>", pad_token="<pad>"
    )
    tok.padding_side = padding_side
    return tok


def tiny_decoder(family: str = "llama", vocab_size: int = 400, seed: int = 0, layers: int = 2):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def save_tiny_llama(folder):
    """Write the tiny Llama and its tokenizer to ``folder`` (a model folder ``--model`` loads); returns it."""
    tiny_decoder("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
