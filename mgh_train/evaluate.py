"""MTEB evaluation of our model folders and of any sentence-transformers model, offline on local data.

    python -m mgh_train eval --model runs/demo/model --tasks STSBenchmark,SciFact --data-dir ../shared/data
    python -m mgh_train compare results/A results/B --plot scores.png

:class:`MTEBEncoder` follows mteb 2's encoder protocol (``encode(inputs, *, task_metadata,
hf_split, hf_subset, prompt_type)``, ``similarity``, ``similarity_pairwise``, ``mteb_model_meta``).
Queries of a task get its instruction (``--instructions`` JSON map task -> instruction; for our
models a default otherwise, as E5 / LLM2Vec do; sentence-transformers models get none unless
mapped); documents get none; both sides of a symmetric (STS) task get it.

With ``--data-dir`` the tasks read local files instead of the Hugging Face hub: an STS task reads
``DIR/<folder>/*test*.csv|tsv`` (``sentence1,sentence2,score``, no header), a retrieval task a
BEIR folder ``DIR/<folder>/{corpus.jsonl, queries.jsonl, qrels/test.tsv}``; ``<folder>`` is
``stsb`` for STSBenchmark and the lower-cased task name otherwise. Results are written in mteb's
result layout under ``--output`` (``results/<model>/<revision>/<Task>.json``).

The trainer's own measurements live here too, beside the full evaluation they preview:
:func:`retrieval_accuracy` of the held-out examples before and after training, and
:func:`sts_dev_spearman` on the same local STS-B folder (``--eval-data-dir``) at evaluation steps.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .batches import instruction_of
from .data import read_sts_pairs
from .finite_scores import check_scores
from .model import CONFIG_NAME, DEFAULT_INSTRUCTION, STS_INSTRUCTION, Embedder
from .precision import resolve

LOCAL_FOLDERS = {"STSBenchmark": "stsb"}


# --------------------------------------------------------------------------------------------
# during training: held-out retrieval and STS-B dev, in-process (no mteb)
# --------------------------------------------------------------------------------------------


def retrieval_accuracy(embedder: Embedder, examples: list, batch_size: int = 32) -> dict:
    """Each held-out query (:class:`~mgh_train.data.Example`) against a pool of every held-out
    positive and negative.

    Returns ``accuracy`` (share whose own positive ranks first) and ``mrr``, plus ``n``.
    """
    if not examples:
        return {"accuracy": float("nan"), "mrr": float("nan"), "n": 0}
    pool = sorted({t for e in examples for t in [e.positive, *(n.text for n in e.negatives)]})
    where = {t: i for i, t in enumerate(pool)}
    docs = embedder.encode(pool, batch_size=batch_size)
    queries = embedder.encode(
        [e.query for e in examples], instruction=[instruction_of(e) for e in examples], batch_size=batch_size
    )
    scores = queries @ docs.T
    target = torch.tensor([where[e.positive] for e in examples])
    own = scores[torch.arange(len(examples)), target]
    rank = (scores > own[:, None]).sum(dim=1) + 1
    return {"accuracy": float((rank == 1).float().mean()), "mrr": float((1.0 / rank).mean()), "n": len(examples)}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties): scipy.stats.spearmanr's."""
    from scipy.stats import spearmanr

    return float(spearmanr(x.double().cpu().numpy(), y.double().cpu().numpy()).statistic)


def sts_dev_spearman(embedder: Embedder, data_dir, limit: int = 0, batch_size: int = 32) -> float:
    """Spearman x 100 of cosine similarity against STS-B dev gold scores (both sides instructed);
    ``data_dir`` is laid out as for :func:`get_tasks` (``stsb/stsb-en-dev.csv``)."""
    path = Path(data_dir) / LOCAL_FOLDERS["STSBenchmark"] / "stsb-en-dev.csv"
    if not path.is_file():
        raise ValueError(f"eval_data_dir: expected {path} (STS-B dev, sentence1,sentence2,score)")
    first, second, gold = read_sts_pairs(path, limit)
    a = embedder.encode(first, instruction=STS_INSTRUCTION, batch_size=batch_size)
    b = embedder.encode(second, instruction=STS_INSTRUCTION, batch_size=batch_size)
    cosine = torch.nn.functional.cosine_similarity(a, b)
    return 100.0 * spearman(cosine, torch.tensor(gold))


# --------------------------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------------------------


class MTEBEncoder:
    """An mteb encoder over an mgh model folder or a sentence-transformers model (name or path)."""

    def __init__(
        self,
        model: str,
        *,
        instructions: dict | None = None,
        batch_size: int = 32,
        device: str | None = None,
        name: str | None = None,
        show_progress: bool = True,
    ):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        self.instructions = dict(instructions or {})
        self.batch_size, self.show_progress = batch_size, show_progress
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(model)
        if (path / CONFIG_NAME).is_file():
            self.embedder, self.st = Embedder.load(path, device=device), None
            kind = "mgh"
        elif path.exists() and not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(
                f"model: {path} is neither an mgh model folder ({CONFIG_NAME}) nor a sentence-transformers "
                "model (modules.json or config.json)"
            )
        else:
            if path.exists():
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            try:
                self.embedder, self.st = None, SentenceTransformer(str(model), device=device)
            except OSError as error:  # a name the hub does not know, or no network: one line, not a traceback
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                raise ValueError(f"model: cannot load {model} as a sentence-transformers model ({reason})") from None
            kind = "st"
        self.kind = kind
        resolved = path.resolve()
        generic = resolved.name in ("model", "merged", "final")  # e.g. runs/demo/model -> demo-model
        label = name or (
            (f"{resolved.parent.name}-{resolved.name}" if generic else resolved.name) if path.exists() else str(model)
        )
        self.mteb_model_meta = ModelMeta.create_empty(
            {
                "name": f"local/{label}" if "/" not in label else label,
                "revision": _revision(path) if path.exists() else "hub",
                "similarity_fn_name": ScoringFunction.COSINE,
                "modalities": ["text"],
                "framework": ["PyTorch"],
            }
        )

    def instruction_for(self, task_name: str, prompt_type, task_type: str) -> str | None:
        """The instruction of ``task_name``'s side ``prompt_type`` (None: no instruction)."""
        is_query = prompt_type is not None and getattr(prompt_type, "value", prompt_type) == "query"
        symmetric = task_type in ("STS", "PairClassification", "Clustering", "Classification")
        if not (is_query or symmetric):
            return None  # documents never get one
        if task_name in self.instructions:
            return self.instructions[task_name]
        if self.kind != "mgh":  # sentence-transformers models: only what the map gives
            return None
        return DEFAULT_INSTRUCTION if is_query else STS_INSTRUCTION

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        instruction = self.instruction_for(task_metadata.name, prompt_type, task_metadata.type)
        batch_size = kwargs.get("batch_size", self.batch_size)
        side = getattr(prompt_type, "value", prompt_type)
        label = f"{task_metadata.name} {side + 's' if side else 'texts'}"
        if self.embedder is not None:
            return _in_blocks(
                texts,
                batch_size,
                label,
                self.show_progress,
                lambda block: self.embedder.encode(block, instruction=instruction, batch_size=batch_size).numpy(),
            )
        with resolve(self.st.device).autocast_context():  # bf16 on CUDA; sentence-transformers sorts by length
            return _in_blocks(
                texts,
                batch_size,
                label,
                self.show_progress,
                lambda block: self.st.encode(
                    block,
                    batch_size=batch_size,
                    prompt=instruction,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                    normalize_embeddings=True,
                ),
            )

    @staticmethod
    def similarity(a, b):
        a, b = (torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1) for x in (a, b))
        return a @ b.T

    @staticmethod
    def similarity_pairwise(a, b):
        a, b = (torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1) for x in (a, b))
        return (a * b).sum(-1)


def _in_blocks(texts: list, batch_size: int, label: str, show: bool, encode) -> np.ndarray:
    """``encode(block)`` over ``texts`` longest first (as both encoders order their batches), in
    blocks of 16 batches under one bar that clears when done: mteb's bar of tasks stays the only
    lasting one, where an encoder's own bar per call would leave a line each."""
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out, block = [None] * len(texts), 16 * batch_size
    with tqdm(total=len(texts), desc=label, unit="text", leave=False, disable=not show) as bar:
        for start in range(0, len(order), block):
            chunk = order[start : start + block]
            for i, vector in zip(chunk, encode([texts[i] for i in chunk])):
                out[i] = vector
            bar.update(len(chunk))
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def _revision(path: Path) -> str:
    """A revision string that changes with the weights (mteb's cache is keyed by it)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        digest.update(str(int(file.stat().st_mtime)).encode())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# local data
# --------------------------------------------------------------------------------------------


def load_sts(folder: Path):
    """An STS test file (``sentence1,sentence2,score``) as the ``datasets.Dataset`` mteb expects."""
    from datasets import Dataset

    files = sorted(p for p in folder.glob("*test*") if p.suffix in (".csv", ".tsv"))
    if not files:
        raise ValueError(f"data_dir: expected an STS test file (*test*.csv or .tsv) in {folder}")
    first, second, scores = read_sts_pairs(files[0])
    return Dataset.from_dict({"sentence1": first, "sentence2": second, "score": scores})


def load_beir(folder: Path, split: str = "test") -> dict:
    """A BEIR folder as mteb's retrieval split data: corpus, queries, relevant_docs, top_ranked."""
    from datasets import Dataset

    needed = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"data_dir: the BEIR folder {folder} lacks {', '.join(missing)}")
    qrels = defaultdict(dict)
    with open(needed[2], newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            try:
                qrels[str(row["query-id"])][str(row["corpus-id"])] = int(row["score"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{needed[2]}:{line}: expected query-id, corpus-id, score columns") from None

    def rows(path: Path, keep) -> list:
        out = []
        with open(path, encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if text.strip():
                    try:
                        row = json.loads(text)
                        item = keep(row)
                    except (json.JSONDecodeError, KeyError) as error:
                        raise ValueError(f"{path}:{line}: {error}") from None
                    if item is not None:
                        out.append(item)
        return out

    corpus = rows(needed[0], lambda r: {"id": str(r["_id"]), "title": r.get("title") or "", "text": r["text"]})
    queries = rows(needed[1], lambda r: {"id": str(r["_id"]), "text": r["text"]} if str(r["_id"]) in qrels else None)
    return {
        "corpus": Dataset.from_list(corpus),
        "queries": Dataset.from_list(queries),
        "relevant_docs": dict(qrels),
        "top_ranked": None,
    }


def get_tasks(names: Sequence[str], data_dir: str | None = None) -> list:
    """mteb tasks by name; with ``data_dir`` each is filled from local files (no hub access)."""
    import mteb

    tasks = []
    for name in names:
        try:
            task = mteb.get_task(name)
        except KeyError:
            raise ValueError(f"tasks: unknown MTEB task {name!r}") from None
        if data_dir is not None:
            folder = Path(data_dir) / LOCAL_FOLDERS.get(name, name.lower())
            if not folder.is_dir():
                raise ValueError(f"data_dir: no folder {folder} for task {name}")
            kind = task.metadata.type
            if kind == "STS":
                split = load_sts(folder)
            elif kind == "Retrieval":
                split = load_beir(folder)
            else:
                raise ValueError(f"tasks: {name} is a {kind} task; local data covers STS and Retrieval tasks")
            task.dataset = {"default": {"test": split}}
            task.data_loaded = True
        tasks.append(task)
    return tasks


# --------------------------------------------------------------------------------------------
# running and reporting
# --------------------------------------------------------------------------------------------


def evaluate(
    model: str,
    tasks: Sequence[str],
    *,
    data_dir: str | None = None,
    output: str | None = None,
    instructions: dict | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Run ``tasks`` on ``model``; returns {task: {"metric": name, "score": main score x 100}}."""
    import mteb

    if data_dir is not None:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task_objects = get_tasks(tasks, data_dir)
    encoder = MTEBEncoder(model, instructions=instructions, batch_size=batch_size, show_progress=show_progress)
    cache = mteb.ResultCache(output) if output else None
    result = mteb.evaluate(
        encoder,
        task_objects,
        cache=cache,
        overwrite_strategy="always",
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
        raise_error=True,
    )
    summary = {}
    for task_result in result.task_results:
        task = next(t for t in task_objects if t.metadata.name == task_result.task_name)
        summary[task_result.task_name] = {"metric": task.metadata.main_score, "score": 100.0 * task_result.get_score()}
    check_scores(summary, output)  # a NaN score: one line naming the task; the JSON stays valid
    return summary


def format_table(rows: dict, columns: Sequence[str]) -> str:
    """A plain-text table: one row per task, one column per run, each as wide as its whole name."""
    # Ours, not mteb's BenchmarkResults.to_dataframe: its columns are keyed by model name (and
    # revision), which two result folders of one model share; here a column is a folder.
    width = max([4] + [len(t) for t in rows])
    metric_width = max([6] + [len(metric) for metric, _ in rows.values()])
    widths = [max(6, len(c)) for c in columns]
    lines = [f"{'task':<{width}}  {'metric':<{metric_width}}" + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths))]
    for task, (metric, scores) in sorted(rows.items()):
        cells = "".join(f"  {'' if s is None else f'{s:.2f}':>{w}}" for s, w in zip(scores, widths))
        lines.append(f"{task:<{width}}  {metric:<{metric_width}}{cells}")
    return "\n".join(lines)


def read_run(folder) -> dict:
    """{task: (main metric, score x 100)} from an mteb result folder (any depth of result JSON),
    read with mteb's ``TaskResult`` (:func:`mgh_train.model_card.read_mteb_results`)."""
    from .model_card import read_mteb_results

    try:
        results = read_mteb_results(folder)
    except ValueError as error:
        raise ValueError(f"run: {str(error).split(': ', 1)[1]}") from None
    return {r["task"]: (r["main_metric"] or "main_score", 100.0 * r["main_score"]) for r in results}


def compare(runs: Sequence[str], plot: str | None = None) -> str:
    """Tasks side by side over ``runs`` (result folders); with ``plot`` also a PNG bar chart."""
    scores = [read_run(r) for r in runs]
    tasks = sorted({t for s in scores for t in s})
    rows = {t: (next(s[t][0] for s in scores if t in s), [s[t][1] if t in s else None for s in scores]) for t in tasks}
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(tasks) * len(runs)), 4))
        width = 0.8 / len(runs)
        for i, (run, s) in enumerate(zip(runs, scores)):
            ax.bar(
                [j + i * width for j in range(len(tasks))],
                [s.get(t, (None, 0))[1] for t in tasks],
                width,
                label=Path(run).name,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
        ax.set_ylabel("main score x 100")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot)
        plt.close(fig)
    return format_table(rows, [str(r) for r in runs])
