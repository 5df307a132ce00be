"""The training loop: LoRA embedder, MGH curriculum, fused InfoNCE, checkpoints that resume exactly.

    from mgh_train.config import TrainConfig
    from mgh_train.trainer import train
    result = train(TrainConfig(steps=100, output="runs/x"))

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples per process (no
text twice in a micro-batch); a micro-batch's queries are scored against its positives and its
hard negatives (the negative of the current curriculum stage, or all four under
``schedule="all"``). In-batch negatives come from the micro-batch only: with W processes (torchrun)
the global micro-batch of W x ``batch_size`` examples, every rank's candidates gathered for every
query, so a W-process run trains as one process with W times the batch. The micro-batches come
from a DataLoader (:mod:`mgh_train.batches`), the step is :class:`mgh_train.step.TrainStep`
(GradCache with ``chunk_size``: :mod:`mgh_train.gradcache`), the process group and the engines are
:mod:`mgh_train.distributed`, and nothing in the loop reads a device value except at logging
steps (:mod:`mgh_train.metrics`).

Read it top to bottom: :func:`train` holds the run's lock and signal handlers, :func:`_train` is the
run (prepare, set up, :func:`train_loop`, evaluate, save), and :func:`train_loop` is what every step
does. Before it: :mod:`mgh_train.preparation` (the checks, the data, the model), beside it:
:mod:`mgh_train.watchers` (rows, progress bar, profiler) and :mod:`mgh_train.evaluate` (held-out
retrieval, STS-B dev).

A run folder holds ``metrics.jsonl`` (one row per step, written at each logging step), ``checkpoints/step-N/``
(trainable weights, optimizer, scheduler, sampler position and every RNG state, so ``--resume``
continues with the very losses an uninterrupted run has), and ``model/`` (the final embedder,
loadable by :meth:`Embedder.load` and sentence-transformers). A folder belongs to one run: how a
new run, ``--resume`` and ``--overwrite`` treat it is :mod:`mgh_train.checkpoints`'s business.
The output folder, the device, the base model's files, the checkpoint and every data row are
checked before the model loads; a non-finite loss stops the run with :class:`NonFiniteTraining`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mgh_kernels import eager_infonce, infonce_loss

from . import disk_space, distributed, interrupts, packing, peers, run_lock
from .batches import (
    COMPILE_PAD_MULTIPLE,
    PAD_MULTIPLE,
    Collate,
    MicroBatchPlanner,
    RankPlans,
    instruction_of,
    micro_batch_loader,
)
from .checkpoints import load_weights_and_optimizer, rank_rng_state, restore_schedule, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import NoDuplicatesBatcher
from .diagnose import first_non_finite, non_finite_colsum
from .distributed import Ranks
from .evaluate import retrieval_accuracy, sts_dev_spearman
from .evaluators import BestKeeper, check_best_model_options
from .model import Embedder
from .preparation import Prepared, prepare
from .run_summary import run_summary
from .step import TrainStep, make_optimizer
from .watchers import Watchers


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a non-finite loss); the message says why and what is kept."""


class NonFiniteTraining(TrainingStopped):
    """The loss (or the activations ATA pools) went NaN or infinite at ``step``, before the optimizer
    step; ``where`` names the first trainable parameter or module output that is not finite."""

    def __init__(self, message: str, *, step: int, where: str):
        super().__init__(message)
        self.step, self.where = step, where


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    model_path: Path | None
    losses: list = field(default_factory=list)  # per optimizer step of this process, in order
    start_step: int = 0
    accuracy_before: dict | None = None
    accuracy_after: dict | None = None
    sts_spearman: float | None = None
    evaluation: dict | None = None  # the evaluator's last metrics (``evaluator=``)
    best_step: int | None = None  # the step whose weights were kept (``load_best_model_at_end``)
    embedder: Embedder | None = field(default=None, repr=False)  # the trained embedder (rank 0)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    embedder: Embedder | None = None,
    log: Callable[[str], None] = print,
    report_accuracy: bool = True,
    examples: list | None = None,
    evaluator=None,
) -> TrainResult:
    """Run ``cfg``; ``embedder`` replaces the one ``cfg`` describes (tests pass tiny models),
    ``examples`` (:class:`Example` list) replace ``cfg.data``, and ``evaluator`` (see
    :mod:`mgh_train.evaluators`) runs every ``eval_every`` steps and at the end. :func:`mgh_train.fit`
    is the entry point for in-memory data.

    Under torchrun (any launcher that sets ``RANK``, ``WORLD_SIZE``, ...) every process runs this
    and they train one model data-parallel (:mod:`mgh_train.distributed`); only rank 0 logs."""
    cfg.validate()
    check_best_model_options(cfg, evaluator)
    ranks = distributed.setup(cfg.device, log, timeout=cfg.dist_timeout)
    try:  # the run folder's lock and the SIGINT/SIGTERM handlers last as long as the run
        with run_lock.holding(), interrupts.handling(log):
            return _train(cfg, ranks, embedder, ranks.main_only(log), report_accuracy, examples, evaluator)
    except Exception as error:  # a lost or stalled peer: one line naming its rank
        lost = peers.explain(error, ranks, timeout=cfg.dist_timeout) if ranks.distributed else None
        if lost is None:
            raise
        ranks.owned = False  # the group is broken: destroying it could wait on the lost peer
        raise lost from None
    finally:
        ranks.close()


def _train(
    cfg: TrainConfig,
    ranks: Ranks,
    embedder: Embedder | None,
    log: Callable[[str], None],
    report_accuracy: bool,
    examples: list | None = None,
    evaluator=None,
) -> TrainResult:
    """The run: check and load, measure the held-out retrieval, set up, train, evaluate, save."""
    started = time.perf_counter()
    run = prepare(cfg, ranks, embedder, log, examples)
    embedder = place_model(cfg, ranks, run, log)
    result = TrainResult(output=Path(cfg.output), model_path=None)
    keeper = (
        BestKeeper(evaluator, embedder, log, metric=cfg.metric_for_best_model, greater_is_better=cfg.greater_is_better)
        if evaluator is not None
        else None
    )
    held = run.held if report_accuracy else []
    if held and ranks.main:  # the whole model is on every rank until the engine
        result.accuracy_before = retrieval_accuracy(embedder, held)
        log(
            f"held-out retrieval before training: accuracy {result.accuracy_before['accuracy']:.1%}, "
            f"MRR {result.accuracy_before['mrr']:.3f} ({len(held)} queries)"
        )

    training = set_up(cfg, ranks, run, log)
    result.start_step = training.start
    result.losses = train_loop(cfg, training, keeper)
    final_evaluation(cfg, training, keeper, held, result)

    card = {"train_examples": len(run.train_set), **({"in_memory": True} if examples is not None else {})}
    result.model_path = save_model(
        embedder, training.engine, result.output / "model", training={**cfg.to_dict(), **card}
    )
    result.embedder = embedder if ranks.main else None
    log(f"model saved to {result.model_path}")
    if ranks.main:
        steps = cfg.steps - result.start_step
        log(
            run_summary(
                time.perf_counter() - started,
                steps=steps,
                losses=result.losses,
                examples=steps * cfg.grad_accum * cfg.batch_size * ranks.world,
            )
        )
    return result


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def train_loop(cfg: TrainConfig, t: Training, keeper: BestKeeper | None) -> list[float]:
    """Optimizer steps ``t.start + 1`` .. ``cfg.steps``; the losses of the steps run, in order.

    Each step trains on ``grad_accum`` micro-batches and records its outcome without reading the
    device. A logging step reads the pending rows (a non-finite loss stops the run there), an
    evaluation step first runs the evaluators, a saving step (every ``save_every``, the last, or
    one a signal interrupted) writes a checkpoint, and a SIGINT/SIGTERM stops the run after it.
    """
    losses, checkpoint = [], None
    hint = f"resume with the same command and --resume latest (in {cfg.output})"
    t.embedder.train()
    # closing(): the loader's workers stop when the loop ends, an error's traceback included
    with Watchers(cfg, t.ranks, t.start, t.log) as watch, closing(steps_after(t.start, cfg, t.loader)) as steps:
        interrupts.deferring(hint)  # SIGINT/SIGTERM from here: finish the step, save, stop
        for step, batches in steps:
            outcome = t.train_step([b.to(t.ranks.device) for b in batches])
            t.scheduler.step()
            watch.step(step, outcome, lr=t.scheduler.get_last_lr()[0], batches=batches)
            due = Due.at(cfg, step, evaluators=bool(cfg.eval_data_dir or keeper), stop=interrupts.requested(t.ranks))
            if due.log:
                rows, bad = watch.flush(evaluations(cfg, t, keeper, step) if due.evaluate else None)
                if bad is not None:  # the same step on every rank: the flag was reduced over them
                    raise _non_finite(t.embedder, t.engine, bad.step, bad.plans, checkpoint)
                losses += [row["loss"] for row in rows]
            if due.save:
                checkpoint = t.save_checkpoint(cfg, step, sampler=batches[-1].plan.state)
                interrupts.saved(checkpoint)
            if due.stop:
                raise interrupts.stopped(due.stop, step, checkpoint, hint)
    interrupts.immediate()
    return losses


def steps_after(start: int, cfg: TrainConfig, loader) -> Iterator[tuple[int, list]]:
    """(step, its ``grad_accum`` micro-batches) for the steps after ``start`` (steps count from 1)."""
    micro_batches = iter(loader)
    for step in range(start + 1, cfg.steps + 1):
        yield step, [next(micro_batches) for _ in range(cfg.grad_accum)]


@dataclass(frozen=True)
class Due:
    """What a step does after its update: ``evaluate``, ``save``, ``stop`` (the number of a signal
    any rank received; 0: none) and ``log`` (read its pending rows: any of these, or a logging step)."""

    evaluate: bool
    save: bool
    stop: int
    log: bool

    @classmethod
    def at(cls, cfg: TrainConfig, step: int, *, evaluators: bool, stop: int) -> Due:
        done = step == cfg.steps
        evaluate = bool(evaluators and cfg.eval_every and step % cfg.eval_every == 0)
        save = bool(cfg.save_every and step % cfg.save_every == 0) or done or bool(stop)
        return cls(evaluate, save, stop, step % cfg.log_every == 0 or done or evaluate or save)


# --------------------------------------------------------------------------------------------
# what the loop works with
# --------------------------------------------------------------------------------------------


@dataclass
class Training:
    """What :func:`train_loop` works with (:func:`set_up`): the engine and the model it wraps, the
    optimizer, its schedule and float16's scaler, the step, the loader, and the step to start after."""

    ranks: Ranks
    engine: object  # a mgh_train.distributed engine
    embedder: Embedder
    optimizer: torch.optim.Optimizer
    scheduler: object  # a LambdaLR (lr_schedule)
    scaler: torch.amp.GradScaler | None
    train_step: TrainStep
    loader: object  # DataLoader of this rank's micro-batches (micro_batch_loader_for)
    start: int
    data_fingerprint: str
    log: Callable[[str], None]

    def save_checkpoint(self, cfg: TrainConfig, step: int, *, sampler: dict) -> Path:
        """``checkpoints/step-N/`` after step ``step``; ``sampler``: the plans' state after its last
        micro-batch. A full disk ends the run in one line, leaving no partial files."""
        output = Path(cfg.output)
        with disk_space.saving(output, step, self.embedder):
            return save_checkpoint(
                output,
                step=step,
                embedder=self.embedder,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                sampler=sampler,
                cfg=cfg,
                scaler=self.scaler,
                data_fingerprint=self.data_fingerprint,
                ranks=self.ranks,
                sharded=self.engine.sharded,
            )


def place_model(cfg: TrainConfig, ranks: Ranks, run: Prepared, log: Callable[[str], None]) -> Embedder:
    """The prepared embedder on this rank's device in the run's precision (a ValueError naming
    ``lora_r`` if nothing in it trains), described in the log."""
    embedder, device = run.embedder, ranks.device
    embedder.to(device)
    embedder.set_precision(run.precision)
    params = [p for p in embedder.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lora_r: the model has no trainable parameters (set lora_r > 0)")
    log(
        f"model: {sum(p.numel() for p in params):,} trainable parameters, pooling {embedder.config.pooling}, "
        f"{'bidirectional' if embedder.config.bidirectional else 'causal'}, loss {cfg.loss}, device {device}"
    )
    if ranks.distributed:
        log(
            f"world: {ranks.world} processes, --parallel {cfg.parallel or 'replicate'}, global batch "
            f"{cfg.batch_size * ranks.world} ({cfg.batch_size} per process), candidates "
            f"{'gathered from every process' if run.gather else 'of each process alone'}"
        )
    return embedder


def set_up(cfg: TrainConfig, ranks: Ranks, run: Prepared, log: Callable[[str], None]) -> Training:
    """The engine, the optimizer and its schedule, the sampler and the negatives' RNG (restored from
    the run's checkpoint where it resumes), the step and the loader from the first step to run."""
    embedder = run.embedder
    if cfg.packing:
        packing.use_packed_attention(embedder)
        log(packing.describe(cfg, ranks.device))
    engine = distributed.make_engine(cfg.parallel, ranks, embedder, run.precision)
    optimizer = make_optimizer(
        [p for p in embedder.parameters() if p.requires_grad],  # FSDP2's DTensors
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    warmup = math.ceil(cfg.warmup * cfg.steps)  # transformers' TrainingArguments.get_warmup_steps
    scheduler, scaler = lr_schedule(optimizer, cfg.steps, warmup), run.precision.grad_scaler()
    batcher = NoDuplicatesBatcher(run.train_set, cfg.batch_size * ranks.world, seed=cfg.seed)  # the global batch
    rng = random.Random(cfg.seed)  # the negatives': the same draws on every rank
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)  # dropout differs between ranks (the weights do not)
    start = 0
    if run.plan.checkpoint is not None:
        start = resume(
            run.plan.checkpoint,
            cfg,
            ranks,
            engine,
            embedder=embedder,
            optimizer=optimizer,
            scheduler=scheduler,
            batcher=batcher,
            rng=rng,
            scaler=scaler,
            changed=run.plan.changed,
            log=log,
        )
    if ranks.main:
        run.plan.clear(log)  # --overwrite: the old run's state goes now, just before the first write
    ranks.barrier()
    train_step = TrainStep(
        embedder,
        optimizer,
        loss_function(cfg, run.gather),
        tau=cfg.tau,
        negatives=cfg.negatives,
        max_grad_norm=cfg.max_grad_norm,
        precision=run.precision,
        scaler=scaler,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        engine=engine,
        gradcache=cfg.gradcache,
    )
    loader = micro_batch_loader_for(cfg, run.train_set, batcher, rng, embedder, engine, start)
    return Training(
        ranks, engine, embedder, optimizer, scheduler, scaler, train_step, loader, start, run.data_fingerprint, log
    )


def loss_function(cfg: TrainConfig, gather: bool) -> Callable:
    """The InfoNCE loss ``--loss`` names: the fused kernels (``mgh_kernels.infonce_loss``, every
    rank's candidates gathered where ``gather``), or ``mgh_kernels.eager_infonce`` (plain PyTorch ops,
    the fused kernels' peer)."""
    if cfg.loss == "fused":
        return gathered_infonce if gather else infonce_loss
    return eager_infonce


def gathered_infonce(q, pos, neg=None, *, tau: float, negatives: str):
    """``infonce_loss`` with every rank's positives and negatives as candidates (``gather=True``)."""
    return infonce_loss(q, pos, neg, tau=tau, negatives=negatives, gather=True)


def lr_schedule(optimizer, steps: int, warmup: int):
    """transformers' linear warm-up and decay (``get_linear_schedule_with_warmup``, as its Trainer and
    sentence-transformers' use): rate ``lr x step / warmup`` over the first ``warmup`` steps, then
    linear to 0 at ``steps``. A LambdaLR: checkpoints store its position."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def micro_batch_loader_for(cfg: TrainConfig, train_set: list, batcher, rng, embedder: Embedder, engine, start: int):
    """The DataLoader of this rank's micro-batches from step ``start``: the global plan (sampler,
    stage, negatives) cut to its slice, tokenized in ``--workers`` processes."""
    ranks = engine.ranks
    planner = MicroBatchPlanner(
        train_set,
        batcher,
        rng,
        schedule=cfg.schedule,
        steps=cfg.steps,
        stage_steps=cfg.stage_steps,
        grad_accum=cfg.grad_accum,
        start_step=start,
    )
    workers = cfg.workers if cfg.workers is not None else (2 if ranks.device.type == "cuda" else 1)
    if cfg.packing:  # padded buckets -> packed rows (mgh_train/packing.py)
        collate = packing.collate_for(cfg, embedder.tokenizer, embedder.config, one_forward=engine.collective_forward)
    else:
        collate = Collate(
            embedder.tokenizer,
            embedder.config,
            multiple=COMPILE_PAD_MULTIPLE if cfg.compile else PAD_MULTIPLE,
            max_buckets=cfg.max_buckets,
            chunk_size=cfg.chunk_size,
            chunk_tokens=cfg.chunk_tokens,
            one_forward=engine.collective_forward,
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked workers
    return micro_batch_loader(
        RankPlans(planner, ranks.rank, ranks.world), collate, workers=workers, pin_memory=ranks.device.type == "cuda"
    )


def resume(
    checkpoint,
    cfg: TrainConfig,
    ranks: Ranks,
    engine,
    *,
    embedder,
    optimizer,
    scheduler,
    batcher,
    rng,
    scaler,
    changed: list,
    log: Callable[[str], None],
) -> int:
    """Restore a checkpoint's weights, optimizer, schedule, sampler and RNG states; its step."""
    state = checkpoint.state
    load_weights_and_optimizer(embedder, optimizer, checkpoint, sharded=engine.sharded)
    scheduler.load_state_dict(state["scheduler"])
    if {"lr", "warmup", "steps"} & set(changed):
        restore_schedule(optimizer, scheduler, cfg.lr, scheduler.lr_lambdas[0])  # this run's steps and warm-up
    batcher.load_state_dict(state["sampler"])
    rng.setstate(state["negatives_rng"])
    own = rank_rng_state(checkpoint, ranks.rank, ranks.world)
    if own is not None:
        set_rng_state(own)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log(f"resume: continuing after step {checkpoint.step} from {checkpoint.path}")
    return checkpoint.step


# --------------------------------------------------------------------------------------------
# evaluation during and after the loop, the final model
# --------------------------------------------------------------------------------------------


def evaluations(cfg: TrainConfig, t: Training, keeper: BestKeeper | None, step: int) -> dict | None:
    """An evaluation step's measurements, to join its row: STS-B dev (``eval_data_dir``) and the
    evaluator's (``evaluator=``); rank 0's, None on the others."""
    extra = None
    if cfg.eval_data_dir:
        value = evaluated(t.engine, lambda: sts_dev_spearman(t.embedder, cfg.eval_data_dir, cfg.eval_limit))
        extra = {"stsb_dev_spearman": value} if t.ranks.main else None
        t.embedder.train()
    if keeper is not None:
        found = evaluated(t.engine, lambda: keeper(step))
        extra = {**(extra or {}), **found} if t.ranks.main else None
    return extra


def final_evaluation(cfg: TrainConfig, t: Training, keeper: BestKeeper | None, held: list, result: TrainResult) -> None:
    """After the last step: STS-B dev (``eval_data_dir``), the ``held`` examples' retrieval and the
    evaluator, into ``result`` and the log (and ``metrics.jsonl``'s final rows)."""
    t.embedder.eval()
    if cfg.eval_data_dir:
        result.sts_spearman = evaluated(
            t.engine, lambda: sts_dev_spearman(t.embedder, cfg.eval_data_dir, cfg.eval_limit)
        )
        if t.ranks.main:
            t.log(f"STS-B dev Spearman: {result.sts_spearman:.2f}")
            append_row(result.output, {"step": cfg.steps, "final_stsb_dev_spearman": result.sts_spearman})
    if held:
        result.accuracy_after = evaluated(t.engine, lambda: retrieval_accuracy(t.embedder, held))
        if t.ranks.main:
            t.log(
                f"held-out retrieval after training: accuracy {result.accuracy_after['accuracy']:.1%}, "
                f"MRR {result.accuracy_after['mrr']:.3f}"
            )
    if keeper is not None:
        final_evaluator(cfg, t, keeper, result)


def final_evaluator(cfg: TrainConfig, t: Training, keeper: BestKeeper, result: TrainResult) -> None:
    """The evaluator at the last step (unless it just ran there), into ``result`` and
    ``metrics.jsonl``; with ``load_best_model_at_end`` the best step's weights back in the model."""
    if not keeper.history or keeper.history[-1]["step"] != cfg.steps:
        evaluated(t.engine, lambda: keeper(cfg.steps))
    if not t.ranks.main:
        return
    result.evaluation = keeper.history[-1]
    scores = {k: v for k, v in result.evaluation.items() if k != "step"}
    t.log("evaluation at the end: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    append_row(result.output, {"step": cfg.steps, **{f"final_eval_{k}": v for k, v in scores.items()}})
    if cfg.load_best_model_at_end:
        keeper.restore_best()
        result.best_step = keeper.best_step


def append_row(output: Path, row: dict) -> None:
    """One more row at the end of the run folder's ``metrics.jsonl``."""
    with (output / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def evaluated(engine, evaluate: Callable):
    """``evaluate()`` on rank 0 (its value; None elsewhere), or on every rank where each forward
    needs them all (FSDP2), its value kept on rank 0 only."""
    ranks = engine.ranks
    if ranks.main or engine.collective_forward:
        value = evaluate()
        return value if ranks.main else None
    return None


def save_model(embedder: Embedder, engine, path: Path, *, training: dict) -> Path | None:
    """Rank 0 writes ``model/`` (FSDP2's shards gathered to it first: every rank calls this); the
    path on rank 0, None elsewhere."""
    ranks = engine.ranks
    state = None
    if engine.sharded:  # the whole weights on rank 0's CPU (the base too where it is not named)
        state = distributed.full_state(embedder, trainable_only=embedder.config.base_model is not None)
    saved = embedder.save(path, training=training, state_dict=state) if ranks.main else None
    ranks.barrier()
    return saved


def _non_finite(embedder: Embedder, engine, step: int, plans: list, last_checkpoint) -> NonFiniteTraining:
    """The error that stops a run at ``step``, whose micro-batches (``plans``) gave a non-finite loss
    (named as non-finite activations where ATA's column sums are): its update never reached the
    weights (skipped on the device, or never made). Every rank diagnoses the whole global
    micro-batch, so every rank stops with the same message."""
    examples = [e for plan in plans for e in plan.all_examples]
    texts, instructions = [e.query for e in examples], [instruction_of(e) for e in examples]
    context = lambda: engine.whole_forward(embedder.autocast())  # noqa: E731 - FSDP2's root unsharded too
    culprit = first_non_finite(embedder, texts, instructions, context=context)
    cause = non_finite_colsum(embedder, texts, instructions, context=context)
    what = f"the model's activations are not finite ({cause})" if cause else "the loss is not finite"
    where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
    return NonFiniteTraining(
        f"step {step}: {what}: {culprit}; so training stopped before its update reached the weights{where}. "
        "Lower --lr, raise --tau, or check the data.",
        step=step,
        where=culprit,
    )


__all__ = ["NonFiniteTraining", "TrainResult", "TrainingStopped", "train", "train_loop"]
