"""The run's metric rows: one per optimizer step in ``metrics.jsonl`` (and the trackers), read from
the device only at logging steps.

Each step's loss and finite flag stay on the device; :meth:`RunLog.flush` reads every pending step
in one transfer, writes their rows, and says which step first had a non-finite loss. Throughput
(examples/s, tokens/s: real tokens) is over the whole run so far and the whole job: with several
processes the loss is the mean over the ranks and the tokens their sum, both reduced on the
device by the step (:mod:`mgh_train.distributed`); only rank 0 writes rows, every rank flushes
(and so every rank sees the same non-finite step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class _Pending:
    step: int
    loss: torch.Tensor
    finite: torch.Tensor
    tokens: object  # the step's real tokens: a host int, or a device scalar (the job's, reduced)
    host: dict  # lr, stage, examples/s, elapsed
    plans: list = field(repr=False)  # the micro-batches' plans, to diagnose a non-finite loss


class RunLog:
    """Collects the steps' device outcomes and writes their rows at :meth:`flush`.

    Args:
        path: ``metrics.jsonl``; rows after ``start`` are dropped (a resumed run writes them again).
            None: no rows are written (ranks other than 0).
        start: the step the run starts after.
        trackers: an object with ``log(row, step)`` (TensorBoard and the like), or None.
    """

    def __init__(self, path: Path | None, start: int, trackers=None):
        if path is not None and start and path.is_file():
            rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= start]
            path.write_text("".join(r + "\n" for r in rows))
        elif path is not None and not start:
            path.write_text("")
        self.file = path.open("a", encoding="utf-8") if path is not None else None
        self.trackers = trackers
        self.pending: list[_Pending] = []
        self.began = time.perf_counter()
        self.examples = self.tokens = 0

    def add(self, step: int, outcome, *, lr: float, stage: int, plans: list) -> None:
        """Record step ``step`` (1-based): its outcome's device tensors and what the host knows."""
        self.examples += outcome.examples
        elapsed = time.perf_counter() - self.began
        host = {"lr": lr, "stage": stage, "examples_per_s": self.examples / elapsed, "elapsed_s": elapsed}
        self.pending.append(_Pending(step, outcome.loss, outcome.finite, outcome.tokens, host, plans))

    def flush(self, extra: dict | None = None) -> tuple[list[dict], _Pending | None]:
        """Write the pending steps' rows (``extra`` joins the last); return the rows and the first
        pending step whose loss was not finite (None if all were). One device read for all."""
        if not self.pending:
            return [], None
        values = torch.stack(
            [torch.stack([p.loss.double(), p.finite.double(), _tokens(p.tokens, p.loss)]) for p in self.pending]
        ).tolist()
        rows, bad = [], None
        for p, (loss, finite, tokens) in zip(self.pending, values):
            if not finite and bad is None:
                bad = p
            self.tokens += round(tokens)
            host = dict(p.host)
            elapsed = host.pop("elapsed_s")
            row = {"step": p.step, "loss": loss, **host, "tokens_per_s": self.tokens / elapsed, "elapsed_s": elapsed}
            rows.append(row)
        if extra:
            rows[-1].update(extra)
        for row in rows:
            if self.file is not None:
                self.file.write(json.dumps(row) + "\n")
            if self.trackers is not None:
                self.trackers.log(row, row["step"])
        if self.file is not None:
            self.file.flush()
        self.pending = []
        return rows, bad

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()


def _tokens(tokens, like: torch.Tensor) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.double()
    return torch.full((), float(tokens), dtype=torch.float64, device=like.device)


__all__ = ["RunLog"]
