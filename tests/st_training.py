"""A few steps of sentence-transformers' own SentenceTransformerTrainer on all-MiniLM-L6-v2 over STS-B
rows, for comparing our losses with sentence-transformers' (tests/test_st_losses.py).

Run as a script, it is one rank of a torch.distributed (gloo) run: it trains with each loss named
on the command line and saves what it saw to a file.

    python tests/st_training.py OUT.pt mnrl fused mnrl64     # with RANK, WORLD_SIZE, MASTER_* set
"""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb" / "stsb-en-train.csv"
ROWS = 24


def minilm_path() -> str:
    from mgh_train.synth.verify import bundled_minilm_path

    return bundled_minilm_path()


def triplets(rows: int = ROWS):
    """(anchor, positive, negative) rows from STS-B train: a loosely related pair (score 1-3) as
    anchor and positive, and the second sentence of a close pair (score >= 4) as the negative, so
    that the loss is of order one (pairs that MiniLM already separates give losses near 1e-5)."""
    from datasets import Dataset

    with open(STSB, newline="", encoding="utf-8") as handle:
        data = list(csv.reader(handle))
    loose = [r for r in data if 1.0 <= float(r[2]) <= 3.0][:rows]
    close = [r for r in data if float(r[2]) >= 4.0][:rows]
    return Dataset.from_dict(
        {"anchor": [r[0] for r in loose], "positive": [r[1] for r in loose], "negative": [r[1] for r in close]}
    )


def make_loss(name: str, model, gather: bool = False):
    """A loss by short name: mnrl / cached (sentence-transformers'), fused / fused-cached (ours)."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from mgh_train.st_losses import FusedCachedMultipleNegativesRankingLoss, FusedMultipleNegativesRankingLoss

    if name == "mnrl":
        return MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if name == "fused":
        return FusedMultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if name == "cached":
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, gather_across_devices=gather)
    if name == "fused-cached":
        return FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=4, gather_across_devices=gather)
    raise ValueError(name)


def train(
    loss_name: str,
    dtype=torch.float32,
    *,
    output: str,
    steps: int = 3,
    batch_size: int = 8,
    gather: bool = False,
    distributed: bool = False,
) -> dict:
    """Train a fresh MiniLM (dropout off, so every run draws nothing random) for ``steps`` steps.

    Returns ``losses`` (what the loss returned at each step), ``logged`` (the trainer's logged
    losses), ``grad_norms`` (logged) and ``weights`` (float64 copies of the final state dict).
    """
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    model = SentenceTransformer(minilm_path(), device="cpu").to(dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss = make_loss(loss_name, model, gather=gather)
    seen = []
    loss.register_forward_hook(lambda module, inputs, output: seen.append(float(output.detach())))
    extra = {"ddp_backend": "gloo"} if distributed else {}
    args = SentenceTransformerTrainingArguments(
        output_dir=output,
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=1e-4,
        seed=7,
        data_seed=7,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        batch_sampler="no_duplicates",
        **extra,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=triplets(), loss=loss)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {
        "losses": seen,
        "logged": [float(h["loss"]) for h in history],
        "grad_norms": [float(h["grad_norm"]) for h in history],
        "weights": {k: v.detach().double().clone() for k, v in model.state_dict().items()},
    }


def distance(a: dict, b: dict) -> float:
    """L2 distance between two state dicts (float64)."""
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


if __name__ == "__main__":
    out, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        dtype = torch.float64 if name.endswith("64") else torch.float32
        results[name] = train(
            name.removesuffix("64"),
            dtype,
            output=str(Path(out).parent / f"run-{name}"),
            batch_size=4,
            gather=True,
            distributed=True,
        )
    torch.save(results, out)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown (see tests/test_infonce.py's gather test)
