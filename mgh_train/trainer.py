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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch

from mgh_kernels import eager_infonce, infonce_loss

from . import disk_space, distributed, interrupts, packing, peers, run_lock
from .batches import Collate, MicroBatchPlanner, RankPlans, instruction_of, micro_batch_loader
from .checkpoints import (check_output, load_weights_and_optimizer, plan_run, rank_rng_state, restore_schedule, save_checkpoint,
                          set_rng_state)
from .checks import check_base_model
from .config import TrainConfig
from .data import (Example, NoDuplicatesBatcher, fingerprint, mix, needs_of, read_examples, read_sts_pairs,
                   schedule_notes)
from .diagnose import first_non_finite, non_finite_colsum
from .evaluators import BestKeeper, check_best_model_options
from .distributed import Ranks
from .metrics import RunLog
from .model import STS_INSTRUCTION, Embedder, EmbedderConfig
from .precision import Precision, resolve
from .profiling import StepProfiler
from .progress import TrainBar
from .run_summary import run_summary
from .step import TrainStep, compiled_loss, make_optimizer
from .trackers import open_trackers
from .trackers import resolve as resolve_trackers


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
    model_path: Optional[Path]
    losses: list = field(default_factory=list)  # per optimizer step of this process, in order
    start_step: int = 0
    accuracy_before: Optional[dict] = None
    accuracy_after: Optional[dict] = None
    sts_spearman: Optional[float] = None
    evaluation: Optional[dict] = None  # the evaluator's last metrics (``evaluator=``)
    best_step: Optional[int] = None  # the step whose weights were kept (``load_best_model_at_end``)
    embedder: Optional[Embedder] = field(default=None, repr=False)  # the trained embedder (rank 0)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def seed_files() -> list[Path]:
    """The seed MGH dataset shipped inside the package."""
    folder = resources.files("mgh_train") / "seed"
    return sorted(Path(str(folder)).glob("*.jsonl"))


def load_training_data(cfg: TrainConfig, log: Callable[[str], None],
                       examples: Optional[list] = None) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) for ``cfg``; bad rows fail or are counted.

    Every row is checked against what ``cfg.schedule`` trains with (:func:`mgh_train.data.needs_of`).
    """
    needs = needs_of(cfg.schedule, cfg.steps, cfg.stage_steps)

    def read(paths):
        out = []
        for path in paths:
            report = read_examples(path, skip_bad_rows=cfg.skip_bad_rows, needs=needs)
            if report.skipped:
                log(f"{path}: skipped {len(report.skipped)} bad row(s), first at line {report.skipped[0][0]}: "
                    f"{report.skipped[0][1]}")
            out += report.examples
        return out

    levelled = list(examples) if examples is not None else read(cfg.data or seed_files())  # fit(): in memory
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
    """Spearman's rank correlation (average ranks for ties): scipy.stats.spearmanr's."""
    from scipy.stats import spearmanr

    return float(spearmanr(x.double().cpu().numpy(), y.double().cpu().numpy()).statistic)


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
# the loop
# --------------------------------------------------------------------------------------------


def lr_schedule(optimizer, steps: int, warmup: int):
    """transformers' linear warm-up and decay (``get_linear_schedule_with_warmup``, as its Trainer and
    sentence-transformers' use): rate ``lr x step / warmup`` over the first ``warmup`` steps, then
    linear to 0 at ``steps``. A LambdaLR: checkpoints store its position."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def build_embedder(cfg: TrainConfig, precision: Precision) -> Embedder:
    """The embedder ``cfg`` describes, its base weights loaded in ``precision.weights``."""
    embedder = Embedder.build(EmbedderConfig(**cfg.embedder_options(), dtype=precision.weights_name))
    if cfg.gradient_checkpointing:
        embedder.enable_gradient_checkpointing()
    return embedder


def load_embedder(cfg: TrainConfig, precision: Precision) -> Embedder:
    """:func:`build_embedder`, with a model that cannot be loaded (a name the hub does not know, no
    network, a broken file) reported as a ValueError naming ``model`` rather than a traceback."""
    try:
        return build_embedder(cfg, precision)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"model: cannot load {cfg.model} ({reason})") from None


def train(cfg: TrainConfig, *, embedder: Optional[Embedder] = None, log: Callable[[str], None] = print,
          report_accuracy: bool = True, examples: Optional[list] = None, evaluator=None) -> TrainResult:
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
    except Exception as error:  # noqa: BLE001 - a lost or stalled peer: one line naming its rank
        lost = peers.explain(error, ranks, timeout=cfg.dist_timeout) if ranks.distributed else None
        if lost is None:
            raise
        ranks.owned = False  # the group is broken: destroying it could wait on the lost peer
        raise lost from None
    finally:
        ranks.close()


@dataclass
class Prepared:
    """What a run checked and loaded before any collective (:func:`prepare`)."""

    precision: Precision
    plan: object  # mgh_train.checkpoints.RunPlan
    train_set: list
    held: list
    data_fingerprint: str
    embedder: Embedder
    gather: bool


def prepare(cfg: TrainConfig, ranks: Ranks, embedder: Optional[Embedder], log: Callable[[str], None],
            examples: Optional[list] = None) -> Prepared:
    """Check the options, the output folder, the checkpoint and the data, then load the model: a
    ValueError on any rank is raised on every rank; then the ranks check that they agree."""
    with ranks.same_outcome():  # no collective inside: what one rank refuses, every rank refuses
        resolve_trackers(cfg.report_to)  # a tracker asked for but not installed stops the run here
        gather = check_scale_options(cfg, ranks)
        precision = resolve(ranks.device, bf16=cfg.bf16, fp16=cfg.fp16, dtype=cfg.dtype)
        if embedder is None:
            check_base_model(cfg.model, cfg.gguf_file)
        if ranks.main:  # one run per folder: held until train() returns (mgh_train/run_lock.py)
            check_output(Path(cfg.output))
            run_lock.take(cfg.output)
        plan = plan_run(cfg, log, ranks.world)  # the run folder and the checkpoint, before anything heavy
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train_set, held = load_training_data(cfg, log, examples)
        if cfg.epochs:  # --epochs: the steps follow from the data
            cfg.steps = cfg.steps_for_epochs(len(train_set), ranks.world)
            log(f"epochs: {cfg.epochs} x {len(train_set)} examples = {cfg.steps} steps")
        if len(train_set) < cfg.batch_size * ranks.world:
            raise ValueError(f"batch_size: {cfg.batch_size}{_times(ranks)} is more than the {len(train_set)} "
                             "training examples")
        data_fingerprint = fingerprint(train_set)
        plan.check_data(data_fingerprint, log)
        log(f"data: {len(train_set)} training examples, {len(held)} held out; schedule {cfg.schedule}")
        for note in schedule_notes(train_set, cfg.schedule):  # pairs, data without levels
            log(note)
        log(f"precision: {precision.describe()}")
        if embedder is None:
            log(f"model: loading {cfg.model} ...")
            embedder = load_embedder(cfg, precision)
    ranks.agree(run_facts(cfg, data_fingerprint, embedder))  # K and D follow from these
    return Prepared(precision, plan, train_set, held, data_fingerprint, embedder, gather)


def _train(cfg: TrainConfig, ranks: Ranks, embedder: Optional[Embedder], log: Callable[[str], None],
           report_accuracy: bool, examples: Optional[list] = None, evaluator=None) -> TrainResult:
    output, device = Path(cfg.output), ranks.device
    started = time.perf_counter()
    run = prepare(cfg, ranks, embedder, log, examples)
    embedder, precision, held = run.embedder, run.precision, run.held
    embedder.to(device)
    embedder.set_precision(precision)
    scaler = precision.grad_scaler()
    params = [p for p in embedder.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lora_r: the model has no trainable parameters (set lora_r > 0)")
    log(f"model: {sum(p.numel() for p in params):,} trainable parameters, pooling {embedder.config.pooling}, "
        f"{'bidirectional' if embedder.config.bidirectional else 'causal'}, loss {cfg.loss}, device {device}")
    if ranks.distributed:
        log(f"world: {ranks.world} processes, --parallel {cfg.parallel or 'replicate'}, global batch "
            f"{cfg.batch_size * ranks.world} ({cfg.batch_size} per process), candidates "
            f"{'gathered from every process' if run.gather else 'of each process alone'}")

    result = TrainResult(output=output, model_path=None)
    keeper = BestKeeper(evaluator, embedder, log, metric=cfg.metric_for_best_model,
                        greater_is_better=cfg.greater_is_better) if evaluator is not None else None
    if report_accuracy and held and ranks.main:  # the whole model is on every rank until the engine
        result.accuracy_before = retrieval_accuracy(embedder, held)
        log(f"held-out retrieval before training: accuracy {result.accuracy_before['accuracy']:.1%}, "
            f"MRR {result.accuracy_before['mrr']:.3f} ({len(held)} queries)")

    if cfg.packing:
        packing.use_packed_attention(embedder)
        log(packing.describe(cfg, device))
    engine = distributed.make_engine(cfg.parallel, ranks, embedder, precision)
    optimizer = make_optimizer([p for p in embedder.parameters() if p.requires_grad],  # FSDP2's DTensors
                               lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup * cfg.steps)  # transformers' TrainingArguments.get_warmup_steps
    scheduler = lr_schedule(optimizer, cfg.steps, warmup)
    batcher = NoDuplicatesBatcher(run.train_set, cfg.batch_size * ranks.world, seed=cfg.seed)  # the global batch
    rng = random.Random(cfg.seed)  # the negatives': the same draws on every rank
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)  # dropout differs between ranks (the weights do not)
    start = 0
    if run.plan.checkpoint is not None:
        start = resume(run.plan.checkpoint, cfg, ranks, engine, embedder=embedder, optimizer=optimizer,
                       scheduler=scheduler, batcher=batcher, rng=rng, scaler=scaler, changed=run.plan.changed,
                       log=log)
    result.start_step = start
    if ranks.main:
        run.plan.clear(log)  # --overwrite: the old run's state goes now, just before the first write
    ranks.barrier()

    loss_fn = (gathered_infonce if run.gather else infonce_loss) if cfg.loss == "fused" else eager_infonce
    train_step = TrainStep(embedder, optimizer, loss_fn, tau=cfg.tau, negatives=cfg.negatives,
                           max_grad_norm=cfg.max_grad_norm, precision=precision, scaler=scaler,
                           loss_wrapper=compiled_loss(embedder, cfg) if cfg.compile else None,
                           engine=engine, gradcache=cfg.gradcache)
    loader = micro_batch_loader_for(cfg, run.train_set, batcher, rng, embedder, engine, start)
    run_log = RunLog(output / "metrics.jsonl" if ranks.main else None, start,
                     open_trackers(cfg.report_to, output, cfg.to_dict()) if ranks.main else None)
    profiler = StepProfiler(output / "profile", cfg.profile, log) if cfg.profile and ranks.main else None
    bar = TrainBar(cfg.steps, start) if cfg.progress and ranks.main else None
    embedder.train()
    last_checkpoint, last_state = None, None
    micro_batches = iter(loader)
    hint = f"resume with the same command and --resume latest (in {output})"
    interrupts.deferring(hint)  # SIGINT/SIGTERM from here: finish the step, save, stop
    try:
        for step in range(start, cfg.steps):
            batches = [next(micro_batches) for _ in range(cfg.grad_accum)]
            last_state = batches[-1].plan.state
            outcome = train_step([b.to(device) for b in batches])
            scheduler.step()
            run_log.add(step + 1, outcome, lr=scheduler.get_last_lr()[0], stage=batches[0].plan.stage,
                        plans=[b.plan for b in batches])
            if bar is not None:
                bar.step(outcome.loss)
            if profiler is not None:
                profiler.step()
            done = step + 1 == cfg.steps
            evaluate = bool((cfg.eval_data_dir or keeper) and cfg.eval_every and (step + 1) % cfg.eval_every == 0)
            stop = interrupts.requested(ranks)  # a signal any rank received: 0 if none
            save = bool(cfg.save_every and (step + 1) % cfg.save_every == 0) or done or bool(stop)
            if (step + 1) % cfg.log_every == 0 or done or evaluate or save:
                extra = None
                if evaluate and cfg.eval_data_dir:
                    spearman_now = evaluated(engine, lambda: sts_dev_spearman(embedder, cfg.eval_data_dir,
                                                                              cfg.eval_limit))
                    extra = {"stsb_dev_spearman": spearman_now} if ranks.main else None
                    embedder.train()
                if evaluate and keeper is not None:
                    found = evaluated(engine, lambda: keeper(step + 1))
                    extra = {**(extra or {}), **found} if ranks.main else None
                rows, bad = run_log.flush(extra)
                if bad is not None:  # the same step on every rank: the flag was reduced over them
                    raise _non_finite(embedder, engine, bad.step, bad.plans, last_checkpoint)
                result.losses += [row["loss"] for row in rows]
                if bar is not None:
                    bar.logged(rows[-1])
            if save:
                with disk_space.saving(output, step + 1, embedder):  # a full disk: one line, no partial files
                    last_checkpoint = save_checkpoint(output, step=step + 1, embedder=embedder, optimizer=optimizer,
                                                      scheduler=scheduler, sampler=last_state, cfg=cfg,
                                                      scaler=scaler, data_fingerprint=run.data_fingerprint,
                                                      ranks=ranks, sharded=engine.sharded)
                interrupts.saved(last_checkpoint)
            if stop:
                raise interrupts.stopped(stop, step + 1, last_checkpoint, hint)
    finally:
        del micro_batches  # stops the loader's workers
        if profiler is not None:
            profiler.close()
        if bar is not None:
            bar.close()
        run_log.close()
    interrupts.immediate()

    embedder.eval()
    if cfg.eval_data_dir:
        result.sts_spearman = evaluated(engine, lambda: sts_dev_spearman(embedder, cfg.eval_data_dir, cfg.eval_limit))
        if ranks.main:
            log(f"STS-B dev Spearman: {result.sts_spearman:.2f}")
            with (output / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": cfg.steps, "final_stsb_dev_spearman": result.sts_spearman}) + "\n")
    if report_accuracy and held:
        result.accuracy_after = evaluated(engine, lambda: retrieval_accuracy(embedder, held))
        if ranks.main:
            log(f"held-out retrieval after training: accuracy {result.accuracy_after['accuracy']:.1%}, "
                f"MRR {result.accuracy_after['mrr']:.3f}")
    if keeper is not None:
        if not keeper.history or keeper.history[-1]["step"] != cfg.steps:
            evaluated(engine, lambda: keeper(cfg.steps))
        if ranks.main:
            result.evaluation = keeper.history[-1]
            log("evaluation at the end: " + ", ".join(f"{k} {v:.4f}" for k, v in result.evaluation.items()
                                                        if k != "step"))
            with (output / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": cfg.steps, **{f"final_eval_{k}": v for k, v in
                                                               result.evaluation.items() if k != "step"}}) + "\n")
            if cfg.load_best_model_at_end:
                keeper.restore_best()
                result.best_step = keeper.best_step
    card = {"train_examples": len(run.train_set), **({"in_memory": True} if examples is not None else {})}
    result.model_path = save_model(embedder, engine, output / "model", training={**cfg.to_dict(), **card})
    result.embedder = embedder if ranks.main else None
    log(f"model saved to {result.model_path}")
    if ranks.main:
        log(run_summary(time.perf_counter() - started, steps=cfg.steps - result.start_step,
                        examples=(cfg.steps - result.start_step) * cfg.grad_accum * cfg.batch_size * ranks.world,
                        losses=result.losses))
    return result


# --------------------------------------------------------------------------------------------
# the loop's helpers: scale, resume, evaluation, the final model
# --------------------------------------------------------------------------------------------


def gathered_infonce(q, pos, neg=None, *, tau: float, negatives: str):
    """``infonce_loss`` with every rank's positives and negatives as candidates (``gather=True``)."""
    return infonce_loss(q, pos, neg, tau=tau, negatives=negatives, gather=True)


def micro_batch_loader_for(cfg: TrainConfig, train_set: list, batcher, rng, embedder: Embedder, engine,
                           start: int):
    """The DataLoader of this rank's micro-batches from step ``start``: the global plan (sampler,
    stage, negatives) cut to its slice, tokenized in ``--workers`` processes."""
    ranks = engine.ranks
    planner = MicroBatchPlanner(train_set, batcher, rng, schedule=cfg.schedule, steps=cfg.steps,
                                stage_steps=cfg.stage_steps, grad_accum=cfg.grad_accum, start_step=start)
    workers = cfg.workers if cfg.workers is not None else (2 if ranks.device.type == "cuda" else 1)
    if cfg.packing:  # padded buckets -> packed rows (mgh_train/packing.py)
        collate = packing.collate_for(cfg, embedder.tokenizer, embedder.config, one_forward=engine.collective_forward)
    else:
        collate = Collate(embedder.tokenizer, embedder.config, multiple=64 if cfg.compile else 8,
                          max_buckets=cfg.max_buckets, chunk_size=cfg.chunk_size, chunk_tokens=cfg.chunk_tokens,
                          one_forward=engine.collective_forward)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked workers
    return micro_batch_loader(RankPlans(planner, ranks.rank, ranks.world), collate, workers=workers,
                              pin_memory=ranks.device.type == "cuda")


def check_scale_options(cfg: TrainConfig, ranks: Ranks) -> bool:
    """Refuse what cannot run at this world size (ValueError naming the option); whether the loss
    gathers candidates across the ranks (``--gather``, on by default with several)."""
    if not ranks.distributed:
        return False
    if cfg.gather and cfg.negatives != "global":
        raise ValueError("gather: candidates are gathered from every process only with --negatives global "
                         "(own candidates are per query)")
    gather = cfg.gather is not False and cfg.negatives == "global"
    if gather and cfg.loss != "fused":
        raise ValueError("loss: the eager reference loss has no cross-process gather; use --loss fused, or "
                         "--no-gather (each process's queries then score its own batch only)")
    if cfg.parallel == "fsdp" and cfg.chunk_tokens:
        raise ValueError("chunk_tokens: under --parallel fsdp every forward is collective, so every process must run "
                         "as many: bound GradCache's chunks by --chunk-size only")
    if cfg.parallel == "fsdp" and cfg.fp16:
        raise ValueError("fp16: --parallel fsdp runs in bfloat16 (its MixedPrecisionPolicy); float16's gradient "
                         "scaler is not sharded here: use --bf16 or --parallel replicate")
    return gather


def run_facts(cfg: TrainConfig, data_fingerprint: str, embedder: Embedder) -> dict:
    """What every rank must agree on: the options, the training examples, the embedding dimension D
    and the trainable weights. The hard negatives per query K follow from the options and the
    examples (the plan is global), so ranks agreeing on these agree on K."""
    facts = {f"option {name}": value for name, value in cfg.to_dict().items() if name not in ("device",)}
    facts["the training examples (fingerprint)"] = data_fingerprint
    facts["the embedding dimension D"] = getattr(embedder.model.config, "hidden_size", None)
    facts["the trainable weights"] = sum(p.numel() for p in embedder.parameters() if p.requires_grad)
    return facts


def resume(checkpoint, cfg: TrainConfig, ranks: Ranks, engine, *, embedder, optimizer, scheduler, batcher, rng,
           scaler, changed: list, log: Callable[[str], None]) -> int:
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


def evaluated(engine, evaluate: Callable):
    """``evaluate()`` on rank 0 (its value; None elsewhere), or on every rank where each forward
    needs them all (FSDP2), its value kept on rank 0 only."""
    ranks = engine.ranks
    if ranks.main or engine.collective_forward:
        value = evaluate()
        return value if ranks.main else None
    return None


def save_model(embedder: Embedder, engine, path: Path, *, training: dict) -> Optional[Path]:
    """Rank 0 writes ``model/`` (FSDP2's shards gathered to it first: every rank calls this); the
    path on rank 0, None elsewhere."""
    ranks = engine.ranks
    state = None
    if engine.sharded:  # the whole weights on rank 0's CPU (the base too where it is not named)
        state = distributed.full_state(embedder, trainable_only=embedder.config.base_model is not None)
    saved = embedder.save(path, training=training, state_dict=state) if ranks.main else None
    ranks.barrier()
    return saved


def _times(ranks: Ranks) -> str:
    return f" x {ranks.world} processes" if ranks.distributed else ""


def _non_finite(embedder: Embedder, engine, step: int, plans: list, last_checkpoint) -> "NonFiniteTraining":
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
        "Lower --lr, raise --tau, or check the data.", step=step, where=culprit)


__all__ = ["NonFiniteTraining", "TrainResult", "TrainingStopped", "retrieval_accuracy", "spearman", "sts_dev_spearman",
           "train"]
