"""``--profile N``: a torch.profiler trace of N training steps after two warm-up steps, and a summary a
reader acts on: the top ops by their own time, and how much of the steps' wall time the device
was busy (the rest it waited for the host: launches, syncs, the input pipeline).

    profiler = StepProfiler(run_folder / "profile", steps=5, log=print)
    for ...:                     # the training loop
        train_step(...)
        profiler.step()
    profiler.close()             # writes trace.json (chrome://tracing, Perfetto) and prints the summary
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

WARMUP_STEPS = 2


class StepProfiler:
    """Profiles ``steps`` training steps after :data:`WARMUP_STEPS`; :meth:`step` after each step."""

    def __init__(self, folder: Path, steps: int, log: Callable[[str], None] = print):
        self.folder, self.steps, self.log = Path(folder), steps, log
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profile = profile(
            activities=activities,
            record_shapes=False,
            with_stack=False,
            schedule=schedule(skip_first=WARMUP_STEPS, wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._ready,
        )
        self.profile.__enter__()
        self.done = False

    def step(self) -> None:
        if not self.done:
            self.profile.step()

    def close(self) -> None:
        if not self.done:
            self.profile.__exit__(None, None, None)
            self.done = True

    def _ready(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / "trace.json"
        prof.export_chrome_trace(str(trace))
        cuda = torch.cuda.is_available()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.log(f"profile: {self.steps} step(s) after {WARMUP_STEPS + 1} warm-up, trace {trace}")
        self.log(prof.key_averages().table(sort_by=sort, row_limit=15))
        self.log(overlap_summary(prof.events(), self.steps))
        self.done = True


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def overlap_summary(events, steps: int) -> str:
    """One line: the profiled steps' wall time per step, and the share of it the device was busy."""
    step_spans = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("ProfilerStep")]
    if not step_spans:
        return "profile: no complete step was recorded"
    wall = max(end for _, end in step_spans) - min(start for start, _ in step_spans)
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
    ]
    per_step = wall / max(steps, 1) / 1e3
    if not kernels:
        return f"profile: {per_step:.1f} ms per step on the host; no device kernels (a CPU run)"
    busy = _union_length(kernels)
    return (
        f"profile: {per_step:.1f} ms per step; the device was busy {busy / max(steps, 1) / 1e3:.1f} ms per step "
        f"({100 * busy / wall:.0f}% of the wall time; the rest it waited for the host)"
    )


__all__ = ["StepProfiler", "WARMUP_STEPS", "overlap_summary"]
