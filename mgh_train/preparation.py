"""What a run checks and loads before it trains: the options, the output folder, the checkpoint,
the data and the model, in that order, cheapest first, so that a mistake costs no model load.

    run = prepare(cfg, ranks, embedder=None, log=print)   # Prepared: data, model, plan, precision

Under torchrun every rank prepares; a ValueError on any rank is raised on every rank
(:meth:`~mgh_train.distributed.Ranks.same_outcome`), and the ranks then check that they agree on
what they loaded (:func:`run_facts`) before the first collective of the training itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import run_lock
from .batches import check_chunk_tokens
from .checkpoints import RunPlan, check_output, plan_run
from .checks import check_base_model
from .config import TrainConfig
from .data import Example, fingerprint, load_training_data, schedule_notes
from .distributed import Ranks
from .model import Embedder, EmbedderConfig
from .precision import Precision, resolve
from .trackers import resolve as resolve_trackers


@dataclass
class Prepared:
    """What a run checked and loaded before any collective (:func:`prepare`)."""

    precision: Precision
    plan: RunPlan  # the run folder and the checkpoint to resume from
    train_set: list[Example]
    held: list[Example]
    data_fingerprint: str
    embedder: Embedder  # on the CPU, in its load dtype
    gather: bool  # whether the loss gathers every rank's candidates


def prepare(
    cfg: TrainConfig, ranks: Ranks, embedder: Embedder | None, log: Callable[[str], None], examples: list | None = None
) -> Prepared:
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
            raise ValueError(
                f"batch_size: {cfg.batch_size}{_times(ranks)} is more than the {len(train_set)} training examples"
            )
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


def check_scale_options(cfg: TrainConfig, ranks: Ranks) -> bool:
    """Refuse what cannot run at this world size (ValueError naming the option); whether the loss
    gathers candidates across the ranks (``--gather``, on by default with several)."""
    if not ranks.distributed:
        return False
    if cfg.gather and cfg.negatives != "global":
        raise ValueError(
            "gather: candidates are gathered from every process only with --negatives global "
            "(own candidates are per query)"
        )
    gather = cfg.gather is not False and cfg.negatives == "global"
    if gather and cfg.loss != "fused":
        raise ValueError(
            "loss: the eager loss has no cross-process gather; use --loss fused, or "
            "--no-gather (each process's queries then score its own batch only)"
        )
    check_chunk_tokens(cfg.chunk_tokens, collective=cfg.parallel == "fsdp")
    if cfg.parallel == "fsdp" and cfg.fp16:
        raise ValueError(
            "fp16: --parallel fsdp runs in bfloat16 (its MixedPrecisionPolicy); float16's gradient "
            "scaler is not sharded here: use --bf16 or --parallel replicate"
        )
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


def _times(ranks: Ranks) -> str:
    return f" x {ranks.world} processes" if ranks.distributed else ""


__all__ = ["Prepared", "build_embedder", "check_scale_options", "load_embedder", "prepare", "run_facts"]
