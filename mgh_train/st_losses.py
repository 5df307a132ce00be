"""sentence-transformers losses that compute with the fused InfoNCE kernel (``mgh_kernels.infonce_loss``).

Drop-in replacements for ``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss``
inside sentence-transformers' own ``SentenceTransformerTrainer``: same constructor arguments,
same (anchor, positive, negative_1..n) columns, the same loss and gradients, without ever
materialising the ``B x B(1+n)`` similarity matrix. Importing this module needs
sentence-transformers 6 (``pip install mgh[eval]``).

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from mgh_train.st_losses import FusedMultipleNegativesRankingLoss

    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)
    SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss).train()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.util import cos_sim, dot_score, pytorch_cos_sim, similarity_fct_name
from torch import Tensor, nn

from mgh_kernels import infonce_loss

logger = logging.getLogger(__name__)

_COSINE = (cos_sim, pytorch_cos_sim, "cosine", "cos_sim")
_DOT = (dot_score, "dot", "dot_score", "dot_product")

_CITATION = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""

_GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def similarity_normalizes(similarity_fct) -> bool:
    """True for cosine similarity, False for the dot product; ValueError for anything else."""
    if any(similarity_fct is f or (isinstance(f, str) and similarity_fct == f) for f in _COSINE):
        return True
    if any(similarity_fct is f or (isinstance(f, str) and similarity_fct == f) for f in _DOT):
        return False
    name = getattr(similarity_fct, "__name__", repr(similarity_fct))
    raise ValueError(
        f"similarity_fct: the fused loss computes cosine or dot-product similarities only; expected "
        f"sentence_transformers.util.cos_sim or dot_score, got {name}"
    )


def check_mnrl_extras(directions, partition_mode, hardness_mode, hardness_strength) -> None:
    """Refuse sentence-transformers 6.3 MNRL options the fused kernel does not compute (it scores
    queries against documents in one joint softmax, without hardness weights): a ValueError naming
    the argument, instead of a TypeError or a silently different loss. Their defaults are accepted."""
    if tuple(directions) != ("query_to_doc",):
        raise ValueError(
            f"directions: the fused loss computes ('query_to_doc',) only, got {tuple(directions)!r}; "
            "use sentence-transformers' MultipleNegativesRankingLoss for symmetric directions"
        )
    if partition_mode != "joint":
        raise ValueError(f"partition_mode: the fused loss computes 'joint' only, got {partition_mode!r}")
    if hardness_mode is not None or hardness_strength != 0.0:
        raise ValueError(
            f"hardness_mode, hardness_strength: the fused loss has no hardness weighting (got "
            f"{hardness_mode!r}, {hardness_strength!r}); leave them unset or use "
            "MultipleNegativesRankingLoss"
        )


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale: expected a positive number (1 / temperature), got {scale!r}")
    return float(scale)


def _check_positive_int(name: str, value, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer{also}, got {value!r}")


def _gathering(requested: bool) -> bool:
    """Whether to gather across ranks: as asked, when a process group is initialised."""
    if not requested:
        return False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    logger.warning(
        "gather_across_devices=True without an initialised torch.distributed group: using this "
        "process's batch only (expected with one device)"
    )
    return False


def _columns_loss(anchors: Tensor, candidates: list[Tensor], *, scale: float, normalize: bool, gather: bool) -> Tensor:
    """MNRL's loss from the anchor column [B, D] and the candidate columns ([B, D] each)."""
    if not candidates:
        raise ValueError("sentence_features: expected at least 2 columns (anchor, positive, negative_1..n)")
    negatives = torch.stack(candidates[1:], dim=1) if len(candidates) > 1 else None
    return infonce_loss(
        anchors, candidates[0], negatives, tau=1.0 / scale, negatives="global", normalize=normalize, gather=gather
    )


class FusedMultipleNegativesRankingLoss(nn.Module):
    """:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`
    computed by mgh's fused InfoNCE kernel, which never materialises the similarity matrix.

    For each anchor in the batch, the loss is the cross-entropy of its positive against every
    candidate of the batch: all positives and all negatives (every column after the first two),
    with similarities multiplied by ``scale``. This is the InfoNCE loss with in-batch and hard
    negatives, ``mgh_kernels.infonce_loss(anchor, positive, negatives, tau=1/scale)``. The
    loss and its gradients equal ``MultipleNegativesRankingLoss``'s with the default
    ``directions=("query_to_doc",)`` and ``partition_mode="joint"`` up to float rounding; the
    memory it needs beyond the embeddings is O(batch x candidates) statistics, not the
    ``B x B(1+n)`` logits. On CUDA it runs the Triton kernels, on the CPU a chunked PyTorch path.

    Args:
        model: SentenceTransformer model.
        scale: the similarities are multiplied by it (``scale = 1 / temperature``; 20 is
            temperature 0.05).
        similarity_fct: ``sentence_transformers.util.cos_sim`` (default) or ``dot_score``
            (raw dot products, no normalisation; then a scale near 1 is usual). Any other
            function is refused with a ValueError: the kernel computes only these two.
        gather_across_devices: gather the positives and negatives of every rank, with
            gradients, so that each anchor is scored against the global batch (each rank's loss
            is over its own anchors). Needs an initialised ``torch.distributed`` group; without
            one the local batch is used, as in sentence-transformers.

    Requirements:
        1. (anchor, positive) pairs, (anchor, positive, negative) triplets, or (anchor, positive,
           negative_1, ..., negative_n) n-tuples

    Inputs:
        +-------------------------------------------------+--------+
        | Inputs                                          | Labels |
        +=================================================+========+
        | (anchor, positive) pairs                        | none   |
        +-------------------------------------------------+--------+
        | (anchor, positive, negative) triplets           | none   |
        +-------------------------------------------------+--------+
        | (anchor, positive, negative_1, ..., negative_n) | none   |
        +-------------------------------------------------+--------+

    Recommendations:
        - Use ``BatchSamplers.NO_DUPLICATES`` so that no in-batch negative duplicates an anchor's
          own positive.

    Relations:
        - Equals ``MultipleNegativesRankingLoss(model, scale, similarity_fct,
          gather_across_devices)``. That class's ``directions``, ``partition_mode``,
          ``hardness_mode`` and ``hardness_strength`` are accepted at their defaults only;
          other values are a ValueError naming the argument (the kernel does not compute them).
        - :class:`FusedCachedMultipleNegativesRankingLoss` is this loss with GradCache.

    Example:
        ::

            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
            from mgh_train.st_losses import FusedMultipleNegativesRankingLoss

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            train_dataset = Dataset.from_dict({
                "anchor": ["It's nice weather outside today.", "He drove to work."],
                "positive": ["It's so sunny.", "He took the car to the office."],
            })
            loss = FusedMultipleNegativesRankingLoss(model)
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
            trainer.train()
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        super().__init__()
        check_mnrl_extras(directions, partition_mode, hardness_mode, hardness_strength)
        self.model = model
        self.scale = _check_scale(scale)
        self._normalize = similarity_normalizes(similarity_fct)
        self.similarity_fct = similarity_fct
        if not isinstance(gather_across_devices, bool):
            raise ValueError(f"gather_across_devices: expected True or False, got {gather_across_devices!r}")
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = _embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss from one [B, D] embedding per column (anchor, positive, negative_1..n)."""
        if len(embeddings) < 2:
            raise ValueError(f"sentence_features: expected at least 2 columns, got {len(embeddings)}")
        return _columns_loss(
            embeddings[0],
            list(embeddings[1:]),
            scale=self.scale,
            normalize=self._normalize,
            gather=_gathering(self.gather_across_devices),
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION


class FusedCachedMultipleNegativesRankingLoss(CachedLossMixin, nn.Module):
    """:class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss`
    (GradCache) with the loss stage computed by mgh's fused InfoNCE kernel.

    GradCache embeds the batch in mini-batches of ``mini_batch_size`` without a graph, computes
    the loss and its gradients with respect to the cached embeddings, then re-embeds each
    mini-batch with gradients (its RNG state replayed) and back-propagates those cached
    gradients. The embedding stages are sentence-transformers' own (``CachedLossMixin``); the
    loss stage is :class:`FusedMultipleNegativesRankingLoss`'s over the whole batch at once:
    the fused kernel never stores the logits, so it needs no chunking of the similarity matrix.
    Loss and gradients equal ``CachedMultipleNegativesRankingLoss``'s up to float rounding.

    Args:
        model: SentenceTransformer model.
        scale: the similarities are multiplied by it (``scale = 1 / temperature``).
        similarity_fct: ``cos_sim`` (default) or ``dot_score``; anything else is a ValueError.
        mini_batch_size: texts embedded at once; it bounds the activation memory.
        mini_batch_num_tokens: if set, mini-batches are packed by non-padding token count.
        gather_across_devices: as in :class:`FusedMultipleNegativesRankingLoss`.
        show_progress_bar: show the mini-batches' progress.

    Requirements and inputs: as :class:`FusedMultipleNegativesRankingLoss`; GradCache pays off with a
    large ``per_device_train_batch_size`` and a small ``mini_batch_size``.

    Relations:
        - Equals ``CachedMultipleNegativesRankingLoss(model, scale, similarity_fct,
          mini_batch_size, mini_batch_num_tokens, gather_across_devices)``, and
          :class:`FusedMultipleNegativesRankingLoss` computed in mini-batches.

    Example: :class:`FusedMultipleNegativesRankingLoss`'s, with
    ``loss = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=32)``.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__()
        from sentence_transformers.base.losses.gradcache import has_static_embedding_input

        if has_static_embedding_input(model):
            raise ValueError(
                "model: a StaticEmbedding model's inputs cannot be split into mini-batches; "
                "use FusedMultipleNegativesRankingLoss"
            )
        _check_positive_int("mini_batch_size", mini_batch_size)
        if mini_batch_num_tokens is not None:
            _check_positive_int("mini_batch_num_tokens", mini_batch_num_tokens, " or None")
        self.model = model
        self.loss = FusedMultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices
        )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    @property
    def scale(self) -> float:
        return self.loss.scale

    @property
    def similarity_fct(self):
        return self.loss.similarity_fct

    @property
    def gather_across_devices(self) -> bool:
        return self.loss.gather_across_devices

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings (GradCache's step 2)."""
        loss = self.loss.compute_loss_from_embeddings([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"sentence_features: expected at least 2 columns, got {len(sentence_features)}")
        return self.forward_cached(sentence_features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **self.loss.get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _GRADCACHE_CITATION


def _embed_columns(model, sentence_features) -> list[Tensor]:
    """One ``sentence_embedding`` per column, batched as sentence-transformers' MNRL batches them."""
    from sentence_transformers.base.losses.merged_forward import embed_columns

    return embed_columns(model, sentence_features)


__all__ = ["FusedCachedMultipleNegativesRankingLoss", "FusedMultipleNegativesRankingLoss", "similarity_normalizes"]
