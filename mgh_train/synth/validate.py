"""Checks on every generated example before it is written, and JSON recovery from model text.

:func:`check_example` returns the MGH row to write, or raises :class:`Rejected` with the reason
that goes to the rejects file. Nothing here raises anything else on malformed input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data import LEVELS
from .writer import normalize_text


class Rejected(ValueError):
    """A generated example that fails a check; the message is the reason."""


@dataclass(frozen=True)
class LengthBounds:
    """Inclusive word-count bounds per field of an example."""

    query: tuple[int, int] = (1, 400)
    positive: tuple[int, int] = (1, 400)
    negative: tuple[int, int] = (1, 400)


def extract_json(text: str) -> dict:
    """The first JSON object in ``text`` (plain, fenced in ```json, or with prose around it).

    Control characters inside strings are accepted (a raw newline in a text); anything else that
    is not JSON raises :class:`Rejected`.
    """
    if not isinstance(text, str) or not text.strip():
        raise Rejected("empty response")
    # strict=False: raw newlines and tabs inside strings, which small models under a JSON grammar emit.
    decoder = json.JSONDecoder(strict=False)
    try:
        value = decoder.decode(text.strip())
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    except RecursionError:  # "[[[[..." thousands deep: small models loop like that
        raise Rejected("the JSON in the response nests too deep") from None
    for start, char in enumerate(text):
        if char == "{":
            try:
                value, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            except RecursionError:
                raise Rejected("the JSON in the response nests too deep") from None
            if isinstance(value, dict):
                return value
    raise Rejected("no JSON object in the response")


def _words(text: str) -> int:
    return len(text.split())


def _field(obj: dict, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Rejected(f"field {name!r} missing or empty")
    return value.strip()


def check_example(obj, *, bounds: LengthBounds = LengthBounds()) -> dict:
    """Validate one generated example; returns ``{"query", "positive", "negatives": [{text, level}]}``.

    Checks: every field present and non-empty; exactly four negatives with levels 1-4 once each;
    no negative equal (case and whitespace aside) to the query, the positive or another negative;
    word counts within ``bounds``.
    """
    if not isinstance(obj, dict):
        raise Rejected(f"expected a JSON object, got {type(obj).__name__}")
    query, positive = _field(obj, "query"), _field(obj, "positive")
    negatives = obj.get("negatives")
    if not isinstance(negatives, list):
        raise Rejected("field 'negatives' missing or not a list")
    if len(negatives) != len(LEVELS):
        raise Rejected(f"expected {len(LEVELS)} negatives, got {len(negatives)}")
    clean = [_negative(i, negative) for i, negative in enumerate(negatives)]
    if sorted(n["level"] for n in clean) != list(LEVELS):
        raise Rejected(f"levels must be 1, 2, 3 and 4 once each, got {sorted(n['level'] for n in clean)}")
    by_level = sorted(clean, key=lambda n: n["level"])
    _check_distinct(query, positive, by_level)
    for name, text, (low, high) in [
        ("query", query, bounds.query),
        ("positive", positive, bounds.positive),
        *[(f"level-{n['level']} negative", n["text"], bounds.negative) for n in clean],
    ]:
        words = _words(text)
        if not low <= words <= high:
            raise Rejected(f"the {name} has {words} words, expected {low}-{high}")
    return {"query": query, "positive": positive, "negatives": by_level}


def _negative(i: int, negative) -> dict:
    """``{"text", "level"}`` of the ``i``-th negative; a level may come as a digit string."""
    if not isinstance(negative, dict):
        raise Rejected(f"negative {i} is not an object with text and level")
    text = _field(negative, "text")
    level = negative.get("level")
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level)
    if not isinstance(level, int) or isinstance(level, bool) or level not in LEVELS:
        raise Rejected(f"negative {i} has level {negative.get('level')!r}, expected 1-4")
    return {"text": text, "level": level}


def _check_distinct(query: str, positive: str, negatives: list[dict]) -> None:
    """No two of the texts equal, case and whitespace aside; ``negatives`` in level order."""
    seen = {normalize_text(query): "the query", normalize_text(positive): "the positive"}
    if normalize_text(query) == normalize_text(positive):
        raise Rejected("the positive equals the query")
    for n in negatives:
        key = normalize_text(n["text"])
        if key in seen:
            raise Rejected(f"the level-{n['level']} negative equals {seen[key]}")
        seen[key] = f"the level-{n['level']} negative"


def parse_and_check(text: str, *, bounds: LengthBounds = LengthBounds()) -> dict:
    """``check_example(extract_json(text))``: a model's raw reply to a checked example."""
    return check_example(extract_json(text), bounds=bounds)


__all__ = ["LengthBounds", "Rejected", "check_example", "extract_json", "parse_and_check"]
