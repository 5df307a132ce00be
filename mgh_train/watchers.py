"""What watches the training steps go by without changing them: the metric rows (``metrics.jsonl``
and the trackers, :mod:`mgh_train.metrics`), the progress bar (:mod:`mgh_train.progress`) and the
profiler (:mod:`mgh_train.profiling`), opened and closed together.

    with Watchers(cfg, ranks, start, log) as watch:
        for step in ...:
            outcome = train_step(batches)
            watch.step(step, outcome, lr=lr, batches=batches)   # no device read
            rows, bad = watch.flush()                            # at a logging step: one read

Only rank 0 writes rows, draws the bar and profiles; every rank flushes (each step's loss and
finite flag are reduced over the ranks on the device), so every rank sees the same non-finite step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .distributed import Ranks
from .metrics import RunLog
from .profiling import StepProfiler
from .progress import TrainBar
from .trackers import open_trackers


class Watchers:
    """The run log, the bar (``--progress``) and the profiler (``--profile``) of a run starting after
    step ``start``; a context manager that closes them all."""

    def __init__(self, cfg, ranks: Ranks, start: int, log: Callable[[str], None]):
        output, main = Path(cfg.output), ranks.main
        self.run_log = RunLog(
            output / "metrics.jsonl" if main else None,
            start,
            open_trackers(cfg.report_to, output, cfg.to_dict()) if main else None,
        )
        self.profiler = StepProfiler(output / "profile", cfg.profile, log) if cfg.profile and main else None
        self.bar = TrainBar(cfg.steps, start) if cfg.progress and main else None

    def step(self, step: int, outcome, *, lr: float, batches: list) -> None:
        """Record step ``step`` (1-based): its :class:`~mgh_train.step.StepOutcome` (device tensors,
        not read) and the micro-batches it trained on."""
        self.run_log.add(step, outcome, lr=lr, stage=batches[0].plan.stage, plans=[b.plan for b in batches])
        if self.bar is not None:
            self.bar.step(outcome.loss)
        if self.profiler is not None:
            self.profiler.step()

    def flush(self, extra: dict | None = None):
        """:meth:`RunLog.flush <mgh_train.metrics.RunLog.flush>`: the pending steps' rows (``extra``
        joins the last) and the first non-finite step (None if none); the bar shows the last row."""
        rows, bad = self.run_log.flush(extra)
        if bad is None and rows and self.bar is not None:
            self.bar.logged(rows[-1])
        return rows, bad

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        if self.bar is not None:
            self.bar.close()
        self.run_log.close()

    def __enter__(self) -> Watchers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Watchers"]
