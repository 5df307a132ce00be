"""No NaN score passes silently: an evaluation whose main score is NaN or infinite is an error
naming the task and why, and the result JSON written for it stays valid JSON (``null``, not the
``NaN`` literal that strict readers reject).

    check_scores(summary, output)   # after mteb.evaluate: ValueError naming the first bad task

A NaN correlation (STS's Spearman) means the similarities have no spread: every pair scored the
same (a model that gives every text one embedding) or scored NaN (non-finite embeddings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def sanitize_json(folder) -> list:
    """Rewrite every ``*.json`` under ``folder`` holding NaN or Infinity with null instead; the paths."""
    fixed = []
    for path in sorted(Path(folder).rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        if "NaN" not in text and "Infinity" not in text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        clean = _finite(value)
        if clean != value or "NaN" in text:
            path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            fixed.append(path)
    return fixed


def check_scores(summary: dict, output: str | None = None) -> None:
    """Raise ValueError if a task's score (``summary``: {task: {"metric", "score"}}) is not finite,
    after making the JSON under ``output`` valid."""
    bad = [(task, s) for task, s in summary.items() if not math.isfinite(s["score"])]
    if not bad:
        return
    if output:
        sanitize_json(output)
    task, s = bad[0]
    written = f"; {output} holds null for it" if output else ""
    others = f" (also: {', '.join(t for t, _ in bad[1:])})" if len(bad) > 1 else ""
    raise ValueError(
        f"eval: {task} scored {s['score']} on {s['metric']}{others}: the model's similarity scores "
        "have no spread or are not finite (does it give every text the same embedding?), so the score "
        f"is undefined{written}"
    )


__all__ = ["check_scores", "sanitize_json"]
