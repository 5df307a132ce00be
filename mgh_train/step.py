"""One optimizer step: encode the micro-batches, the InfoNCE loss, backward, clip, update, all
without reading a device value on the host.

    optimizer = make_optimizer([p for p in embedder.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    step = TrainStep(embedder, optimizer, infonce_loss, tau=0.05, negatives="global", max_grad_norm=1.0,
                     precision=precision)
    outcome = step([batch.to(device) for batch in micro_batches])   # device tensors, no sync
    loss, finite = outcome.loss.item(), outcome.finite.item()          # at a logging step

A non-finite loss does not reach the weights: the update is skipped on the device (AdamW's fused
kernel takes a ``found_inf`` flag, as it does from ``torch.amp.GradScaler``), and the trainer reads
the flag at its next logging step and stops there. Where the optimizer cannot skip on the device
(it is not fused), each step checks the loss on the host instead: one sync per step.

With several processes the step's engine (:mod:`mgh_train.distributed`) syncs the gradients once,
after the step's last backward, and averages the loss and combines the finite flag over the ranks
on the device before the update: a non-finite loss on any rank skips the update on every rank.
Under GradCache (``gradcache=True``) each micro-batch runs :func:`mgh_train.gradcache.gradcache_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mgh_kernels import trusted_inputs

from .batches import MicroBatch
from .distributed import Ranks, Single
from .gradcache import gradcache_step
from .precision import Precision


def embed(embedder, batch: MicroBatch) -> torch.Tensor:
    """[N, H] float32 embeddings of a micro-batch's texts, in its order (queries, positives,
    negatives): one encoder forward per length bucket, under the embedder's autocast."""
    padded = batch.padded or [None] * len(batch.buckets)
    with embedder.autocast():
        outputs = [embedder(features, padded=p) for features, p in zip(batch.buckets, padded)]
    return torch.cat(outputs)[batch.inverse]


def embedding_loss(
    emb: torch.Tensor, batch: MicroBatch, loss_fn: Callable, *, tau: float, negatives: str
) -> torch.Tensor:
    """The InfoNCE loss (a float32 device scalar) of a micro-batch's embeddings ``emb`` (as
    :func:`embed` orders them): B queries against the positives and ``k`` hard negatives per query."""
    b, k = batch.queries, batch.k
    neg = emb[2 * b :].view(b, k, -1) if k else None
    return loss_fn(emb[:b], emb[b : 2 * b], neg, tau=tau, negatives=negatives)


def micro_batch_loss(embedder, batch: MicroBatch, loss_fn: Callable, *, tau: float, negatives: str) -> torch.Tensor:
    """The InfoNCE loss (a float32 device scalar) of one micro-batch: B queries against the
    positives and ``k`` hard negatives per query."""
    return embedding_loss(embed(embedder, batch), batch, loss_fn, tau=tau, negatives=negatives)


def make_optimizer(params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every parameter, and the device-side skip above) where the
    parameters' device supports it."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def compile_for_training(embedder, loss_fn: Callable, mode: str | None = None) -> Callable:
    """``--compile``: the encoder compiled in place (its parameters keep their names, so checkpoints
    match the eager run's) with the fused ATA layer inside its graph; returns ``loss_fn`` compiled
    around the fused InfoNCE op. Dynamic shapes (bucket lengths are rounded to 64); ``mode``:
    torch.compile's (``--compile-mode``)."""
    options = {"dynamic": True, "mode": mode}
    embedder.model.compile(**options)
    return torch.compile(loss_fn, **options)


@dataclass
class StepOutcome:
    """What a step leaves on the device: the mean micro-batch loss (averaged over the ranks) and
    whether it was finite on every rank (the update was skipped when not); the examples of the
    whole job and its real tokens (a host int in one process, a device scalar with several)."""

    loss: torch.Tensor
    finite: torch.Tensor
    examples: int
    tokens: object


class TrainStep:
    """A callable that runs one optimizer step over ``grad_accum`` micro-batches.

    Args:
        embedder: the :class:`~mgh_train.model.Embedder` (its trainable parameters are updated).
        optimizer: from :func:`make_optimizer`.
        loss_fn: the InfoNCE loss of embeddings, ``(q, pos, neg, *, tau, negatives) -> scalar``:
            ``mgh_kernels.infonce_loss`` or an eager peer (``--loss eager``).
        tau, negatives: the loss's temperature and candidates.
        max_grad_norm: gradient clipping (0: none).
        precision: the run's :class:`~mgh_train.precision.Precision` (float16's gradient scaler).
        scaler: float16's gradient scaler (``precision.grad_scaler()``), or None.
        compile, compile_mode: ``--compile`` (:func:`compile_for_training`): the encoder and, on the
            plain path, ``loss_fn`` compiled (GradCache's loss on cached embeddings stays eager).
        engine: the :mod:`mgh_train.distributed` engine (default: one process).
        gradcache: run each micro-batch as GradCache (its buckets are the chunks).
    """

    def __init__(
        self,
        embedder,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        *,
        tau: float,
        negatives: str,
        max_grad_norm: float,
        precision: Precision,
        scaler: torch.amp.GradScaler | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        engine: Single | None = None,
        gradcache: bool = False,
    ):
        self.embedder, self.optimizer, self.loss_fn = embedder, optimizer, loss_fn
        self.tau, self.negatives, self.max_grad_norm = tau, negatives, max_grad_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = scaler
        self.skips_on_device = bool(optimizer.defaults.get("fused"))
        self.batch_loss_fn = compile_for_training(embedder, loss_fn, compile_mode) if compile else loss_fn
        self.engine = engine if engine is not None else Single(Ranks())
        self.gradcache = gradcache

    def backward(self, output: torch.Tensor, grad: torch.Tensor | None = None, *, sync: bool) -> None:
        """Back-propagate ``output`` (a loss, scaled by float16's gradient scaler; or embeddings with
        their cached ``grad``); ``sync``: the step's last backward, which syncs the gradients."""
        if grad is None and self.scaler is not None:
            output = self.scaler.scale(output)
        with self.engine.gradient_sync(sync):
            torch.autograd.backward(output, grad)

    def micro_batch_loss(self, batch: MicroBatch) -> torch.Tensor:
        """The loss of one micro-batch: its texts encoded, then InfoNCE (the plain path)."""
        return micro_batch_loss(self.embedder, batch, self.batch_loss_fn, tau=self.tau, negatives=self.negatives)

    def embedding_loss(self, emb: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        """The loss of a micro-batch's embeddings (GradCache's cached ones)."""
        return embedding_loss(emb, batch, self.loss_fn, tau=self.tau, negatives=self.negatives)

    def __call__(self, batches: Sequence[MicroBatch]) -> StepOutcome:
        with trusted_inputs():  # the collate built the masks on the host: no value checks that sync
            return self._step(batches)

    def _step(self, batches: Sequence[MicroBatch]) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if self.gradcache:
                loss = gradcache_step(
                    self.embedder, batch, self.embedding_loss, scale=1 / len(batches), backward=self.backward, last=last
                )
                scaled = loss / len(batches)
            else:
                loss = self.micro_batch_loss(batch)
                scaled = loss / len(batches) if len(batches) > 1 else loss
                self.backward(scaled, sync=last)
            total = scaled.detach() if total is None else total + scaled.detach()
        self.engine.finish_gradients()
        examples = sum(b.queries for b in batches) * self.engine.ranks.world
        total, finite, tokens = self.engine.reduce(total, torch.isfinite(total), sum(b.tokens for b in batches))
        if not self.skips_on_device and not bool(finite):  # no device-side skip: check here (a sync)
            return StepOutcome(total, finite, examples, tokens)
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
        return StepOutcome(total, finite, examples, tokens)


__all__ = [
    "StepOutcome",
    "TrainStep",
    "compile_for_training",
    "embed",
    "embedding_loss",
    "make_optimizer",
    "micro_batch_loss",
]
