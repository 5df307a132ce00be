"""One optimizer step: encode the micro-batches, the InfoNCE loss, backward, clip, update, all
without reading a device value on the host.

    step = TrainStep(embedder, optimizer, cfg, precision)
    outcome = step([batch.to(device) for batch in micro_batches])   # device tensors, no sync
    loss, finite = outcome.loss.item(), outcome.finite.item()          # at a logging step

A non-finite loss does not reach the weights: the update is skipped on the device (AdamW's fused
kernel takes a ``found_inf`` flag, as it does from ``torch.amp.GradScaler``), and the trainer reads
the flag at its next logging step and stops there. Where the optimizer cannot skip on the device
(it is not fused), each step checks the loss on the host instead: one sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from mgh_kernels import trusted_inputs

from .batches import MicroBatch
from .precision import Precision


def embed(embedder, batch: MicroBatch) -> torch.Tensor:
    """[N, H] float32 embeddings of a micro-batch's texts, in its order (queries, positives,
    negatives): one encoder forward per length bucket, under the embedder's autocast."""
    padded = batch.padded or [None] * len(batch.buckets)
    with embedder.autocast():
        outputs = [embedder(features, padded=p) for features, p in zip(batch.buckets, padded)]
    return torch.cat(outputs)[batch.inverse]


def micro_batch_loss(embedder, batch: MicroBatch, loss_fn: Callable, *, tau: float, negatives: str) -> torch.Tensor:
    """The InfoNCE loss (a float32 device scalar) of one micro-batch: B queries against the
    positives and ``k`` hard negatives per query."""
    emb = embed(embedder, batch)
    b, k = batch.queries, batch.k
    neg = emb[2 * b:].view(b, k, -1) if k else None
    return loss_fn(emb[:b], emb[b:2 * b], neg, tau=tau, negatives=negatives)


def make_optimizer(params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every parameter, and the device-side skip above) where the
    parameters' device supports it."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def compiled_loss(embedder, cfg) -> Callable:
    """``--compile``: the encoder compiled in place (its parameters keep their names, so checkpoints
    match the eager run's) with the fused ATA layer inside its graph, and the loss compiled around
    the fused InfoNCE op; dynamic shapes (bucket lengths are rounded to 64). Returns the
    ``loss_wrapper`` of :class:`TrainStep`."""
    options = {"dynamic": True, "mode": cfg.compile_mode}
    embedder.model.compile(**options)
    losses: dict = {}

    def loss_of(embedder, batch, loss_fn, *, tau, negatives):
        if loss_fn not in losses:
            losses[loss_fn] = torch.compile(loss_fn, **options)
        return micro_batch_loss(embedder, batch, losses[loss_fn], tau=tau, negatives=negatives)

    return loss_of


@dataclass
class StepOutcome:
    """What a step leaves on the device: the mean micro-batch loss and whether it was finite (the
    update was skipped when not)."""

    loss: torch.Tensor
    finite: torch.Tensor
    examples: int
    tokens: int


class TrainStep:
    """A callable that runs one optimizer step over ``grad_accum`` micro-batches.

    Args:
        embedder: the :class:`~mgh_train.model.Embedder` (its trainable parameters are updated).
        optimizer: from :func:`make_optimizer`.
        loss_fn: ``mgh_kernels.infonce_loss`` or ``reference.infonce``.
        tau, negatives: the loss's temperature and candidates.
        max_grad_norm: gradient clipping (0: none).
        precision: the run's :class:`~mgh_train.precision.Precision` (float16's gradient scaler).
        loss_wrapper: replaces ``micro_batch_loss`` (``torch.compile`` of it, for ``--compile``).
    """

    def __init__(self, embedder, optimizer: torch.optim.Optimizer, loss_fn: Callable, *, tau: float, negatives: str,
                 max_grad_norm: float, precision: Precision, scaler: Optional["torch.amp.GradScaler"] = None,
                 loss_wrapper: Optional[Callable] = None):
        self.embedder, self.optimizer, self.loss_fn = embedder, optimizer, loss_fn
        self.tau, self.negatives, self.max_grad_norm = tau, negatives, max_grad_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = scaler
        self.skips_on_device = bool(optimizer.defaults.get("fused"))
        self.loss_of = loss_wrapper or micro_batch_loss

    def __call__(self, batches: Sequence[MicroBatch]) -> StepOutcome:
        with trusted_inputs():  # the collate built the masks on the host: no value checks that sync
            return self._step(batches)

    def _step(self, batches: Sequence[MicroBatch]) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for batch in batches:
            loss = self.loss_of(self.embedder, batch, self.loss_fn, tau=self.tau, negatives=self.negatives)
            scaled = loss / len(batches) if len(batches) > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total = scaled.detach() if total is None else total + scaled.detach()
        finite = torch.isfinite(total)
        if not self.skips_on_device and not bool(finite):  # no device-side skip: check here (a sync)
            return StepOutcome(total, finite, sum(b.queries for b in batches), sum(b.tokens for b in batches))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # the scaler's own found_inf skips overflowed (and NaN) steps
            self.scaler.update()
        else:
            if self.skips_on_device:
                self.optimizer.found_inf = (~finite).float()  # fused AdamW skips the update where 1
            self.optimizer.step()
        return StepOutcome(total, finite, sum(b.queries for b in batches), sum(b.tokens for b in batches))


__all__ = ["StepOutcome", "TrainStep", "compiled_loss", "embed", "make_optimizer", "micro_batch_loss"]
