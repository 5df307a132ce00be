"""What ``mine`` reads: (query, positive) pairs and a corpus, with bad rows named by file and line.

Pairs:
* JSON Lines: ``{"query", "positive"}`` or ``{"anchor", "positive"}``, or any row the trainer
  reads (MGH, sentence-transformers, FlagEmbedding, tevatron; their negatives are ignored);
* Parquet files or ``datasets`` folders with the same columns (bad rows: ``file:row N``);
* STS files (``.csv``/``.tsv``: ``sentence1,sentence2,score``, no header), optionally only the
  pairs with ``score >= min_score``.

Corpus: JSON Lines / Parquet / datasets rows with ``text`` (and an optional ``title``, prefixed as
``title text``, as BEIR corpora are), ``.txt`` (one text per line), or STS files (both sentences).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..data import DataError, decode_line, parse_row, read_sts_pairs
from ..data_tables import is_table


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, decoded row) for JSON Lines and table files; ``where`` is ``file:line`` or ``file:row N``."""
    if is_table(path):
        from ..data_tables import table_rows

        try:
            for index, row in enumerate(table_rows(path)):
                yield f"{path}:row {index}", row
        except DataError:
            raise
        except ValueError as error:
            raise DataError(str(error)) from None
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = decode_line(raw, number == 1)
                if not line.strip():
                    continue
                yield f"{path}:{number}", json.loads(line)
            except ValueError as error:
                reason = f"invalid JSON: {error}" if isinstance(error, json.JSONDecodeError) else str(error)
                raise DataError(f"{path}:{number}: {reason}") from None


def _is_sts(path: Path) -> bool:
    return path.suffix in (".csv", ".tsv")


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _sts(path: Path) -> tuple[list[str], list[str], list[float]]:
    """An STS file's first sentences, second sentences and scores; bad rows are a DataError."""
    try:
        return read_sts_pairs(path)
    except ValueError as error:
        raise DataError(str(error)) from None


def read_pairs(paths: Sequence[str], *, min_score: float | None = None) -> list[tuple[str, str]]:
    """Every (query, positive) of ``paths``, in order."""
    pairs = []
    for name in paths:
        path = Path(name)
        if _is_sts(path):
            first, second, scores = _sts(path)
            pairs += [(a, b) for a, b, s in zip(first, second, scores) if min_score is None or s >= min_score]
            continue
        if min_score is not None:
            raise ValueError(f"pair_min_score: applies to STS files (.csv/.tsv) only, not {path}")
        pairs += [_pair(row, where) for where, row in _rows(path)]
    if not pairs:
        raise ValueError(f"pairs: no (query, positive) pairs in {', '.join(map(str, paths))}")
    return pairs


def _pair(row, where: str) -> tuple[str, str]:
    """The (query, positive) of a ``{"query"/"anchor", "positive"}`` row or of any row the trainer reads."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "positive" in row and ("query" in row or "anchor" in row) and "negatives" not in row:
        return _string(row, "query" if "query" in row else "anchor", where), _string(row, "positive", where)
    try:
        example = parse_row(row)
    except (ValueError, TypeError) as error:
        raise DataError(f"{where}: {error}") from None
    return example.query, example.positive


def read_corpus(paths: Sequence[str]) -> list[str]:
    """Every text of ``paths``, in order (duplicates kept; :func:`mine` removes them)."""
    texts = []
    for name in paths:
        path = Path(name)
        if _is_sts(path):
            first, second, _ = _sts(path)
            texts += [t for pair in zip(first, second) for t in pair]
        elif path.suffix == ".txt":
            texts += _text_lines(path)
        else:
            texts += [_corpus_text(row, where) for where, row in _rows(path)]
    if not texts:
        raise ValueError(f"corpus: no texts in {', '.join(map(str, paths))}")
    return texts


def _text_lines(path: Path) -> list[str]:
    """The non-blank lines of a ``.txt`` corpus file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = decode_line(raw, number == 1).rstrip("\r\n")
            except ValueError as error:
                raise DataError(f"{path}:{number}: {error}") from None
            if line.strip():
                lines.append(line)
    return lines


def _corpus_text(row, where: str) -> str:
    """A corpus row's ``text``, after its ``title`` where it has one (as BEIR corpora are embedded)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with 'text', got {type(row).__name__}")
    text = _string(row, "text", where)
    title = row.get("title")
    return f"{title} {text}" if isinstance(title, str) and title.strip() else text
