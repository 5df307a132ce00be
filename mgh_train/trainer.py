"""The training loop: LoRA embedder, MGH curriculum, fused InfoNCE, checkpoints that resume exactly.

    from mgh_train.config import TrainConfig
    from mgh_train.trainer import train
    result = train(TrainConfig(steps=100, output="runs/x"))

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples (no text twice in
a micro-batch); a micro-batch's queries are scored against its positives and its hard negatives
(the negative of the current curriculum stage, or all four under ``schedule="all"``). In-batch
negatives come from the micro-batch only.

A run folder holds ``metrics.jsonl`` (one row per ``log_every`` steps), ``checkpoints/step-N/``
(trainable weights, optimizer, scheduler, sampler position and every RNG state, so ``--resume``
continues with the very losses an uninterrupted run has), and ``model/`` (the final embedder,
loadable by :meth:`Embedder.load` and sentence-transformers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch

from mgh_kernels import infonce_loss, reference

from .config import TrainConfig
from .data import Example, NoDuplicatesBatcher, mix, negatives_for, read_examples, read_sts_pairs, stage_at
from .model import DEFAULT_INSTRUCTION, STS_INSTRUCTION, Embedder, EmbedderConfig, autocast
from .trackers import open_trackers, resolve as resolve_trackers


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a non-finite loss); the message says why and what is kept."""


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    model_path: Optional[Path]
    losses: list = field(default_factory=list)  # per optimizer step of this process, in order
    start_step: int = 0
    accuracy_before: Optional[dict] = None
    accuracy_after: Optional[dict] = None
    sts_spearman: Optional[float] = None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def seed_files() -> list[Path]:
    """The seed MGH dataset shipped inside the package."""
    folder = resources.files("mgh_train") / "seed"
    return sorted(Path(str(folder)).glob("*.jsonl"))


def load_training_data(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) for ``cfg``; bad rows fail or are counted."""
    def read(paths):
        out = []
        for path in paths:
            report = read_examples(path, skip_bad_rows=cfg.skip_bad_rows)
            if report.skipped:
                log(f"{path}: skipped {len(report.skipped)} bad row(s), first at line {report.skipped[0][0]}: "
                    f"{report.skipped[0][1]}")
            out += report.examples
        return out

    levelled = read(cfg.data or seed_files())
    if not levelled:
        raise ValueError(f"data: no examples in {', '.join(map(str, cfg.data or seed_files()))}")
    order = list(range(len(levelled)))
    random.Random(cfg.seed).shuffle(order)
    n_held = round(len(levelled) * cfg.holdout)
    held = [levelled[i] for i in sorted(order[:n_held])]
    train_set = [levelled[i] for i in sorted(order[n_held:])]
    if cfg.public_data:
        train_set = mix(train_set, read(cfg.public_data), cfg.public_ratio, cfg.seed)
    return train_set, held


def instruction_of(example: Example) -> str:
    return example.instruction or example.task or DEFAULT_INSTRUCTION


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def retrieval_accuracy(embedder: Embedder, examples: list[Example], batch_size: int = 32) -> dict:
    """Each held-out query against a pool of every held-out positive and negative.

    Returns ``accuracy`` (share whose own positive ranks first) and ``mrr``, plus ``n``.
    """
    if not examples:
        return {"accuracy": float("nan"), "mrr": float("nan"), "n": 0}
    pool = sorted({t for e in examples for t in [e.positive, *(n.text for n in e.negatives)]})
    where = {t: i for i, t in enumerate(pool)}
    docs = embedder.encode(pool, batch_size=batch_size)
    queries = embedder.encode([e.query for e in examples], instruction=[instruction_of(e) for e in examples],
                              batch_size=batch_size)
    scores = queries @ docs.T
    target = torch.tensor([where[e.positive] for e in examples])
    own = scores[torch.arange(len(examples)), target]
    rank = (scores > own[:, None]).sum(dim=1) + 1
    return {"accuracy": float((rank == 1).float().mean()), "mrr": float((1.0 / rank).mean()), "n": len(examples)}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation with average ranks for ties (as scipy.stats.spearmanr)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(1, len(v) + 1, dtype=v.dtype)
        for value in torch.unique(v):  # ties share their average rank
            tied = v == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def sts_dev_spearman(embedder: Embedder, data_dir, limit: int = 0, batch_size: int = 32) -> float:
    """Spearman x 100 of cosine similarity against STS-B dev gold scores (both sides instructed)."""
    path = Path(data_dir) / "stsb" / "stsb-en-dev.csv"
    if not path.is_file():
        raise ValueError(f"eval_data_dir: expected {path} (STS-B dev, sentence1,sentence2,score)")
    first, second, gold = read_sts_pairs(path, limit)
    a = embedder.encode(first, instruction=STS_INSTRUCTION, batch_size=batch_size)
    b = embedder.encode(second, instruction=STS_INSTRUCTION, batch_size=batch_size)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    return 100.0 * spearman(cosine, torch.tensor(gold))


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _trainable_state(embedder: Embedder) -> dict:
    return {n: p.detach().cpu().clone() for n, p in embedder.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, *, step: int, embedder, optimizer, scheduler, batcher, rng, cfg) -> Path:
    """Write ``folder/checkpoints/step-N`` atomically (a temporary folder renamed into place)."""
    final = folder / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_trainable_state(embedder), tmp / "trainable.pt")
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "sampler": batcher.state_dict(), "negatives_rng": rng.getstate(), "rng": _rng_state()},
        tmp / "state.pt",
    )
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpoints = sorted((folder / "checkpoints").glob("step-???????"))
    for old in checkpoints[: max(0, len(checkpoints) - cfg.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(resume: str, output: Path) -> Path:
    if resume == "latest":
        found = sorted((output / "checkpoints").glob("step-???????"))
        if not found:
            raise ValueError(f"resume: no checkpoint in {output / 'checkpoints'} to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / "state.pt").is_file() or not (path / "trainable.pt").is_file():
        raise ValueError(f"resume: {path} is not a checkpoint folder (state.pt, trainable.pt)")
    return path


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def _metrics_log(path: Path, start: int):
    """Open the metrics file, dropping rows past ``start`` (a resumed run writes them again)."""
    if start and path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= start]
        path.write_text("".join(r + "\n" for r in rows))
    elif not start:
        path.write_text("")
    return path.open("a", encoding="utf-8")


def build_embedder(cfg: TrainConfig) -> Embedder:
    embedder = Embedder.build(EmbedderConfig(**cfg.embedder_options()))
    if cfg.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    return embedder


def train(cfg: TrainConfig, *, embedder: Optional[Embedder] = None, log: Callable[[str], None] = print,
          report_accuracy: bool = True) -> TrainResult:
    """Run ``cfg``; ``embedder`` replaces the one ``cfg`` describes (tests pass tiny models)."""
    cfg.validate()
    resolve_trackers(cfg.report_to)  # a tracker asked for but not installed stops the run here
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_set, held = load_training_data(cfg, log)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"batch_size: {cfg.batch_size} is more than the {len(train_set)} training examples")
    log(f"data: {len(train_set)} training examples, {len(held)} held out; schedule {cfg.schedule}")

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if embedder is None:
        log(f"model: loading {cfg.model} ...")
        embedder = build_embedder(cfg)
    embedder.to(device)
    params = [p for p in embedder.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lora_r: the model has no trainable parameters (set lora_r > 0)")
    log(f"model: {sum(p.numel() for p in params):,} trainable parameters, pooling {embedder.config.pooling}, "
        f"{'bidirectional' if embedder.config.bidirectional else 'causal'}, loss {cfg.loss}, device {device}")

    result = TrainResult(output=output, model_path=None)
    if report_accuracy and held:
        result.accuracy_before = retrieval_accuracy(embedder, held)
        log(f"held-out retrieval before training: accuracy {result.accuracy_before['accuracy']:.1%}, "
            f"MRR {result.accuracy_before['mrr']:.3f} ({len(held)} queries)")

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.steps, warmup))
    batcher = NoDuplicatesBatcher(train_set, cfg.batch_size, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    start = 0
    if cfg.resume:
        checkpoint = find_checkpoint(cfg.resume, output)
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        trainable = torch.load(checkpoint / "trainable.pt")
        missing = set(n for n, p in embedder.named_parameters() if p.requires_grad) - set(trainable)
        if missing:
            raise ValueError(f"resume: {checkpoint} does not match this model (missing {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, p in embedder.named_parameters():
                if name in trainable:
                    p.copy_(trainable[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batcher.load_state_dict(state["sampler"])
        rng.setstate(state["negatives_rng"])
        _set_rng_state(state["rng"])
        start = state["step"]
        log(f"resume: continuing after step {start} from {checkpoint}")
    result.start_step = start

    loss_fn = infonce_loss if cfg.loss == "fused" else reference.infonce
    batches = iter(batcher)
    board = open_trackers(cfg.report_to, output, cfg.to_dict())
    metrics = _metrics_log(output / "metrics.jsonl", start)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    embedder.train()
    began, seen_examples, seen_tokens = time.perf_counter(), 0, 0
    last_checkpoint = None
    try:
        for step in range(start, cfg.steps):
            stage = stage_at(step, cfg.steps, cfg.stage_steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                examples = [train_set[i] for i in next(batches)]
                where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
                try:
                    loss, tokens = _micro_batch(embedder, examples, cfg, stage, rng, loss_fn)
                except ValueError as error:
                    if not str(error).startswith("colsum:"):
                        raise
                    raise TrainingStopped(  # NaN activations reach ATA's weights before the loss
                        f"step {step + 1}: the model's activations are not finite ({error}), so training "
                        f"stopped before the optimizer step{where}. Lower --lr, or check the data."
                    ) from error
                if not torch.isfinite(loss):
                    raise TrainingStopped(
                        f"step {step + 1}: the loss is {loss.item()} (not finite), so training stopped before "
                        f"the optimizer step{where}. Lower --lr, raise --tau, or check the data."
                    )
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                seen_examples += len(examples)
                seen_tokens += tokens
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.losses.append(step_loss)
            elapsed = time.perf_counter() - began
            row = {"step": step + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "stage": stage,
                   "examples_per_s": seen_examples / elapsed, "tokens_per_s": seen_tokens / elapsed,
                   "elapsed_s": elapsed}
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", stage=stage, ex_s=f"{row['examples_per_s']:.1f}")
                bar.update(1)
            if cfg.eval_data_dir and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row["stsb_dev_spearman"] = sts_dev_spearman(embedder, cfg.eval_data_dir, cfg.eval_limit)
                embedder.train()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or "stsb_dev_spearman" in row:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                board.log(row, step + 1)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                last_checkpoint = save_checkpoint(output, step=step + 1, embedder=embedder, optimizer=optimizer,
                                                  scheduler=scheduler, batcher=batcher, rng=rng, cfg=cfg)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        board.close()

    embedder.eval()
    if cfg.eval_data_dir:
        result.sts_spearman = sts_dev_spearman(embedder, cfg.eval_data_dir, cfg.eval_limit)
        log(f"STS-B dev Spearman: {result.sts_spearman:.2f}")
        with (output / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": cfg.steps, "final_stsb_dev_spearman": result.sts_spearman}) + "\n")
    if report_accuracy and held:
        result.accuracy_after = retrieval_accuracy(embedder, held)
        log(f"held-out retrieval after training: accuracy {result.accuracy_after['accuracy']:.1%}, "
            f"MRR {result.accuracy_after['mrr']:.3f}")
    result.model_path = embedder.save(output / "model", training=cfg.to_dict())
    log(f"model saved to {result.model_path}")
    return result


def _micro_batch(embedder: Embedder, examples: list[Example], cfg: TrainConfig, stage: int, rng: random.Random,
                 loss_fn) -> tuple[torch.Tensor, int]:
    """The InfoNCE loss of one micro-batch and its token count."""
    negatives = [negatives_for(e, cfg.schedule, stage, rng) for e in examples]
    k = min(len(n) for n in negatives)  # public rows may carry fewer; every query keeps k
    docs = [e.positive for e in examples] + [t for n in negatives for t in n[:k]]
    query_features = embedder.tokenize([e.query for e in examples], instruction=[instruction_of(e) for e in examples])
    doc_features = embedder.tokenize(docs)
    with autocast(embedder.device, enabled=cfg.bf16):
        q = embedder(query_features)
        d = embedder(doc_features)
    b = len(examples)
    neg = d[b:].view(b, k, -1) if k else None
    loss = loss_fn(q.float(), d[:b].float(), neg.float() if neg is not None else None, tau=cfg.tau,
                   negatives=cfg.negatives)
    tokens = int(query_features["attention_mask"].sum() + doc_features["attention_mask"].sum())
    return loss, tokens


__all__ = ["TrainResult", "TrainingStopped", "retrieval_accuracy", "spearman", "sts_dev_spearman", "train"]
