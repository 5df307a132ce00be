"""Training data: readers for four row formats, the MGH curriculum, and duplicate-free batches.

Every reader yields :class:`Example` objects. Formats (JSON Lines, one object per line), detected
per row from its keys:

* MGH (ours): ``query``, ``positive``, ``negatives`` = list of ``{"text", "level"}`` with level
  1 (easiest: same broad topic) ... 4 (hardest: shares most surface content), ``task``,
  ``task_type``, optional ``instruction``.
* sentence-transformers n-tuples: ``anchor``, ``positive``, ``negative`` or ``negative_1..n``.
* FlagEmbedding: ``query``, ``pos`` (list; the first is used), ``neg`` (list), optional ``prompt``.
* tevatron: ``query``, ``positive_passages`` / ``negative_passages`` (lists of ``{"text",
  "title"?}``; a title is prefixed as "title text").

Rows from the last three have no difficulty levels (``level=None``). A bad row raises
:class:`DataError` naming the file, the line and what is wrong, or with ``skip_bad_rows=True`` is
skipped and counted.

Parquet files and Hugging Face ``datasets`` folders (``save_to_disk``) hold the same columns
(:mod:`mgh_train.data_tables`); their bad rows are named ``file:row N`` (N from 0).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .data_tables import is_table

LEVELS = (1, 2, 3, 4)
SCHEDULES = ("curriculum", "reverse", "random", "all")  # and "level:N"


class DataError(ValueError):
    """A bad data row: the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Negative:
    text: str
    level: Optional[int] = None  # 1 (easy) .. 4 (hard); None for data without levels


@dataclass(frozen=True)
class Example:
    query: str
    positive: str
    negatives: tuple[Negative, ...] = ()
    task: str = ""
    task_type: str = ""
    instruction: Optional[str] = None

    def texts(self) -> list[str]:
        """Every text of the example (query, positive, negatives)."""
        return [self.query, self.positive, *(n.text for n in self.negatives)]


@dataclass
class ReadReport:
    """What a read found: the examples, and the skipped rows as ``(line, reason)``."""

    examples: list[Example] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _list(row: dict, key: str) -> list:
    value = row.get(key)
    if not isinstance(value, list):
        raise ValueError(f"field {key!r} must be a list, got {type(value).__name__}")
    return value


def _from_mgh(row: dict) -> Example:
    negatives = []
    for i, neg in enumerate(_list(row, "negatives")):
        if not isinstance(neg, dict):
            raise ValueError(f"negatives[{i}] must be an object with 'text' and 'level', got {neg!r}")
        level = neg.get("level")
        if isinstance(level, bool) or level not in LEVELS:
            raise ValueError(f"negatives[{i}].level must be one of 1, 2, 3, 4, got {level!r}")
        negatives.append(Negative(_text(neg, "text"), level))
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"field 'instruction' must be a string when present, got {instruction!r}")
    task, task_type = row.get("task", ""), row.get("task_type", "")
    if not isinstance(task, str) or not isinstance(task_type, str):
        raise ValueError("fields 'task' and 'task_type' must be strings")
    return Example(_text(row, "query"), _text(row, "positive"), tuple(negatives), task, task_type, instruction)


def _from_sentence_transformers(row: dict) -> Example:
    keys = ["negative"] if "negative" in row else sorted(
        (k for k in row if k.startswith("negative_")), key=lambda k: int(k.split("_", 1)[1])
    )
    negatives = tuple(Negative(_text(row, k)) for k in keys)
    return Example(_text(row, "anchor"), _text(row, "positive"), negatives)


def _from_flag_embedding(row: dict) -> Example:
    positives = _list(row, "pos")
    if not positives:
        raise ValueError("field 'pos' must hold at least one passage")
    negatives = tuple(Negative(_text({"neg": n}, "neg")) for n in _list(row, "neg"))
    prompt = row.get("prompt")
    return Example(_text(row, "query"), _text({"pos": positives[0]}, "pos"), negatives,
                   instruction=prompt if isinstance(prompt, str) and prompt else None)


def _passage(p, where: str) -> str:
    if not isinstance(p, dict):
        raise ValueError(f"{where} must be an object with 'text', got {p!r}")
    text = _text(p, "text")
    title = p.get("title")
    return f"{title} {text}" if isinstance(title, str) and title.strip() else text


def _from_tevatron(row: dict) -> Example:
    positives = _list(row, "positive_passages")
    if not positives:
        raise ValueError("field 'positive_passages' must hold at least one passage")
    negatives = row.get("negative_passages", [])
    if not isinstance(negatives, list):
        raise ValueError("field 'negative_passages' must be a list")
    return Example(
        _text(row, "query"),
        _passage(positives[0], "positive_passages[0]"),
        tuple(Negative(_passage(p, f"negative_passages[{i}]")) for i, p in enumerate(negatives)),
    )


def parse_row(row) -> Example:
    """One decoded JSON row -> Example, whichever of the four formats it is in."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "anchor" in row:
        return _from_sentence_transformers(row)
    if "positive_passages" in row:
        return _from_tevatron(row)
    if "pos" in row:
        return _from_flag_embedding(row)
    if "positive" in row and "negatives" in row:
        return _from_mgh(row)
    raise ValueError(
        "unknown row format: expected MGH (query, positive, negatives), sentence-transformers "
        "(anchor, positive, negative_1..n), FlagEmbedding (query, pos, neg) or tevatron "
        f"(query, positive_passages, negative_passages); got keys {sorted(row)}"
    )


def read_examples(path, *, skip_bad_rows: bool = False) -> ReadReport:
    """Read a JSON Lines file of training rows (blank lines are ignored).

    Raises :class:`DataError` (``"file:line: what is wrong"``) on the first bad row, or with
    ``skip_bad_rows`` collects the bad rows in ``report.skipped`` and goes on.
    """
    path = Path(path)
    if is_table(path):
        return read_table_examples(path, skip_bad_rows=skip_bad_rows)
    if path.is_dir():
        raise DataError(f"{path}: a folder, but not a datasets folder (save_to_disk writes dataset_info.json "
                        "or dataset_dict.json); pass JSON Lines or Parquet files, or such a folder")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    report = ReadReport()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                report.examples.append(parse_row(json.loads(line)))
            except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                reason = f"invalid JSON: {err}" if isinstance(err, json.JSONDecodeError) else str(err)
                if not skip_bad_rows:
                    raise DataError(f"{path}:{number}: {reason}") from None
                report.skipped.append((number, reason))
    return report


def read_table_examples(path, *, skip_bad_rows: bool = False) -> ReadReport:
    """Read a Parquet file or a ``datasets`` folder of training rows (see :mod:`.data_tables`).

    As :func:`read_examples`, with ``file:row N: what is wrong`` (N counted from 0) for a bad row,
    and row indices in ``report.skipped``.
    """
    from .data_tables import table_rows

    report = ReadReport()
    try:
        for index, row in enumerate(table_rows(path)):
            try:
                report.examples.append(parse_row(row))
            except (ValueError, TypeError) as err:
                if not skip_bad_rows:
                    raise DataError(f"{path}:row {index}: {err}") from None
                report.skipped.append((index, str(err)))
    except DataError:
        raise
    except ValueError as err:  # the table itself cannot be read
        raise DataError(str(err)) from None
    return report


def read_sts_pairs(path, limit: int = 0) -> tuple[list[str], list[str], list[float]]:
    """Header-less ``sentence1,sentence2,score`` rows of a .csv (or tab-separated .tsv) STS file."""
    first, second, scores = [], [], []
    delimiter = "\t" if str(path).endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected sentence1, sentence2, score; got {len(row)} fields")
            try:
                scores.append(float(row[2]))
            except ValueError:
                raise ValueError(f"{path}:{line}: score {row[2]!r} is not a number") from None
            first.append(row[0])
            second.append(row[1])
            if limit and len(scores) >= limit:
                break
    return first, second, scores


# --------------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------------


def check_schedule(schedule: str) -> str:
    if schedule in SCHEDULES:
        return schedule
    if schedule.startswith("level:") and schedule[6:] in {str(level) for level in LEVELS}:
        return schedule
    raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)} or level:1..4, got {schedule!r}")


def stage_at(step: int, total_steps: int, stage_steps: Optional[Sequence[int]] = None) -> int:
    """The curriculum stage (1..4) of ``step`` (0-based) in a run of ``total_steps``.

    Without ``stage_steps`` the steps split evenly (earlier stages take the remainder); with it,
    stage s lasts ``stage_steps[s-1]`` steps and the last stage continues to the end.
    """
    if stage_steps is None:
        base, extra = divmod(total_steps, len(LEVELS))
        stage_steps = [base + (1 if s < extra else 0) for s in range(len(LEVELS))]
    if len(stage_steps) != len(LEVELS) or any(n < 0 for n in stage_steps):
        raise ValueError(f"stage_steps: expected four non-negative step counts, got {list(stage_steps)}")
    end = 0
    for stage, n in enumerate(stage_steps, start=1):
        end += n
        if step < end:
            return stage
    return len(LEVELS)


def negatives_for(example: Example, schedule: str, stage: int, rng: random.Random) -> list[str]:
    """The negative texts ``example`` trains with at curriculum ``stage`` under ``schedule``.

    "curriculum": the level-``stage`` negative; "reverse": level ``5 - stage``; "level:N": level N;
    "random": a random level; "all": every negative. An example without levels (public data) gives
    one random negative under the single-negative schedules, so every batch keeps one per query.
    """
    if not example.negatives:
        return []
    if schedule == "all":
        return [n.text for n in example.negatives]
    unlevelled = [n for n in example.negatives if n.level is None]
    if unlevelled or schedule == "random":
        return [rng.choice(example.negatives).text]
    level = {"curriculum": stage, "reverse": len(LEVELS) + 1 - stage}.get(schedule)
    if level is None:
        level = int(check_schedule(schedule)[6:])
    chosen = [n.text for n in example.negatives if n.level == level]
    if not chosen:
        raise ValueError(f"example {example.query[:60]!r} has no level-{level} negative")
    return chosen[:1]


def mix(levelled: Sequence[Example], public: Sequence[Example], ratio: float, seed: int) -> list[Example]:
    """All ``levelled`` examples plus public ones to make up ``ratio`` of the result (0 <= ratio < 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a share of public data in [0, 1), got {ratio!r}")
    wanted = round(len(levelled) * ratio / (1.0 - ratio))
    rng = random.Random(seed)
    picked = rng.sample(list(public), min(wanted, len(public)))
    return [*levelled, *picked]


# --------------------------------------------------------------------------------------------
# Batches without duplicate texts
# --------------------------------------------------------------------------------------------


class NoDuplicatesBatcher:
    """Batches of example indices in which no text appears twice (sentence-transformers'
    NO_DUPLICATES): an in-batch negative that equals a query's own positive would be a false one.

    Each epoch shuffles with ``seed + epoch``; an example whose texts collide with the batch being
    filled waits for a later batch. Incomplete final batches are dropped (contrastive batches
    need their size). ``state_dict`` / ``load_state_dict`` resume exactly at a batch boundary.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.position = 0, 0  # position: batches already given out in this epoch

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        remaining = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(remaining)
        batches = []
        while len(remaining) >= self.batch_size:
            batch, seen, waiting = [], set(), []
            for i in remaining:
                texts = set(self.examples[i].texts())
                if len(batch) < self.batch_size and not texts & seen:
                    batch.append(i)
                    seen |= texts
                else:
                    waiting.append(i)
            if len(batch) < self.batch_size:
                break
            batches.append(batch)
            remaining = waiting
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self._epoch_batches(self.epoch)
            if not batches:
                raise ValueError(
                    f"batch_size: {self.batch_size} is more than the {len(self.examples)} examples can fill "
                    "without repeating a text"
                )
            while self.position < len(batches):
                self.position += 1
                yield batches[self.position - 1]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
