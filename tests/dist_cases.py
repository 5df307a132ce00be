"""What the distributed tests run, shared by the test (one process, the doubled batch) and its
workers (tests/distributed_worker.py, two gloo ranks): the tiny embedder, the options, the cases."""

from __future__ import annotations

import torch
import transformers

from mgh_train.config import TrainConfig
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import tiny_decoder, tiny_tokenizer

B = 3  # queries per rank; one process takes 2 * B

# Each case: the embedder's options, the options both runs share, and those of the two-rank run
# only (its engine and GradCache). The one-process run is plain: one forward per bucket.
CASES = {
    "replicate": {"model": {"pooling": "ata"}, "train": {"schedule": "all"}, "world": {}},
    "replicate-gradcache-accum": {
        "model": {"pooling": "mean", "bidirectional": True, "checkpointing": True},
        "train": {"grad_accum": 2},
        "world": {"chunk_size": 3},
    },
    "fsdp-accum": {
        "model": {"pooling": "ata", "checkpointing": True},
        "train": {"grad_accum": 2},
        "world": {"parallel": "fsdp"},
    },
    "fsdp-gradcache": {
        "model": {"pooling": "last_token", "bidirectional": True},
        "train": {"schedule": "all"},
        "world": {"parallel": "fsdp", "chunk_size": 2},
    },
    # --packing (mgh_train/packing.py): each rank's texts in packed rows, against the padded one process
    "replicate-packed-gradcache-tokens": {
        "model": {"pooling": "ata", "checkpointing": True},
        "train": {"grad_accum": 2},
        "world": {"packing": True, "chunk_tokens": 80},
    },
    "fsdp-packed": {
        "model": {"pooling": "ata"},
        "train": {"schedule": "all"},
        "world": {"parallel": "fsdp", "packing": True},
    },
    "fsdp-packed-gradcache": {
        "model": {"pooling": "mean", "bidirectional": True},
        "train": {},
        "world": {"parallel": "fsdp", "packing": True, "chunk_size": 2},
    },
}


class GradientTap:
    """Records the trainable gradients each step clips (before clipping; FSDP2's shards gathered,
    so every rank must be inside), as ``grads[step][i]`` in the optimizer's parameter order."""

    def __init__(self):
        self.grads: list = []

    def __enter__(self):
        self.real = torch.nn.utils.clip_grad_norm_

        def tapped(params, *args, **kwargs):
            params = list(params)
            self.grads.append([_whole(p.grad) for p in params])
            return self.real(params, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = tapped
        return self

    def __exit__(self, *exc):
        torch.nn.utils.clip_grad_norm_ = self.real


def _whole(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def tiny_embedder(lora_seed: int = 0, hidden: int = 32, checkpointing: bool = False, **options) -> Embedder:
    """The same tiny random Llama every time (``hidden`` wide); ``lora_seed`` seeds the adapter."""
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    if hidden == 32:
        base = tiny_decoder("llama", seed=0)
    else:
        config = transformers.LlamaConfig(
            vocab_size=400,
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=256,
        )
        torch.manual_seed(0)
        base = transformers.LlamaModel(config).eval()
    torch.manual_seed(lora_seed)
    embedder = Embedder.build(EmbedderConfig(base_model=None, **options), model=base, tokenizer=tiny_tokenizer())
    if checkpointing:
        embedder.enable_gradient_checkpointing()
    return embedder


def config(output, **options) -> TrainConfig:
    base = dict(
        steps=2,
        batch_size=B,
        lr=5e-3,
        warmup=0.0,
        output=str(output),
        progress=False,
        max_length=64,
        schedule="level:1",
        workers=0,
        log_every=1,
        report_to=["none"],
    )
    return TrainConfig(**{**base, **options})
