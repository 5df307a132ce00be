"""The run's metric rows: one per optimizer step in ``metrics.jsonl`` (and the trackers), read from
the device only at logging steps.

Each step's loss and finite flag stay on the device; :meth:`RunLog.flush` reads every pending step
in one transfer, writes their rows, and says which step first had a non-finite loss. Throughput
(examples/s, tokens/s: real tokens, counted on the host) is over the whole run so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class _Pending:
    step: int
    loss: torch.Tensor
    finite: torch.Tensor
    host: dict  # lr, stage, examples, tokens, elapsed
    plans: list = field(repr=False)  # the micro-batches' plans, to diagnose a non-finite loss


class RunLog:
    """Collects the steps' device outcomes and writes their rows at :meth:`flush`.

    Args:
        path: ``metrics.jsonl``; rows after ``start`` are dropped (a resumed run writes them again).
        start: the step the run starts after.
        trackers: an object with ``log(row, step)`` (TensorBoard and the like), or None.
    """

    def __init__(self, path: Path, start: int, trackers=None):
        if start and path.is_file():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= start]
            path.write_text("".join(r + "\n" for r in rows))
        elif not start:
            path.write_text("")
        self.file = path.open("a", encoding="utf-8")
        self.trackers = trackers
        self.pending: list[_Pending] = []
        self.began = time.perf_counter()
        self.examples = self.tokens = 0

    def add(self, step: int, outcome, *, lr: float, stage: int, plans: list) -> None:
        """Record step ``step`` (1-based): its outcome's device tensors and what the host knows."""
        self.examples += outcome.examples
        self.tokens += outcome.tokens
        elapsed = time.perf_counter() - self.began
        host = {"lr": lr, "stage": stage, "examples_per_s": self.examples / elapsed,
                "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed}
        self.pending.append(_Pending(step, outcome.loss, outcome.finite, host, plans))

    def flush(self, extra: Optional[dict] = None) -> tuple[list[dict], Optional[_Pending]]:
        """Write the pending steps' rows (``extra`` joins the last); return the rows and the first
        pending step whose loss was not finite (None if all were). One device read for all."""
        if not self.pending:
            return [], None
        values = torch.stack([torch.stack([p.loss.float(), p.finite.float()]) for p in self.pending]).tolist()
        rows, bad = [], None
        for p, (loss, finite) in zip(self.pending, values):
            if not finite and bad is None:
                bad = p
            rows.append({"step": p.step, "loss": loss, **p.host})
        if extra:
            rows[-1].update(extra)
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
            if self.trackers is not None:
                self.trackers.log(row, row["step"])
        self.file.flush()
        self.pending = []
        return rows, bad

    def close(self) -> None:
        self.file.close()
        if self.trackers is not None:
            self.trackers.close()


__all__ = ["RunLog"]
