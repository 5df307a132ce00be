"""Dev-set evaluators for :func:`mgh_train.fit` and the trainer: sentence-transformers' three most
used evaluators on an :class:`~mgh_train.model.Embedder`, and their own objects accepted as they are.

Each mgh evaluator is called as ``evaluator(embedder) -> dict`` of float metrics named as
sentence-transformers names them (``{name}_spearman_cosine``, ``{name}_cosine_ndcg@10``,
``{name}_cosine_accuracy``) and has ``primary_metric``, the key best-checkpoint selection uses.
The metrics equal sentence-transformers' evaluators' on the same vectors (tests/test_st_compat.py).
Queries may carry an ``instruction`` (mgh's query template); documents never do.

A sentence-transformers evaluator (any ``SentenceEvaluator``) runs unchanged on the embedder
wrapped as a ``SentenceTransformer`` (:func:`as_sentence_transformer`: mgh's own modules, the
same vectors as :meth:`Embedder.encode` without an instruction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _prefix(name: str) -> str:
    return f"{name}_" if name else ""


class EmbeddingSimilarityEvaluator:
    """Spearman and Pearson correlation of cosine similarity with gold ``scores`` (sentence-transformers'
    ``EmbeddingSimilarityEvaluator`` with its default cosine similarity); the correlations come from
    scipy, as there."""

    def __init__(
        self,
        sentences1: Sequence[str],
        sentences2: Sequence[str],
        scores: Sequence[float],
        *,
        name: str = "",
        instruction: str | None = None,
        batch_size: int = 32,
    ):
        if not (len(sentences1) == len(sentences2) == len(scores)) or not scores:
            raise ValueError(
                f"sentences1, sentences2, scores: expected equally many (at least one), got "
                f"{len(sentences1)}, {len(sentences2)}, {len(scores)}"
            )
        self.sentences1, self.sentences2, self.scores = list(sentences1), list(sentences2), list(scores)
        self.name, self.instruction, self.batch_size = name, instruction, batch_size
        self.primary_metric = _prefix(name) + "spearman_cosine"
        self.greater_is_better = True

    def __call__(self, embedder) -> dict:
        from scipy.stats import pearsonr, spearmanr

        a = embedder.encode(self.sentences1, instruction=self.instruction, batch_size=self.batch_size)
        b = embedder.encode(self.sentences2, instruction=self.instruction, batch_size=self.batch_size)
        cosine = torch.nn.functional.cosine_similarity(a.double(), b.double()).numpy()
        p = _prefix(self.name)
        return {
            p + "pearson_cosine": float(pearsonr(self.scores, cosine)[0]),
            p + "spearman_cosine": float(spearmanr(self.scores, cosine)[0]),
        }


class TripletEvaluator:
    """Share of (anchor, positive, negative) triplets whose anchor is closer (cosine) to the positive
    than to the negative (sentence-transformers' ``TripletEvaluator``, ``margin`` 0)."""

    def __init__(
        self,
        anchors: Sequence[str],
        positives: Sequence[str],
        negatives: Sequence[str],
        *,
        name: str = "",
        instruction: str | None = None,
        batch_size: int = 32,
    ):
        if not (len(anchors) == len(positives) == len(negatives)) or not anchors:
            raise ValueError(
                f"anchors, positives, negatives: expected equally many (at least one), got "
                f"{len(anchors)}, {len(positives)}, {len(negatives)}"
            )
        self.anchors, self.positives, self.negatives = list(anchors), list(positives), list(negatives)
        self.name, self.instruction, self.batch_size = name, instruction, batch_size
        self.primary_metric = _prefix(name) + "cosine_accuracy"
        self.greater_is_better = True

    def __call__(self, embedder) -> dict:
        a = embedder.encode(self.anchors, instruction=self.instruction, batch_size=self.batch_size).double()
        p = embedder.encode(self.positives, batch_size=self.batch_size).double()
        n = embedder.encode(self.negatives, batch_size=self.batch_size).double()
        cos = torch.nn.functional.cosine_similarity
        return {self.primary_metric: float((cos(a, p) > cos(a, n)).double().mean())}


class InformationRetrievalEvaluator:
    """Each query ranks the whole corpus by cosine; accuracy@k, MRR@10 and nDCG@10 (binary relevance),
    as sentence-transformers' ``InformationRetrievalEvaluator`` computes them.

    Args:
        queries: ``{query id: text}``; corpus: ``{doc id: text}``; relevant_docs: ``{query id: set
            of doc ids}`` (queries without a relevant document are left out, as there).
    """

    def __init__(
        self,
        queries: dict,
        corpus: dict,
        relevant_docs: dict,
        *,
        name: str = "",
        instruction: str | None = None,
        batch_size: int = 32,
        accuracy_at_k: Sequence[int] = (1, 3, 5, 10),
    ):
        self.query_ids = [q for q in queries if relevant_docs.get(q)]
        if not self.query_ids or not corpus:
            raise ValueError(
                "queries, corpus, relevant_docs: expected at least one query with a relevant document "
                "and a non-empty corpus"
            )
        self.queries, self.corpus, self.relevant = queries, corpus, {q: set(relevant_docs[q]) for q in self.query_ids}
        self.doc_ids = list(corpus)
        self.name, self.instruction, self.batch_size = name, instruction, batch_size
        self.accuracy_at_k = tuple(accuracy_at_k)
        self.primary_metric = _prefix(name) + "cosine_ndcg@10"
        self.greater_is_better = True

    def __call__(self, embedder) -> dict:
        import math

        q = embedder.encode(
            [self.queries[i] for i in self.query_ids], instruction=self.instruction, batch_size=self.batch_size
        ).double()
        d = embedder.encode([self.corpus[i] for i in self.doc_ids], batch_size=self.batch_size).double()
        scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
        depth = min(max(10, *self.accuracy_at_k), len(self.doc_ids))
        top = scores.topk(depth, dim=1).indices.tolist()
        hits = {k: 0.0 for k in self.accuracy_at_k}
        mrr = ndcg = 0.0
        for row, qid in zip(top, self.query_ids):
            relevant = [self.doc_ids[j] in self.relevant[qid] for j in row]
            for k in self.accuracy_at_k:
                hits[k] += any(relevant[:k])
            first = next((i for i, r in enumerate(relevant[:10]) if r), None)
            mrr += 0.0 if first is None else 1.0 / (first + 1)
            dcg = sum(1.0 / math.log2(i + 2) for i, r in enumerate(relevant[:10]) if r)
            ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(self.relevant[qid]), 10)))
            ndcg += dcg / ideal
        n, p = len(self.query_ids), _prefix(self.name)
        out = {f"{p}cosine_accuracy@{k}": hits[k] / n for k in self.accuracy_at_k}
        out.update({f"{p}cosine_mrr@10": mrr / n, f"{p}cosine_ndcg@10": ndcg / n})
        return out


def as_sentence_transformer(embedder):
    """``embedder`` as a ``SentenceTransformer`` over the same weights (mgh's modules + Normalize), for
    sentence-transformers' own evaluators."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    from .st_modules import MGHPooling, MGHTransformer

    modules = [MGHTransformer("", embedder=embedder), MGHPooling(embedder.config.pooling, embedder.config.ata_mix)]
    if embedder.config.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device=str(embedder.device))


def is_sentence_transformers_evaluator(evaluator) -> bool:
    try:
        from sentence_transformers.base.evaluation import SentenceEvaluator
    except ImportError:
        try:
            from sentence_transformers.evaluation import SentenceEvaluator  # before 6
        except ImportError:
            return False
    return isinstance(evaluator, SentenceEvaluator)


def run_evaluator(evaluator, embedder) -> tuple[dict, str]:
    """(metrics, primary metric key) of ``evaluator`` (ours, sentence-transformers', a list of
    either, or any callable ``embedder -> dict``) on ``embedder``, in eval mode."""
    evaluators = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    metrics, primary = {}, None
    was_training = embedder.training
    embedder.eval()
    try:
        with torch.no_grad():
            for one in evaluators:
                if is_sentence_transformers_evaluator(one):
                    found = one(as_sentence_transformer(embedder))
                    key = getattr(one, "primary_metric", None)
                    if key not in found:  # before the call it may lack the evaluator's name prefix
                        key = f"{getattr(one, 'name', '')}_{key}"
                    key = key if key in found else next(iter(found))
                else:
                    found = one(embedder)
                    key = getattr(one, "primary_metric", None) or next(iter(found))
                metrics.update({k: float(v) for k, v in found.items()})
                primary = primary or key
    finally:
        embedder.train(was_training)
    return metrics, primary


def check_best_model_options(cfg, evaluator) -> None:
    """``load_best_model_at_end``, ``metric_for_best_model`` and ``greater_is_better`` need an
    evaluator (``mgh_train.fit(..., evaluator=...)``): a ValueError naming the option, before training."""
    given = {
        "load_best_model_at_end": bool(cfg.load_best_model_at_end),
        "metric_for_best_model": cfg.metric_for_best_model is not None,
        "greater_is_better": cfg.greater_is_better is not None,
    }
    for name, set_ in given.items():
        if evaluator is None and set_:
            raise ValueError(
                f"{name}: needs an evaluator to compare evaluations (mgh_train.fit(..., evaluator=...)); "
                "the command line's --eval-data-dir only reports STS-B dev"
            )


def first_evaluator(evaluator):
    return evaluator[0] if isinstance(evaluator, (list, tuple)) and evaluator else evaluator


class BestKeeper:
    """Runs the evaluator during training and keeps the trainable weights of the best evaluation
    (in memory: LoRA weights are small), so the run can end with them (``load_best_model_at_end``
    of transformers' trainer, without a checkpoint per evaluation).

    ``metric`` is transformers' ``metric_for_best_model`` (a key of the evaluator's metrics, with or
    without ``eval_``; default: the first evaluator's ``primary_metric``, as sentence-transformers'
    trainer takes it). ``greater_is_better`` as there: given, else the evaluator's own attribute
    when its primary metric is compared (sentence-transformers' evaluators carry one), else True
    unless the metric's name ends in ``loss``.
    """

    def __init__(
        self,
        evaluator,
        embedder,
        log: Callable[[str], None] = print,
        *,
        metric: str | None = None,
        greater_is_better: bool | None = None,
    ):
        self.evaluator, self.embedder, self.log = evaluator, embedder, log
        self.metric = metric[len("eval_") :] if metric and metric.startswith("eval_") else metric
        self.greater = greater_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_state: dict | None = None
        self.primary: str | None = None
        self.history: list = []

    def _compared(self, metrics: dict, primary: str) -> str:
        key = self.metric or primary
        if key not in metrics:
            raise ValueError(
                f"metric_for_best_model: {self.metric!r} is not one of the evaluator's metrics "
                f"({', '.join(sorted(metrics))})"
            )
        if self.greater is None:
            own = getattr(first_evaluator(self.evaluator), "greater_is_better", None)
            self.greater = bool(own) if own is not None and key == primary else not key.endswith("loss")
        return key

    def __call__(self, step: int) -> dict:
        metrics, primary = run_evaluator(self.evaluator, self.embedder)
        self.primary = self._compared(metrics, primary)
        value = metrics[self.primary]
        self.history.append({"step": step, **metrics})
        if self.best is None or (value > self.best if self.greater else value < self.best):
            self.best, self.best_step = value, step
            self.best_state = {
                n: p.detach().to("cpu", copy=True) for n, p in self.embedder.named_parameters() if p.requires_grad
            }
        return {f"eval_{k}": v for k, v in metrics.items()}

    def restore_best(self) -> None:
        """Put the best evaluation's trainable weights back into the embedder."""
        if self.best_state is None:
            return
        params = dict(self.embedder.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)
        self.log(
            f"best evaluation: {self.primary} {self.best:.4f} at step {self.best_step} "
            f"({'higher' if self.greater else 'lower'} is better); the saved model has those weights"
        )


__all__ = [
    "BestKeeper",
    "check_best_model_options",
    "EmbeddingSimilarityEvaluator",
    "InformationRetrievalEvaluator",
    "TripletEvaluator",
    "as_sentence_transformer",
    "run_evaluator",
]
