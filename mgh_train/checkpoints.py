"""Run folders and checkpoints: one run per folder, and a resume that checks what it resumes.

A run folder (``--output``) holds one run's state: ``checkpoints/step-N/``, ``metrics.jsonl``,
``model/`` and ``tensorboard/``. :func:`plan_run` decides, before anything heavy runs, what a
new run may do with the folder:

* a fresh run into a folder holding another run's state is refused, naming ``--resume`` and
  ``--overwrite``; ``--overwrite`` deletes that state (saying what), but only once the data and
  the model have loaded, just before the first write, so a run that fails to start loses nothing;
* ``--resume latest`` takes the newest intact checkpoint: a damaged one (a file missing, cut short
  or unreadable) is named, moved aside as ``step-N.damaged`` and the one before it is used;
* ``--resume PATH`` takes that checkpoint or names it damaged. Resuming from a checkpoint older
  than others of the same folder would mix the two futures: refused without ``--overwrite``,
  which deletes the later ones.

A resumed run compares the checkpoint's options (``config.json``, the whole
:class:`~mgh_train.config.TrainConfig`) and training examples (a fingerprint in ``run.json``)
with its own. Options that change the model, the objective or the data order are refused with
the list of differences; the options in :data:`MAY_CHANGE` (steps, the learning-rate schedule,
clipping, logging, evaluation, retention, device) are applied and said. A new ``--lr``,
``--warmup`` or ``--steps`` rebuilds the schedule: the next step takes the rate the new schedule
gives at that step.

Retention (``keep_checkpoints``) deletes only checkpoints older than the one just written, so
the newest is never deleted; 0 keeps them all.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch

CHECKPOINT_FORMAT = "mgh-checkpoint/1"
CHECKPOINT_FILES = ("trainable.pt", "state.pt", "config.json")
RUN_STATE = ("checkpoints", "metrics.jsonl", "model", "tensorboard")  # what a run writes in its folder

MAY_CHANGE = frozenset({
    "steps", "lr", "warmup", "max_grad_norm", "log_every", "save_every", "keep_checkpoints", "eval_every",
    "eval_data_dir", "eval_limit", "progress", "device", "gradient_checkpointing",
    "workers", "max_buckets", "compile", "compile_mode", "profile",  # how it runs, not what it computes
    "data", "public_data",  # file names: their content is compared through the examples' fingerprint
})
"""Options a resumed run may change; every other option must equal the checkpoint's."""
NOT_COMPARED = frozenset({"output", "resume", "overwrite"})


class DamagedCheckpoint(ValueError):
    """A checkpoint folder that cannot be resumed from: a file missing, cut short or unreadable."""


@dataclass
class Checkpoint:
    """A checkpoint read back and checked: its step, states, saved options and data fingerprint."""

    path: Path
    step: int
    trainable: dict
    state: dict
    config: dict
    fingerprint: Optional[str]  # None for checkpoints written before fingerprints were saved


@dataclass
class RunPlan:
    """What a run does with its folder: the checkpoint it resumes, and the state it replaces."""

    output: Path
    checkpoint: Optional[Checkpoint] = None
    changed: list = field(default_factory=list)  # options changed since the checkpoint, applied
    remove: list = field(default_factory=list)  # paths deleted before the first write (--overwrite)
    set_aside: list = field(default_factory=list)  # damaged checkpoints moved to step-N.damaged

    def check_data(self, fingerprint: str, log: Callable[[str], None]) -> None:
        """Refuse to resume on other training examples than the checkpoint's (ValueError)."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        if checkpoint.fingerprint is None:
            log(f"resume: {checkpoint.path} predates data fingerprints; the training data is not compared")
        elif checkpoint.fingerprint != fingerprint:
            raise ValueError(
                f"resume: {checkpoint.path} was trained on other examples than --data/--public-data give now "
                "(the files' content, --holdout, --public-ratio or --skip-bad-rows differ), so the data order "
                "would not continue; resume with the run's data, or start a new run (another --output, or "
                "--overwrite)"
            )

    def clear(self, log: Callable[[str], None]) -> None:
        """Delete what ``--overwrite`` replaces and move damaged checkpoints aside, saying so."""
        for path in self.set_aside:
            target = path.with_name(path.name + ".damaged")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            log(f"resume: moved the damaged checkpoint {path} aside to {target.name}")
        if self.remove:
            described = ", ".join(_describe(p) for p in self.remove)
            for path in self.remove:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            log(f"overwrite: deleted {described} from {self.output}")


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------


def check_output(output: Path) -> None:
    """Make sure ``output`` is (or can become) a folder this process may write to (ValueError if not)."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output: {output} is a file; expected a run folder (new, empty, or one to --resume)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".mgh-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output: cannot write to {output} ({error.strerror or error}); "
                         "expected a folder this user may write to") from None


def list_checkpoints(output: Path) -> list[Path]:
    """The checkpoint folders of ``output``, oldest first."""
    return sorted((output / "checkpoints").glob("step-" + "[0-9]" * 7))


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def run_state(output: Path) -> list[Path]:
    """The state of a run found in ``output``: checkpoints, metrics rows, the model, TensorBoard logs."""
    found = []
    for name in RUN_STATE:
        path = output / name
        if name == "metrics.jsonl":
            if path.is_file() and path.stat().st_size > 0:
                found.append(path)
        elif path.is_dir() and any(path.iterdir()):
            found.append(path)
    return found


def _describe(path: Path) -> str:
    if path.name == "checkpoints":
        steps = [p.name for p in list_checkpoints(path.parent)]
        return f"checkpoints/ ({', '.join(steps) if steps else 'no complete checkpoint'})"
    if path.name == "metrics.jsonl":
        rows = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        return f"metrics.jsonl ({rows} rows)"
    return path.name + ("/" if path.is_dir() else "")


def plan_run(cfg, log: Callable[[str], None]) -> RunPlan:
    """Check ``cfg.output`` and ``cfg.resume`` before anything heavy runs; the :class:`RunPlan`.

    Raises ValueError (a message naming the option) for a folder that is a file or unwritable,
    a fresh run into another run's folder, a damaged or mismatched checkpoint.
    """
    output = Path(cfg.output)
    check_output(output)
    plan = RunPlan(output)
    if not cfg.resume:
        state = run_state(output)
        if state and not cfg.overwrite:
            raise ValueError(
                f"output: {output} holds another run ({', '.join(_describe(p) for p in state)}); pass "
                "--resume latest to continue it, or --overwrite to delete it and start afresh (or choose "
                "another --output)"
            )
        plan.remove = state
        return plan
    checkpoint, damaged = find_checkpoint(cfg.resume, output, log)
    changes = compare_options(checkpoint, cfg)
    if cfg.steps < checkpoint.step:
        raise ValueError(f"steps: expected at least the checkpoint's step {checkpoint.step} to resume "
                         f"{checkpoint.path}, got {cfg.steps}")
    plan.checkpoint, plan.changed = checkpoint, list(changes)
    ours = checkpoint.path.resolve().parent == (output / "checkpoints").resolve()
    if ours:
        plan.set_aside = damaged
        later = [p for p in list_checkpoints(output) if step_of(p) > checkpoint.step and p not in damaged]
        if later and not cfg.overwrite:
            raise ValueError(
                f"resume: {output / 'checkpoints'} holds checkpoints after step {checkpoint.step} "
                f"({', '.join(p.name for p in later)}); resuming from {checkpoint.path.name} would mix the two: "
                "pass --resume latest, or --overwrite to delete the later ones"
            )
        plan.remove = later
    else:
        state = run_state(output)
        if state and not cfg.overwrite:
            raise ValueError(
                f"output: {output} holds another run ({', '.join(_describe(p) for p in state)}) than the "
                f"checkpoint {checkpoint.path}; choose another --output, or --overwrite to delete it"
            )
        plan.remove = state
    if changes:
        log(f"resume: options changed since {checkpoint.path.name}, applied from step {checkpoint.step + 1}: "
            + "; ".join(f"{name} {before!r} -> {now!r}" for name, (before, now) in changes.items()))
    return plan


# --------------------------------------------------------------------------------------------
# reading checkpoints back
# --------------------------------------------------------------------------------------------


def find_checkpoint(resume: str, output: Path, log: Callable[[str], None]) -> tuple[Checkpoint, list[Path]]:
    """The checkpoint ``resume`` names ("latest": the newest intact one of ``output``) and the
    damaged checkpoints passed over on the way (newer than the one returned)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"resume: {path} is not a checkpoint folder (expected 'latest' or a "
                             f"checkpoints/step-N folder holding {', '.join(CHECKPOINT_FILES)})")
        try:
            return read_checkpoint(path), []
        except DamagedCheckpoint as error:
            raise DamagedCheckpoint(f"{error}; resume from another checkpoint (--resume latest takes the "
                                    "newest intact one)") from None
    found = list_checkpoints(output)
    if not found:
        raise ValueError(f"resume: no checkpoint in {output / 'checkpoints'} to resume from")
    damaged = []
    for path in reversed(found):
        try:
            checkpoint = read_checkpoint(path)
        except DamagedCheckpoint as error:
            damaged.append(path)
            log(f"{error}; trying the checkpoint before it")
            continue
        if damaged:
            log(f"resume: falling back to {path}, the newest intact checkpoint")
        return checkpoint, damaged
    raise ValueError(f"resume: every checkpoint in {output / 'checkpoints'} is damaged "
                     f"({', '.join(p.name for p in found)}); start a new run (--overwrite)")


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check one checkpoint folder; :class:`DamagedCheckpoint` says what is wrong with it."""
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"resume: checkpoint {path} is damaged: {', '.join(missing)} missing")
    manifest = {}
    if (path / "run.json").is_file():
        manifest = _read_json(path / "run.json", path)
        for name, size in manifest.get("sizes", {}).items():
            actual = (path / name).stat().st_size if (path / name).is_file() else None
            if actual != size:
                raise DamagedCheckpoint(f"resume: checkpoint {path} is damaged: {name} has {actual} bytes, "
                                        f"{size} were written")
    config = _read_json(path / "config.json", path)
    try:
        trainable = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file fails in many ways; all mean damaged
        raise DamagedCheckpoint(f"resume: checkpoint {path} is damaged: cannot read it "
                                f"({type(error).__name__}: {_first_line(error)})") from None
    expected = {"step", "optimizer", "scheduler", "sampler", "negatives_rng", "rng"}
    if not isinstance(trainable, dict) or not isinstance(state, dict) or not expected <= set(state):
        raise DamagedCheckpoint(f"resume: checkpoint {path} is damaged: its state lacks "
                                f"{', '.join(sorted(expected - set(state if isinstance(state, dict) else ())))}")
    return Checkpoint(path, int(state["step"]), trainable, state, config, manifest.get("data_fingerprint"))


def _read_json(file: Path, checkpoint: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(f"resume: checkpoint {checkpoint} is damaged: {file.name} cannot be read "
                                f"({_first_line(error)})") from None
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"resume: checkpoint {checkpoint} is damaged: {file.name} is not a JSON object")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no message"


def compare_options(checkpoint: Checkpoint, cfg) -> dict:
    """Refuse options that differ from the checkpoint's where they change the model, the objective
    or the data order (ValueError listing them); the changed :data:`MAY_CHANGE` options, as
    ``{name: (before, now)}``."""
    saved = checkpoint.config
    refused, applied = [], {}
    for f in fields(cfg):
        if f.name in NOT_COMPARED:
            continue
        now = getattr(cfg, f.name)
        before = saved.get(f.name, _default(f))  # an option added since the checkpoint: its default
        if _same(before, now):
            continue
        if f.name in MAY_CHANGE:
            applied[f.name] = (before, now)
        else:
            refused.append(f"{f.name} {before!r} -> {now!r}")
    if refused:
        raise ValueError(
            f"resume: {checkpoint.path} was trained with other options, which change the model, the objective "
            f"or the data order: {'; '.join(refused)}. Resume with the run's options, or start a new run "
            "(another --output, or --overwrite)"
        )
    return applied


def _default(f):
    from dataclasses import MISSING

    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _same(before, now) -> bool:
    """Equal as JSON sees them (a tuple and a list with the same items are the same option)."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return plain(before) == plain(now)


def restore_schedule(optimizer, scheduler, lr: float, factor: Callable[[int], float]) -> None:
    """After loading a checkpoint's optimizer and scheduler: take peak rate ``lr`` and the rate
    ``factor`` gives at the next step (the resumed schedule of a changed --lr, --warmup or --steps)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# --------------------------------------------------------------------------------------------
# writing checkpoints
# --------------------------------------------------------------------------------------------


def trainable_state(embedder) -> dict:
    return {n: p.detach().cpu().clone() for n, p in embedder.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_trainable(embedder, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's trainable weights into ``embedder`` (ValueError if they do not fit)."""
    params = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(checkpoint.trainable))
    if missing:
        raise ValueError(f"resume: {checkpoint.path} does not match this model (missing {missing[:3]})")
    wrong = [n for n, p in params.items() if tuple(checkpoint.trainable[n].shape) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"resume: {checkpoint.path} does not match this model ({wrong[0]} has shape "
                         f"{list(checkpoint.trainable[wrong[0]].shape)}, the model's is {list(params[wrong[0]].shape)})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(checkpoint.trainable[name])


def save_checkpoint(folder: Path, *, step: int, embedder, optimizer, scheduler, sampler: dict, cfg,
                    scaler=None, data_fingerprint: Optional[str] = None) -> Path:
    """Write ``folder/checkpoints/step-N`` atomically (a temporary folder renamed into place), then
    delete the oldest checkpoints beyond ``cfg.keep_checkpoints`` (never the one just written).

    ``sampler``: the no-duplicates sampler's and the negatives RNG's state after the step's last
    micro-batch (``{"sampler": ..., "negatives_rng": ...}``, as :class:`mgh_train.batches.Plan`
    carries it: the DataLoader plans ahead of the step)."""
    final = folder / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainable_state(embedder), tmp / "trainable.pt")
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "sampler": sampler["sampler"], "negatives_rng": sampler["negatives_rng"], "rng": rng_state(),
         "scaler": scaler.state_dict() if scaler is not None else None},  # float16's gradient scaler
        tmp / "state.pt",
    )
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "data_fingerprint": data_fingerprint,
                "sizes": {name: (tmp / name).stat().st_size for name in CHECKPOINT_FILES}}
    (tmp / "run.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    apply_retention(folder, step, cfg.keep_checkpoints)
    return final


def apply_retention(folder: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep - 1`` before it (``keep`` 0: keep all)."""
    if not keep:
        return
    older = [p for p in list_checkpoints(folder) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["Checkpoint", "DamagedCheckpoint", "MAY_CHANGE", "RunPlan", "apply_retention", "check_output",
           "compare_options", "find_checkpoint", "list_checkpoints", "load_trainable", "plan_run",
           "read_checkpoint", "restore_schedule", "run_state", "save_checkpoint"]
