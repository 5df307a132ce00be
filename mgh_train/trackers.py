"""Experiment trackers a run reports its metric rows to (``--report-to``).

* ``tensorboard``: event files in ``RUN/tensorboard`` (needs ``tensorboard``).
* ``wandb``: Weights & Biases, offline unless ``WANDB_MODE`` says otherwise; the run lives in
  ``RUN/wandb`` (``wandb sync`` uploads it later). Project ``WANDB_PROJECT`` or ``mgh``.
  ``pip install mgh[wandb]``.
* ``mlflow``: MLflow runs in a local store in the run folder unless ``MLFLOW_TRACKING_URI`` names
  another: ``RUN/mlflow.db`` (SQLite) where MLflow's database store is installed (``pip install
  mlflow``), else the file store ``RUN/mlruns`` (``mlflow-skinny``, ``pip install mgh[mlflow]``;
  MLflow 3 keeps that store in maintenance mode, so ``MLFLOW_ALLOW_FILE_STORE`` is set for it).
  ``mlflow ui --backend-store-uri URI`` shows either. Experiment ``MLFLOW_EXPERIMENT_NAME`` or
  ``mgh``.
* ``none``: no tracker (``metrics.jsonl`` is always written).

Without ``--report-to`` a run reports to TensorBoard when it is installed, as before. A tracker
named explicitly that is not installed is an error before training starts. Every tracker gets
the run's options once and each metric row (numbers only) at its step.

The adapters below are ours, not ``accelerate.tracking``'s: those log through accelerate's logger,
which raises unless ``PartialState()`` was set up first, and ``PartialState`` in a torchrun job on
CPUs sets torch's thread count on the one rank that opens trackers and takes its own view of the
process group :mod:`mgh_train.distributed` owns; three thin adapters avoid both.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(report_to: Sequence[str] | None) -> list | None:
    """Validate ``report_to`` (None, or names from TRACKERS, or ["none"]); returns it as a list."""
    if report_to is None:
        return None
    names = list(report_to)
    unknown = [n for n in names if n not in TRACKERS + ("none",)]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ValueError(f"report_to: expected one or more of {', '.join(TRACKERS)}, or none; got {names}")
    return names


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[name]) is not None


def resolve(report_to: Sequence[str] | None) -> list:
    """The trackers a run opens: the default (TensorBoard if installed) or exactly those asked for."""
    names = check_report_to(report_to)
    if names is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    if names == ["none"]:
        return []
    missing = [n for n in names if not _installed(n)]
    if missing:
        extras = ", ".join(f"mgh[{n}]" if n != "tensorboard" else "tensorboard" for n in missing)
        raise ValueError(
            f"report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
            f"(pip install {extras})"
        )
    return list(dict.fromkeys(names))


def _numbers(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(config: dict) -> dict:
    """Tracker-friendly parameters: lists and None as strings (MLflow takes strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class _TensorBoard:
    def __init__(self, folder: Path, config: dict, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, row: dict, step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path, config: dict, name: str):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mgh"),
            name=name,
            dir=str(folder),
            config=config,
            reinit="finish_previous",
        )

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_uri(folder) -> str:
    """The tracking URI of a run in ``folder`` (see the module's docstring)."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(folder).resolve()
    if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
        return f"sqlite:///{folder / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (folder / "mlruns").as_uri()


class _MLflow:
    def __init__(self, folder: Path, config: dict, name: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(mlflow_uri(folder))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mgh"))
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_params(_flat(config))

    def log(self, row: dict, step: int) -> None:
        self.mlflow.log_metrics(row, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The open trackers of a run: ``log(row, step)`` to each, ``close()`` at the end."""

    def __init__(self, names: Sequence[str], folder, config: dict, name: str | None = None):
        folder = Path(folder)
        self.names = list(names)
        self._open = []
        try:
            for tracker in self.names:
                self._open.append(_CLASSES[tracker](folder, config, name or folder.resolve().name))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict, step: int) -> None:
        values = _numbers({k: v for k, v in row.items() if k != "step"})
        for tracker in self._open:
            tracker.log(values, step)

    def close(self) -> None:
        while self._open:
            self._open.pop().close()


def open_trackers(report_to: Sequence[str] | None, folder, config: dict) -> Trackers:
    """Open the trackers ``report_to`` names (see the module's docstring) for a run in ``folder``."""
    return Trackers(resolve(report_to), folder, config)


__all__ = ["TRACKERS", "Trackers", "check_report_to", "mlflow_uri", "open_trackers", "resolve"]
