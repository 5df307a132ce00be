"""GradCache against a plain step: step time, peak memory, and the largest batch per device.

Both entries are ``mgh_train.step.TrainStep`` as the trainer runs it (LoRA on every linear layer,
ATA pooling through the fused attention kernel, the fused InfoNCE loss with one hard negative
per query, clipping, fused AdamW) on the same micro-batch of random token ids with the seed
set's text lengths: ``plain`` encodes it in length buckets with one backward; ``gradcache``
(``--chunk-size``) embeds it in chunks without a graph, takes the loss on the cached embeddings
and re-encodes each chunk with gradients. GradCache's inherent cost is that second forward: about
4/3 of a plain step without gradient checkpointing (sentence-transformers' cached loss is reported
at 2-2.4x its plain loss); the target is 1.4x.

    python benchmarks/bench_scale.py                    # the table (GPU if there is one, else CPU)
    python benchmarks/bench_scale.py --budget-gib 2     # largest batch within 2 GiB per device
    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --sync   # replicate's all-reduce vs the step
    pytest --benchmark benchmarks/bench_scale.py        # the timings in the ratio table

"Largest batch" is the largest global batch per device (queries; each with a positive and a hard
negative) whose step fits a memory budget: on CUDA ``torch.cuda.set_per_process_memory_fraction``
makes anything beyond it an out-of-memory error; on the CPU a step fits when its peak resident set
size beyond the start (VmHWM) stays within it. The search doubles, then bisects
(``bench_infonce.largest_batch``). On the CPU only ratios mean anything (2 cores shared).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
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
CPU_DIMS = {**SMOLLM2_135M, "num_hidden_layers": 4}  # its shape, fewer layers: a CPU step in seconds
MODES = {"plain": ("plain step (length buckets)", "fused"), "gradcache": ("GradCache (--chunk-size)", "ours")}


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_rows(count: int, max_length: int, vocab_size: int, seed: int = 0) -> list:
    """``count`` rows (query, positive, negative) of random token ids with the seed set's lengths
    (``seed_lengths.json``), truncated to ``max_length``."""
    lengths = json.loads((HERE / "seed_lengths.json").read_text())["rows"]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    return [
        [
            torch.randint(3, vocab_size, (min(n, max_length),), generator=gen).tolist()
            for n in lengths[order[i % len(order)]]
        ]
        for i in range(count)
    ]


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


def make_embedder(device, dims: dict, precision, *, checkpointing: bool = False, seed: int = 0):
    """An ATA embedder with LoRA (r 16, every linear layer) over a random Llama of ``dims``."""
    from transformers import LlamaConfig, LlamaModel

    from mgh_train.model import Embedder, EmbedderConfig

    torch.manual_seed(seed)
    base = LlamaModel(LlamaConfig(**dims, attention_dropout=0.0)).to(precision.weights)
    config = EmbedderConfig(base_model=None, pooling="ata", lora_r=16, lora_alpha=32, lora_dropout=0.0)
    embedder = Embedder.build(config, model=base, tokenizer=_tokenizer())
    if checkpointing:
        embedder.enable_gradient_checkpointing()
    embedder.to(device).set_precision(precision)
    return embedder.train()


def make_step(mode: str, embedder, rows: list, device, precision, chunk_size: int):
    """One optimizer step of ``mode`` ("plain" or "gradcache") on ``rows``: a closure returning the
    loss (a device scalar)."""
    from mgh_kernels import infonce_loss
    from mgh_train.batches import Collate
    from mgh_train.step import TrainStep, make_optimizer

    ids = [r[0] for r in rows] + [r[1] for r in rows] + [r[2] for r in rows]
    chunked = mode == "gradcache"
    collate = Collate(embedder.tokenizer, embedder.config, chunk_size=chunk_size if chunked else 0)
    batch = collate.assemble(ids, [[True] * len(r) for r in ids], queries=len(rows), k=1).to(device)
    optimizer = make_optimizer([p for p in embedder.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    step = TrainStep(
        embedder,
        optimizer,
        infonce_loss,
        tau=0.05,
        negatives="global",
        max_grad_norm=1.0,
        precision=precision,
        scaler=precision.grad_scaler(),
        gradcache=chunked,
    )

    def run():
        return step([batch]).loss

    return run


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def _rss(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _return_freed_memory() -> None:
    """Make glibc give freed tensors back to the system at once: every block of 64 KiB or more is
    its own mapping, unmapped when freed (the default threshold grows with each such free, after
    which freed blocks stay resident and a later step's peak reads as nothing), and the heap is
    trimmed. The resident set size then follows the live tensors."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (a fixed value turns the growth off)
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)


def peak_bytes(fn, device) -> int:
    """The peak memory ``fn()`` takes beyond what was held before it: CUDA's max allocated, or the
    CPU's peak resident set size (Linux, glibc: :func:`_return_freed_memory`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - base


def fits(
    mode: str, embedder, batch: int, *, device, dims, precision, length: int, chunk_size: int, budget: int
) -> bool:
    """Whether a step of ``mode`` at ``batch`` queries fits ``budget`` bytes on ``device``."""
    rows = seed_rows(batch, length, dims["vocab_size"], seed=batch)
    try:
        step = make_step(mode, embedder, rows, device, precision, chunk_size)
        used = peak_bytes(step, device)
    except torch.OutOfMemoryError:
        return False
    finally:
        embedder.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return used <= budget


def largest_batch(
    mode: str, embedder, *, device, dims, precision, length: int, chunk_size: int, budget: int, start: int, limit: int
) -> int:
    """The largest batch (queries) whose ``mode`` step fits ``budget`` bytes, searched in [start, limit]."""
    fraction = None
    if device.type == "cuda":  # beyond the budget (and what the model holds) CUDA runs out of memory
        held = torch.cuda.memory_allocated(device)
        fraction = min(1.0, (held + budget) / torch.cuda.get_device_properties(device).total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        probe = _sibling("bench_infonce").largest_batch
        return probe(
            lambda b: fits(
                mode,
                embedder,
                b,
                device=device,
                dims=dims,
                precision=precision,
                length=length,
                chunk_size=chunk_size,
                budget=budget,
            ),
            start,
            limit,
        )
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


def median_seconds(fn, device, rounds: int, *, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def interleaved_seconds(fns: dict, device, rounds: int) -> dict:
    """The median seconds of each of ``fns`` (a name -> a step), timed in turn round after round, so
    that a load that varies over the run (a shared machine) weighs on every entry alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, device, 1, warm=False))
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def measure_case(
    device,
    dims: dict,
    *,
    batch: int,
    length: int,
    chunk_size: int,
    checkpointing: bool,
    rounds: int,
    budget: int,
    limit: int,
) -> dict:
    """Step time and peak memory of both modes at ``batch``, and each one's largest batch within
    ``budget`` (searched up to ``limit``)."""
    from mgh_train.precision import resolve

    precision = resolve(device)
    embedder = make_embedder(device, dims, precision, checkpointing=checkpointing)
    rows = seed_rows(batch, length, dims["vocab_size"])
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision.describe(),
        "batch": batch,
        "length": length,
        "chunk_size": chunk_size,
        "checkpointing": checkpointing,
        "tokens": sum(len(t) for r in rows for t in r),
    }
    start = {n: p.detach().clone() for n, p in embedder.named_parameters() if p.requires_grad}
    steps = {}
    for mode in MODES:
        with torch.no_grad():  # each mode's first loss from the same weights
            for name, p in embedder.named_parameters():
                if name in start:
                    p.copy_(start[name])
        steps[mode] = make_step(mode, embedder, rows, device, precision, chunk_size)
        out[f"{mode}_loss"] = float(steps[mode]())
    for mode, seconds in interleaved_seconds(steps, device, rounds).items():
        out[f"{mode}_s"] = seconds
    for mode, step in steps.items():
        embedder.zero_grad(set_to_none=True)
        out[f"{mode}_peak"] = peak_bytes(step, device)
    embedder.zero_grad(set_to_none=True)
    out["ratio"] = out["gradcache_s"] / out["plain_s"]
    for mode in MODES:
        out[f"{mode}_largest"] = largest_batch(
            mode,
            embedder,
            device=device,
            dims=dims,
            precision=precision,
            length=length,
            chunk_size=chunk_size,
            budget=budget,
            start=max(1, chunk_size // 2),
            limit=limit,
        )
    out["budget"], out["limit"] = budget, limit
    return out


def measure_sync(device, dims: dict, *, batch: int, length: int, rounds: int) -> dict:
    """Under torchrun: ``--parallel replicate``'s one flat all-reduce of the LoRA gradients against
    the whole step (plain, gathered loss) on this world: what DDP's overlap of that all-reduce with
    the backward could save at most."""
    import torch.distributed as dist

    from mgh_kernels import infonce_loss
    from mgh_train import distributed
    from mgh_train.batches import Collate
    from mgh_train.precision import resolve
    from mgh_train.step import TrainStep, make_optimizer

    ranks = distributed.setup(device.type, print)
    precision = resolve(ranks.device)
    embedder = make_embedder(ranks.device, dims, precision)
    engine = distributed.make_engine("replicate", ranks, embedder, precision)
    rows = seed_rows(batch, length, dims["vocab_size"], seed=ranks.rank)
    ids = [r[0] for r in rows] + [r[1] for r in rows] + [r[2] for r in rows]
    micro = (
        Collate(embedder.tokenizer, embedder.config)
        .assemble(ids, [[True] * len(r) for r in ids], queries=batch, k=1)
        .to(ranks.device)
    )
    params = [p for p in embedder.parameters() if p.requires_grad]
    step = TrainStep(
        embedder,
        make_optimizer(params, lr=1e-5, weight_decay=0.0),
        lambda *a, **k: infonce_loss(*a, **k, gather=True),
        tau=0.05,
        negatives="global",
        max_grad_norm=1.0,
        precision=precision,
        engine=engine,
    )
    step_s = median_seconds(lambda: step([micro]).loss, ranks.device, rounds)
    sync_s = median_seconds(engine.finish_gradients, ranks.device, rounds)
    out = {
        "world": ranks.world,
        "device": str(ranks.device),
        "batch_per_process": batch,
        "gradient_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
        "step_s": step_s,
        "sync_s": sync_s,
        "share": sync_s / step_s,
    }
    dist.barrier()
    ranks.close()
    return out


def table(results: list) -> str:
    lines = [
        "| device | checkpointing | batch x tokens/text | plain step | GradCache step | ratio | peak plain | "
        "peak GradCache | largest batch plain | largest batch GradCache |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        budget = f" (within {r['budget'] / 2**30:.1f} GiB)"
        largest = {
            mode: (
                f">={r[f'{mode}_largest']} (the limit searched)"
                if r[f"{mode}_largest"] == r.get("limit")
                else str(r[f"{mode}_largest"])
            )
            for mode in MODES
        }
        lines.append(
            f"| {r['device']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} x <={r['length']} "
            f"(chunks of {r['chunk_size']}) | {r['plain_s'] * 1e3:.0f} ms | {r['gradcache_s'] * 1e3:.0f} ms | "
            f"x{r['ratio']:.2f} | {r['plain_peak'] / 2**20:.0f} MiB | {r['gradcache_peak'] / 2**20:.0f} MiB | "
            f"{largest['plain']}{budget} | {largest['gradcache']}{budget} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="queries per step (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--length", type=int, default=None, help="tokens per text at most (default: 256; 64 on CPU)")
    parser.add_argument("--chunk-size", type=int, default=None, help="texts per GradCache forward (default: batch / 2)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--budget-gib", type=float, default=None, help="memory per device for the largest batch")
    parser.add_argument("--limit", type=int, default=None, help="largest batch searched")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--sync", action="store_true", help="under torchrun: time replicate's all-reduce against the step instead"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dims = SMOLLM2_135M if cuda else CPU_DIMS
    batch = args.batch or (128 if cuda else 32)
    length = args.length or (256 if cuda else 64)
    if args.sync:
        result = measure_sync(device, dims, batch=batch, length=length, rounds=args.rounds or 5)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
            print(
                f"{result['world']} processes on {result['device']}: the flat all-reduce of "
                f"{result['gradient_mib']:.1f} MiB of LoRA gradients takes {result['sync_s'] * 1e3:.1f} ms, "
                f"{result['share']:.1%} of a {result['step_s'] * 1e3:.0f} ms step"
            )
        return
    chunk = args.chunk_size or max(1, batch // 2)
    budget = int((args.budget_gib or (8.0 if cuda else 1.0)) * 2**30)
    results = []
    for checkpointing in (False, True):
        results.append(
            measure_case(
                device,
                dims,
                batch=batch,
                length=length,
                chunk_size=chunk,
                checkpointing=checkpointing,
                rounds=args.rounds or (10 if cuda else 3),
                budget=budget,
                limit=args.limit or (1 << 16 if cuda else 1024),
            )
        )
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# pytest --benchmark
# --------------------------------------------------------------------------------------------

CASES = {"cpu": [(32, 64, 16)], "cuda": [(128, 256, 64), (512, 256, 128)]}  # (batch, tokens per text, chunk size)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "case", [c for cases in CASES.values() for c in cases], ids=lambda c: "B{}-L{}-chunk{}".format(*c)
)
def bench_gradcache_step(measure, device, case, mode):
    pytest.importorskip("peft")
    if case not in CASES[device.type]:
        pytest.skip(f"not a {device.type} case")
    from mgh_train.precision import resolve

    batch, length, chunk = case
    precision = resolve(device)
    dims = SMOLLM2_135M if device.type == "cuda" else CPU_DIMS
    embedder = make_embedder(device, dims, precision)
    rows = seed_rows(batch, length, dims["vocab_size"])
    step = make_step(mode, embedder, rows, device, precision, chunk)
    name, role = MODES[mode]
    measure(
        step,
        group=f"LoRA step, ATA + fused loss, B{batch} L<={length}, GradCache chunks of {chunk}",
        name=name,
        role=role,
        work={"examples": batch},
        rounds=10 if device.type == "cuda" else 3,
    )


if __name__ == "__main__":
    main()
