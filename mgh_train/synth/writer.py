"""Append-only JSON Lines output that survives being killed at any moment.

Each row is written as one line, flushed and fsynced before :meth:`RowWriter.write` returns, so a
row the caller was told is written is on disk. On open, an existing file is scanned: complete rows
are kept and their keys fill the duplicate set (so a resumed run neither loses nor repeats a
row); a torn last line (a kill mid-write: no trailing newline, or not JSON) is cut off and
reported; a broken line before the last is an error naming the file and line, since it cannot
come from a kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to compare texts (NFKC, casefold, single spaces)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def beside(output: Path, suffix: str) -> Path:
    """The side file ``<stem>.<suffix>`` next to an output ``<stem>.jsonl`` (rejects, tasks, caches)."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.{suffix}")


def row_key(row: dict) -> str:
    """A duplicate key for an MGH row: the normalised query and positive."""
    joined = normalize_text(str(row.get("query", ""))) + "\x1f" + normalize_text(str(row.get("positive", "")))
    return hashlib.sha256(joined.encode()).hexdigest()


class RowWriter:
    """``RowWriter(path)``: resume-safe append of JSON rows; ``writer.seen`` holds the row keys.

    ``on_row``, if given, is called with every complete row found on open (a resumed run rebuilds
    its own state from it: the units done, the tokens spent).

    Attributes:
        path: the output file.
        rows: complete rows in the file (found on open plus written since).
        dropped_torn_line: the torn last line cut off on open, if any (else None).
    """

    def __init__(self, path, *, key: Callable[[dict], str] = row_key, on_row: Callable[[dict], None] | None = None):
        self.path, self.key = Path(path), key
        self.seen: set[str] = set()
        self.rows = 0
        self.dropped_torn_line: str | None = None
        self._on_row = on_row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good_end = 0
        offset = 0
        for number, raw in enumerate(lines, start=1):
            is_last = number == len(lines)
            end = offset + len(raw) + (0 if is_last else 1)
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    if is_last:  # no newline after it: the write was cut before it ended
                        raise ValueError("no newline")
                except ValueError:
                    if is_last:  # only the line being written when the run died can be torn
                        self.dropped_torn_line = raw.decode("utf-8", "replace")
                        break
                    raise ValueError(
                        f"{self.path}:{number}: not a JSON object row, and not the last line "
                        "(a kill can only tear the last one); fix or remove it"
                    ) from None
                self.seen.add(self.key(row))
                self.rows += 1
                if self._on_row is not None:
                    self._on_row(row)
            good_end = end
            offset = end
        if good_end < len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())

    def __contains__(self, row: dict) -> bool:
        return self.key(row) in self.seen

    def write(self, row: dict) -> bool:
        """Append ``row`` durably; False (nothing written) if a row with its key is already there."""
        key = self.key(row)
        if key in self.seen:
            return False
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.seen.add(key)
        self.rows += 1
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
