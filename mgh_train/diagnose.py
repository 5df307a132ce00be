"""Where a non-finite value came from, once training has met one.

The kernels (``ata_attention``, ``ata_pool``, ``infonce_loss``) do not check their inputs' values:
a check is a host-device synchronisation per call. NaN or infinity in gives NaN out, and the
trainer finds it at the loss. Only then, off the hot path, :func:`first_non_finite` re-runs the
failing micro-batch with a forward hook on every module and names the first trainable parameter,
or else the first module output, that is not finite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN or infinity, or None."""
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            return name
    return None


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    if hasattr(value, "to_tuple"):  # transformers' ModelOutput
        return _first_tensor(value.to_tuple())
    return None


def non_finite_module(model: torch.nn.Module, run) -> str | None:
    """The name of the first module whose output is not finite while ``run()`` runs ``model``."""
    found: list[str] = []
    handles = []

    def hook(name):
        def check(module, args, output):
            tensor = _first_tensor(output)
            if not found and tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                found.append(name)

        return check

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def first_non_finite(
    embedder,
    texts: Sequence[str],
    instructions: Sequence[str] | None = None,
    *,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> str:
    """A phrase naming where the first non-finite value of ``embedder`` on ``texts`` appears;
    ``context()`` wraps the forward pass (the training step's autocast)."""
    parameter = non_finite_parameter(embedder)
    if parameter is not None:
        return f"the trainable parameter {parameter} is not finite"
    features = _features(embedder, texts, instructions)

    def forward():
        with context():
            embedder.token_states(features)  # the model alone: pooling would refuse what it finds

    module = non_finite_module(embedder.model, forward)
    if module is not None:
        return f"the output of {module} is the first that is not finite"
    return "every parameter and layer output is finite, so the loss itself overflowed (raise --tau?)"


@torch.no_grad()
def non_finite_colsum(
    embedder,
    texts: Sequence[str],
    instructions: Sequence[str] | None = None,
    *,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> str | None:
    """Under ATA, what is wrong when the fused layer's column sums of ``texts`` are not finite (the
    pooling weights, and so every embedding, are then NaN); None otherwise, or without ATA.
    ``context()`` wraps the forward pass."""
    if embedder.capture is None:
        return None
    features = _features(embedder, texts, instructions)
    with context():
        _, colsum = embedder.token_states(features)
    if colsum is None or bool(torch.isfinite(colsum[features["attention_mask"].bool()]).all()):
        return None
    return "colsum: the ATA layer's column sums are not finite"


def _features(embedder, texts: Sequence[str], instructions: Sequence[str] | None) -> dict:
    """``texts`` tokenized as queries of ``instructions``, on the embedder's device."""
    features = embedder.tokenize(list(texts), instruction=list(instructions) if instructions else None)
    return {k: v.to(embedder.device) for k, v in features.items()}


__all__ = ["first_non_finite", "non_finite_colsum", "non_finite_module", "non_finite_parameter"]
