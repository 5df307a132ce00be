"""A training step packed (``--packing``) against today's length buckets, at the SmolLM2-135M
architecture (random weights from its config), side by side in one run.

Each entry is the trainer's own step (``mgh_train.step.TrainStep``: encoder forwards, ATA pooling,
the fused InfoNCE, backward, clipping, fused AdamW) on one micro-batch of the same token ids, in
the precision the trainer's defaults take on the device, LoRA r16 on every linear layer:

* ``packed`` (role "ours"): ``PackingCollate``: every text of the micro-batch in one packed row,
  each attending to itself (``ata_attention_varlen`` in every layer);
* ``length buckets`` (role "peer"): ``Collate`` as the trainer runs today: up to four padded
  buckets (lengths rounded to 8), SDPA in every layer but the ATA one.

Workloads: the seed set's rows (their token counts under SmolLM2's tokenizer, ``seed_lengths.json``:
query with instruction, positive, one hard negative) and a long-tailed mix (queries 8-32 tokens,
documents 64-512 log-uniform, 3 hard negatives: ``bench_varlen.long_tailed_lengths``). Each
entry's ``work`` is the real (non-padding) tokens per step, so the table prints real tokens/s;
peak memory is CUDA's max allocated or the CPU's peak resident set beyond the step's start.

Run: ``pytest benchmarks/bench_packing.py --benchmark`` (see RESULTS.md for the figures).
"""

import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SEED_LENGTHS = HERE / "seed_lengths.json"
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
# MGH_BENCH_LAYERS=N: the first N of its 30 layers (every layer the same work, so the same ratios in a
# third of the time on a loaded CPU; RESULTS.md says which ran)
LAYERS = int(os.environ.get("MGH_BENCH_LAYERS", SMOLLM2_135M["num_hidden_layers"]))
MODES = {"packed": ("packed rows (--packing)", "ours"), "buckets": ("length buckets (today)", "peer")}
CASES = {  # workload -> (triplets per micro-batch, hard negatives) by device type
    "cpu": {"seed set": (8, 1), "long-tailed": (4, 3)},
    "cuda": {"seed set": (64, 1), "long-tailed": (32, 3)},
}


def seed_lengths(triplets: int, seed: int = 0) -> list:
    """Token counts of ``triplets`` seed rows (drawn with a fixed seed): queries, positives, negatives."""
    rows = json.loads(SEED_LENGTHS.read_text())["rows"]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [rows[order[i % len(rows)]] for i in range(triplets)]
    return [r[0] for r in chosen] + [r[1] for r in chosen] + [r[2] for r in chosen]


def long_tailed_lengths(triplets: int, negatives: int, seed: int = 0, query=(8, 32), document=(64, 512)) -> list:
    """Queries uniform in ``query``, positives then negatives log-uniform in ``document``."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(query[0], query[1] + 1, (triplets,), generator=gen).tolist()
    low, high = math.log(document[0]), math.log(document[1])
    docs = (torch.rand(triplets * (1 + negatives), generator=gen) * (high - low) + low).exp().round().long().tolist()
    return queries + docs


def lengths_of(workload: str, triplets: int, negatives: int) -> list:
    return seed_lengths(triplets) if workload == "seed set" else long_tailed_lengths(triplets, negatives)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def make_step(
    mode: str,
    dims: dict,
    lengths: list,
    *,
    triplets: int,
    negatives: int,
    device,
    precision=None,
    pooling: str = "ata",
    seed: int = 0,
):
    """A no-argument callable running one trainer step of ``mode`` ("packed" or "buckets") on texts of
    these token ``lengths`` (queries, positives, negatives; random ids, the same for every mode);
    returns the loss (a device scalar). Also returns the real tokens per step."""
    from transformers import LlamaConfig, LlamaModel

    from mgh_kernels import hf_private, infonce_loss
    from mgh_train.batches import Collate
    from mgh_train.model import Embedder, EmbedderConfig
    from mgh_train.packing import PackingCollate
    from mgh_train.precision import resolve
    from mgh_train.step import TrainStep, make_optimizer

    precision = precision or resolve(device)
    config = LlamaConfig(**dims, attention_dropout=0.0)
    hf_private.set_attn_implementation(config, "sdpa")
    torch.manual_seed(seed)
    base = LlamaModel(config).to(precision.weights)
    options = EmbedderConfig(
        base_model=None, pooling=pooling, lora_r=16, lora_alpha=32, lora_dropout=0.0, max_length=max(lengths) + 1
    )
    embedder = Embedder.build(options, model=base, tokenizer=_tokenizer())
    embedder.to(device).set_precision(precision)
    embedder.train()
    gen = torch.Generator().manual_seed(seed + 1)
    rows = [torch.randint(3, dims["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    flags = [[True] * n for n in lengths]
    collate = PackingCollate(embedder.tokenizer, options) if mode == "packed" else Collate(embedder.tokenizer, options)
    batch = collate.assemble(rows, flags, queries=triplets, k=negatives).to(device)
    optimizer = make_optimizer([p for p in embedder.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    train_step = TrainStep(
        embedder,
        optimizer,
        infonce_loss,
        tau=0.05,
        negatives="global",
        max_grad_norm=1.0,
        precision=precision,
        scaler=precision.grad_scaler(),
    )

    def step():
        return train_step([batch]).loss

    step.model = embedder
    step.forwards = len(batch.buckets)
    step.padded_tokens = sum(int(f["input_ids"].numel()) for f in batch.buckets)
    return step, sum(lengths)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("workload", ["seed set", "long-tailed"])
def bench_packed_step(measure, device, note, workload, mode):
    pytest.importorskip("peft")
    triplets, negatives = CASES[device.type][workload]
    lengths = lengths_of(workload, triplets, negatives)
    name, role = MODES[mode]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dims = {**SMOLLM2_135M, "num_hidden_layers": LAYERS}
    step, tokens = make_step(mode, dims, lengths, triplets=triplets, negatives=negatives, device=device)
    note(f"{workload} {name}: {step.forwards} forward(s), {step.padded_tokens} tokens computed for {tokens} real")
    arch = "SmolLM2-135M" + ("" if LAYERS == SMOLLM2_135M["num_hidden_layers"] else f" (first {LAYERS} layers)")
    measure(
        step,
        group=f"{arch} LoRA train step, {workload}: {triplets} triplets x {negatives} negatives, "
        f"{len(lengths)} texts, {tokens} real tokens",
        name=name,
        role=role,
        work={"real tokens": tokens},
        rounds=10 if device.type == "cuda" else 3,
        warmup_rounds=1 if device.type == "cuda" else 0,
    )  # the CPU: measure's own first call warms up


def _rss_kib(field: str) -> int:
    import re

    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def first_step_peak(workload: str, mode: str) -> float:
    """MiB the process's resident set grows by in its first step (CPU, Linux): measured in a fresh
    process, where no earlier entry's freed memory is reused (pytest's in-run figure on the CPU is
    order-dependent for that reason)."""
    triplets, negatives = CASES["cpu"][workload]
    dims = {**SMOLLM2_135M, "num_hidden_layers": LAYERS}
    step, _ = make_step(
        mode,
        dims,
        lengths_of(workload, triplets, negatives),
        triplets=triplets,
        negatives=negatives,
        device=torch.device("cpu"),
    )
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (the model's build) forgotten
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


if __name__ == "__main__":  # python benchmarks/bench_packing.py: each entry's first-step peak, one process each
    import subprocess
    import sys

    if len(sys.argv) == 3:
        print(f"{first_step_peak(sys.argv[1], sys.argv[2]):.1f}")
        sys.exit(0)
    for workload in CASES["cpu"]:
        for mode, (name, _) in MODES.items():
            out = subprocess.run([sys.executable, __file__, workload, mode], capture_output=True, text=True, check=True)
            print(f"{workload:12s} {name:28s} first-step peak RSS growth {out.stdout.strip().splitlines()[-1]} MiB")
