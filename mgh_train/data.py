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
* any other columns, bound by order as sentence-transformers binds a dataset's columns: every
  value a non-empty string, the first the anchor, the second the positive, the rest negatives
  (``query, answer, negative`` is a triplet; ``sentence1, sentence2`` a pair).

Rows from the last four have no difficulty levels (``level=None``). A row without negatives (a
pair) trains with in-batch negatives only, as sentence-transformers' MultipleNegativesRankingLoss
does on ``(anchor, positive)`` pairs. A bad row raises
:class:`DataError` naming the file, the line and what is wrong, or with ``skip_bad_rows=True`` is
skipped and counted. Bad means: not UTF-8, not JSON, not one of the formats, or (given the
:class:`RowNeeds` of a training run) without what the run's schedule trains with: an MGH row
needs the levels the schedule uses (each level an integer 1-4, at most once per row). A micro-batch
trains each query with as many hard negatives as its row with the fewest has, so a pair among
triplets makes its micro-batch in-batch only (:func:`schedule_notes` says so before a run).

Parquet files and Hugging Face ``datasets`` folders (``save_to_disk``) hold the same columns
(:mod:`mgh_train.data_tables`); their bad rows are named ``file:row N`` (N from 0).

A training run's examples, its held-out share and its public data mixed in come from
:func:`load_training_data`; :func:`jsonl_rows` is the one JSON Lines row reader (``verify`` uses it too).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from .data_tables import is_table

LEVELS = (1, 2, 3, 4)
SCHEDULES = ("curriculum", "reverse", "random", "all")  # and "level:N"


class DataError(ValueError):
    """A bad data row: the message starts with ``file:line:``."""


@dataclass(frozen=True)
class Negative:
    text: str
    level: int | None = None  # 1 (easy) .. 4 (hard); None for data without levels


@dataclass(frozen=True)
class Example:
    query: str
    positive: str
    negatives: tuple[Negative, ...] = ()
    task: str = ""
    task_type: str = ""
    instruction: str | None = None

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
    given = _list(row, "negatives")
    if len(given) > len(LEVELS):
        raise ValueError(
            f"field 'negatives' must hold at most {len(LEVELS)} negatives (one per level 1-4), got {len(given)}"
        )
    negatives, seen = [], {}
    for i, neg in enumerate(given):
        if not isinstance(neg, dict):
            raise ValueError(f"negatives[{i}] must be an object with 'text' and 'level', got {neg!r}")
        level = neg.get("level")
        if type(level) is not int or level not in LEVELS:  # not 2.0, not True
            raise ValueError(f"negatives[{i}].level must be one of 1, 2, 3, 4, got {level!r}")
        if level in seen:
            raise ValueError(
                f"negatives[{i}].level {level} repeats negatives[{seen[level]}].level; expected each level at most once"
            )
        seen[level] = i
        negatives.append(Negative(_text(neg, "text"), level))
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"field 'instruction' must be a string when present, got {instruction!r}")
    task, task_type = row.get("task", ""), row.get("task_type", "")
    if not isinstance(task, str) or not isinstance(task_type, str):
        raise ValueError("fields 'task' and 'task_type' must be strings")
    return Example(_text(row, "query"), _text(row, "positive"), tuple(negatives), task, task_type, instruction)


def _from_sentence_transformers(row: dict) -> Example:
    keys = (
        ["negative"]
        if "negative" in row
        else sorted((k for k in row if k.startswith("negative_")), key=lambda k: int(k.split("_", 1)[1]))
    )
    negatives = tuple(Negative(_text(row, k)) for k in keys)
    return Example(_text(row, "anchor"), _text(row, "positive"), negatives)


def _from_flag_embedding(row: dict) -> Example:
    positives = _list(row, "pos")
    if not positives:
        raise ValueError("field 'pos' must hold at least one passage")
    negatives = tuple(Negative(_text({"neg": n}, "neg")) for n in _list(row, "neg"))
    prompt = row.get("prompt")
    return Example(
        _text(row, "query"),
        _text({"pos": positives[0]}, "pos"),
        negatives,
        instruction=prompt if isinstance(prompt, str) and prompt else None,
    )


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
    if len(row) >= 2 and all(isinstance(v, str) and v.strip() for v in row.values()):
        return _from_columns(row)
    raise ValueError(
        "unknown row format: expected MGH (query, positive, negatives), sentence-transformers "
        "(anchor, positive, negative_1..n), FlagEmbedding (query, pos, neg), tevatron "
        "(query, positive_passages, negative_passages), or two or more text columns bound by order "
        f"(anchor, positive, negatives...); got keys {sorted(row)}"
    )


def _from_columns(row: dict) -> Example:
    """Columns bound by order (sentence-transformers' datasets): anchor, positive, negatives."""
    texts = list(row.values())
    return Example(texts[0], texts[1], tuple(Negative(t) for t in texts[2:]))


@dataclass(frozen=True)
class RowNeeds:
    """What a training run needs of every row; :func:`read_examples` checks it as rows are read.

    ``levels``: the levels of which an MGH row with negatives must have one (those the schedule
    trains with). A row without negatives (a pair) is fine: it trains with in-batch negatives.
    Build it with :func:`needs_of`.
    """

    schedule: str = "curriculum"
    levels: frozenset = frozenset(LEVELS)

    def check(self, example: Example) -> None:
        """Raise ValueError saying what ``example`` lacks for this run."""
        if not example.negatives:
            return  # a pair: in-batch negatives only (MultipleNegativesRankingLoss on pairs)
        have = {n.level for n in example.negatives}
        if None in have:
            return  # data without levels: the single-level schedules take a random negative
        missing = sorted(self.levels - have)
        if missing:
            levels = ", ".join(map(str, sorted(self.levels)))
            raise ValueError(
                f"no level-{'/'.join(map(str, missing))} negative, but schedule {self.schedule!r} trains with "
                f"level{'s' if len(self.levels) > 1 else ''} {levels}; the row has levels "
                f"{', '.join(map(str, sorted(have)))}"
            )


def needs_of(schedule: str, steps: int, stage_steps: Sequence[int] | None = None) -> RowNeeds:
    """The :class:`RowNeeds` of a run of ``steps`` steps under ``schedule`` (and ``stage_steps``)."""
    check_schedule(schedule)
    if schedule == "random":
        return RowNeeds(schedule, frozenset())
    if schedule == "all":
        return RowNeeds(schedule, frozenset(LEVELS))
    if level_of(schedule) is not None:
        return RowNeeds(schedule, frozenset({level_of(schedule)}))
    stages = stages_used(steps, stage_steps)
    if schedule == "reverse":
        return RowNeeds(schedule, frozenset(len(LEVELS) + 1 - s for s in stages))
    return RowNeeds(schedule, frozenset(stages))


def schedule_notes(examples: Sequence[Example], schedule: str) -> list[str]:
    """What ``schedule`` will do with ``examples``, as lines for the run's log; a ValueError naming
    ``schedule`` where it cannot mean anything (a level schedule over data without levels).

    Pairs and data without levels are trained as sentence-transformers trains them
    (MultipleNegativesRankingLoss): in-batch negatives, plus one hard negative per query where
    the rows have them, drawn at random under the single-negative schedules.
    """
    check_schedule(schedule)
    n = len(examples)
    pairs = sum(1 for e in examples if not e.negatives)
    levelled = sum(1 for e in examples if any(x.level is not None for x in e.negatives))
    notes = []
    if pairs == n:
        notes.append(
            f"negatives: every example is a pair (no hard negative): in-batch negatives only, as "
            f"MultipleNegativesRankingLoss on (anchor, positive); schedule {schedule} has nothing to order"
        )
        return notes
    if pairs:
        notes.append(
            f"negatives: {pairs} of {n} examples are pairs (no hard negative): a micro-batch holding "
            "one trains with in-batch negatives only"
        )
    if levelled == 0 and schedule not in ("random", "all"):
        if schedule == "curriculum":
            notes.append(
                "negatives: the data has no difficulty levels, so the curriculum has no order to follow: "
                "each query trains with one of its hard negatives drawn at random (as --schedule random; "
                "MGH rows or `mine` give levels)"
            )
        else:
            raise ValueError(
                f"schedule: {schedule!r} picks negatives by level, but the data has no difficulty "
                "levels (no MGH rows); use --schedule random or all, or level the data with `mine`"
            )
    return notes


def decode_line(raw: bytes, first: bool) -> str:
    """One line of a file as text; ValueError saying where the first non-UTF-8 byte is."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"not UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line (save the file as UTF-8)"
        ) from None
    return text.removeprefix("\ufeff") if first else text  # a byte-order mark opens some files


def read_examples(path, *, skip_bad_rows: bool = False, needs: RowNeeds | None = None) -> ReadReport:
    """Read a JSON Lines file of training rows (blank lines are ignored).

    Raises :class:`DataError` (``"file:line: what is wrong"``) on the first bad row, or with
    ``skip_bad_rows`` collects the bad rows in ``report.skipped`` and goes on. ``needs`` adds the
    checks of a training run's schedule (:class:`RowNeeds`).
    """
    path = Path(path)
    if is_table(path):
        return read_table_examples(path, skip_bad_rows=skip_bad_rows, needs=needs)
    if path.is_dir():
        raise DataError(
            f"{path}: a folder, but not a datasets folder (save_to_disk writes dataset_info.json "
            "or dataset_dict.json); pass JSON Lines or Parquet files, or such a folder"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    report = ReadReport()
    with path.open("rb") as f:
        for row in jsonl_rows(f, needs):
            if row.error is None:
                report.examples.append(row.example)
            elif skip_bad_rows:
                report.skipped.append((row.number, row.error))
            else:
                raise DataError(f"{path}:{row.number}: {row.error}")
    return report


class JsonlRow(NamedTuple):
    """One non-blank line of a JSON Lines file: its number (from 1), its text, and either its
    :class:`Example` or, where the row is bad, what is wrong (``error``, without the file:line)."""

    number: int
    line: str
    example: Example | None
    error: str | None


def jsonl_rows(handle: Iterable[bytes], needs: RowNeeds | None = None) -> Iterator[JsonlRow]:
    """The rows of a JSON Lines file opened in binary (blank lines skipped); a bad row (not UTF-8,
    not JSON, not one of the formats, or lacking what ``needs`` asks for) comes with its ``error``
    rather than raising, so a reader can skip it and go on (:func:`read_examples`) or stop there."""
    for number, raw in enumerate(handle, start=1):
        line = ""
        try:
            line = decode_line(raw, number == 1)
            if not line.strip():
                continue
            example = parse_row(json.loads(line))
            if needs is not None:
                needs.check(example)
        except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            yield JsonlRow(
                number, line, None, f"invalid JSON: {err}" if isinstance(err, json.JSONDecodeError) else str(err)
            )
            continue
        yield JsonlRow(number, line, example, None)


def fingerprint(examples: Sequence[Example]) -> str:
    """A hash of ``examples`` in order (texts, levels, instructions): equal iff a run sees the same data."""
    digest = hashlib.sha256()
    for e in examples:
        row = [e.query, e.positive, [[n.text, n.level] for n in e.negatives], e.task, e.task_type, e.instruction]
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def read_table_examples(path, *, skip_bad_rows: bool = False, needs: RowNeeds | None = None) -> ReadReport:
    """Read a Parquet file or a ``datasets`` folder of training rows (see :mod:`.data_tables`).

    As :func:`read_examples` (``needs`` included), with ``file:row N: what is wrong`` (N counted
    from 0) for a bad row, and row indices in ``report.skipped``.
    """
    from .data_tables import table_rows

    report = ReadReport()
    try:
        for index, row in enumerate(table_rows(path)):
            try:
                example = parse_row(row)
                if needs is not None:
                    needs.check(example)
                report.examples.append(example)
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
    """Header-less ``sentence1,sentence2,score`` rows of a .csv (or tab-separated .tsv) STS file.

    Every score must be a finite number, and the file must hold at least one pair.
    """
    first, second, scores = [], [], []
    delimiter = "\t" if str(path).endswith(".tsv") else ","
    with open(path, "rb") as raw:
        for line, data in enumerate(raw, start=1):  # the bytes first: a non-UTF-8 line is named
            try:
                decode_line(data, line == 1)
            except ValueError as error:
                raise ValueError(f"{path}:{line}: {error}") from None
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected sentence1, sentence2, score; got {len(row)} fields")
            try:
                score = float(row[2])
            except ValueError:
                raise ValueError(f"{path}:{line}: score {row[2]!r} is not a number") from None
            if not math.isfinite(score):
                raise ValueError(f"{path}:{line}: score {row[2]!r} is not a finite number")
            scores.append(score)
            first.append(row[0])
            second.append(row[1])
            if limit and len(scores) >= limit:
                break
    if not scores:
        raise ValueError(f"{path}: expected sentence1,sentence2,score rows, found none (an empty file?)")
    return first, second, scores


# --------------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------------


def check_schedule(schedule: str) -> str:
    """``schedule`` if it is one of :data:`SCHEDULES` or ``level:N`` (N in 1..4); else a ValueError naming it."""
    if schedule in SCHEDULES or level_of(schedule) is not None:
        return schedule
    raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)} or level:1..4, got {schedule!r}")


def level_of(schedule: str) -> int | None:
    """The one level a ``level:N`` schedule trains with (N in 1..4); None for any other schedule."""
    if not schedule.startswith("level:"):
        return None
    digits = schedule.removeprefix("level:")
    return int(digits) if digits in {str(level) for level in LEVELS} else None


def stages_used(steps: int, stage_steps: Sequence[int] | None = None) -> list[int]:
    """The curriculum stages (1..4) that a run of ``steps`` steps goes through, in order."""
    lengths = list(stage_steps) if stage_steps is not None else _even_split(steps)
    used, start = [], 0
    for stage, n in enumerate(lengths, start=1):
        if n > 0 and start < steps:
            used.append(stage)
        start += n
    if start < steps and len(LEVELS) not in used:  # the last stage runs on to the end
        used.append(len(LEVELS))
    return used


def _even_split(total_steps: int) -> list[int]:
    base, extra = divmod(total_steps, len(LEVELS))
    return [base + (1 if s < extra else 0) for s in range(len(LEVELS))]


def stage_at(step: int, total_steps: int, stage_steps: Sequence[int] | None = None) -> int:
    """The curriculum stage (1..4) of ``step`` (0-based) in a run of ``total_steps``.

    Without ``stage_steps`` the steps split evenly (earlier stages take the remainder); with it,
    stage s lasts ``stage_steps[s-1]`` steps and the last stage continues to the end.
    """
    if stage_steps is None:
        stage_steps = _even_split(total_steps)
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
        level = level_of(check_schedule(schedule))
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
# A run's data
# --------------------------------------------------------------------------------------------


def seed_files() -> list[Path]:
    """The seed MGH dataset shipped inside the package."""
    folder = resources.files("mgh_train") / "seed"
    return sorted(Path(str(folder)).glob("*.jsonl"))


def load_training_data(
    cfg, log: Callable[[str], None], examples: list | None = None
) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) of a :class:`~mgh_train.config.TrainConfig`: its
    ``data`` files (the seed set without), or ``examples`` in memory (``fit()``), a ``holdout``
    share held out (shuffled with ``seed``), plus its ``public_data`` mixed in at ``public_ratio``.

    Every row is checked against what ``cfg.schedule`` trains with (:func:`needs_of`); bad rows
    fail, or with ``skip_bad_rows`` are skipped and counted in the log.
    """
    needs = needs_of(cfg.schedule, cfg.steps, cfg.stage_steps)

    def read(paths):
        out = []
        for path in paths:
            report = read_examples(path, skip_bad_rows=cfg.skip_bad_rows, needs=needs)
            if report.skipped:
                log(
                    f"{path}: skipped {len(report.skipped)} bad row(s), first at line {report.skipped[0][0]}: "
                    f"{report.skipped[0][1]}"
                )
            out += report.examples
        return out

    levelled = list(examples) if examples is not None else read(cfg.data or seed_files())
    if not levelled:
        raise ValueError(f"data: no examples in {', '.join(map(str, cfg.data or seed_files()))}")
    order = list(range(len(levelled)))
    random.Random(cfg.seed).shuffle(order)
    n_held = round(len(levelled) * cfg.holdout)
    held = [levelled[i] for i in sorted(order[:n_held])]
    train_set = [levelled[i] for i in sorted(order[n_held:])]
    if cfg.public_data:
        train_set = mix(train_set, read(cfg.public_data), cfg.public_ratio, cfg.seed)
    return train_set, held


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
