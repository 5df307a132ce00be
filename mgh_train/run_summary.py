"""The end-of-run summary line, as transformers' Trainer prints ``train_runtime``,
``train_samples_per_second`` and ``train_loss``."""

from __future__ import annotations

from collections.abc import Sequence


def run_summary(seconds: float, *, steps: int, examples: int, losses: Sequence[float]) -> str:
    """One line: wall time of the run, optimizer steps, training examples per second (queries, all
    processes), the last step's loss and the mean loss over the run's steps (HF's ``train_loss``)."""
    seconds = max(seconds, 1e-9)
    minutes, rest = divmod(seconds, 60)
    parts = [
        f"runtime {int(minutes)}m{rest:04.1f}s",
        f"{steps} steps",
        f"{examples / seconds:.1f} samples/s",
        f"{steps / seconds:.2f} steps/s",
    ]
    if losses:
        parts += [f"final loss {losses[-1]:.4f}", f"mean loss {sum(losses) / len(losses):.4f}"]
    return "train summary: " + ", ".join(parts)


__all__ = ["run_summary"]
