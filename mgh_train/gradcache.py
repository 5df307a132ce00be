"""GradCache (Gao et al., 2021): a contrastive batch larger than the encoder's memory, with the
loss and gradients of encoding it whole.

    loss = gradcache_step(embedder, batch, loss_on, scale=1 / grad_accum, backward=step.backward, last=True)

A micro-batch's chunks are its length buckets, cut to ``--chunk-size`` texts and ``--chunk-tokens``
padded tokens at most (:func:`mgh_train.batches.chunks`). The step

1. embeds every chunk without a graph, keeping the RNG state (CPU and the chunk's CUDA device) it
   started from;
2. computes the loss on the cached embeddings (the fused InfoNCE, which with ``gather`` scores
   them against every rank's) and back-propagates it to them: only the loss's memory, never the
   encoder's activations for the whole batch;
3. re-encodes each chunk with gradients, its RNG state replayed so every dropout mask is the first
   pass's (the two passes' embeddings are bit-equal on the same device and kernels), and
   back-propagates the chunk's rows of the cached gradient through it. ATA's column sums are
   re-computed in that forward with their graph, so the pooling weights take their gradient.

The features are the ones of the first pass, unchanged. Gradients accumulate over the chunks;
only the step's last backward (``last`` and the last chunk) is told to sync, so a step makes one
gradient sync however many chunks and micro-batches it has (:mod:`mgh_train.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .packing import texts_in


def rng_state(device: torch.device) -> tuple:
    """The RNG state a forward on ``device`` draws from: the CPU's, and the CUDA device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed(device: torch.device, state: tuple):
    """Run the block from RNG ``state`` (of :func:`rng_state`); the RNG continues afterwards as if
    the block had not run."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def gradcache_step(embedder, batch, loss_on: Callable, *, scale: float, backward: Callable, last: bool) -> torch.Tensor:
    """One micro-batch by GradCache: its gradients accumulate in the trainable weights.

    Args:
        embedder: the :class:`~mgh_train.model.Embedder` (or its FSDP2-sharded self).
        batch: a :class:`~mgh_train.batches.MicroBatch` on the device; its buckets are the chunks.
        loss_on: ``(embeddings [N, H] in the batch's order, batch) -> loss`` (a device scalar).
        scale: the loss's weight in the step (1 / micro-batches).
        backward: ``(output, grad=None, *, sync)`` back-propagation (``TrainStep.backward``: the
            gradient scaler and the engine's sync switch).
        last: whether this is the step's last micro-batch (its last chunk's backward syncs).

    Returns:
        the micro-batch's loss (detached, unscaled).
    """
    device = embedder.device
    padded = batch.padded or [None] * len(batch.buckets)  # known on the host: no mask reads
    states, cached = [], []
    with torch.no_grad(), embedder.autocast():
        for features, pads in zip(batch.buckets, padded):
            states.append(rng_state(device))
            cached.append(embedder(features, padded=pads))
    flat = torch.cat(cached)
    emb = flat[batch.inverse].detach().requires_grad_()
    loss = loss_on(emb, batch)
    backward(loss * scale, sync=False)  # the loss alone: no weight takes a gradient here
    grads = torch.empty_like(flat)
    grads[batch.inverse] = emb.grad
    sizes = [texts_in(features) for features in batch.buckets]  # a packed row holds several texts
    for i, (features, pads, state, grad) in enumerate(zip(batch.buckets, padded, states, grads.split(sizes))):
        with replayed(device, state), embedder.autocast():
            out = embedder(features, padded=pads)
        backward(out, grad, sync=last and i == len(sizes) - 1)
    return loss.detach()


__all__ = ["gradcache_step", "replayed", "rng_state"]
