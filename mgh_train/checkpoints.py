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

With several processes (:mod:`mgh_train.distributed`) rank 0 writes the run's state (``state.pt``:
optimizer, scheduler, the global sampler, the negatives RNG, its own RNG, the world size), every
other rank its RNG state (``rng-R.pt``), into one temporary folder that rank 0 renames into
place once every rank has written (barriers around the rename). Trainable weights are
``trainable.pt`` (rank 0's: the replicas are equal) or, under FSDP2, ``sharded/``: weights and
optimizer state written by every rank through ``torch.distributed.checkpoint``, which any world
size (one process included) reads back. A run resumes at another world size when its global
batch (``--batch-size`` x processes) and its candidate pool are the checkpoint's, and says so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "mgh-checkpoint/1"
CHECKPOINT_FILES = ("trainable.pt", "state.pt", "config.json", "run.json")  # run.json: sizes and data fingerprint
SHARDED = "sharded"  # FSDP2's checkpoints: torch.distributed.checkpoint's folder instead of trainable.pt
RUN_STATE = ("checkpoints", "metrics.jsonl", "model", "tensorboard")  # what a run writes in its folder

MAY_CHANGE = frozenset(
    {
        "steps",
        "lr",
        "warmup",
        "max_grad_norm",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "eval_data_dir",
        "eval_limit",
        "progress",
        "device",
        "gradient_checkpointing",
        "workers",
        "max_buckets",
        "dist_timeout",
        "compile",
        "compile_mode",
        "profile",  # how it runs, not what it computes
        "parallel",
        "chunk_size",
        "chunk_tokens",  # the engines and GradCache compute the same step
        "packing",
        "max_tokens_per_forward",  # packed rows: the same step as the padded buckets
        "data",
        "public_data",  # file names: their content is compared through the examples' fingerprint
    }
)
"""Options a resumed run may change; every other option must equal the checkpoint's."""
NOT_COMPARED = frozenset({"output", "resume", "overwrite"})
PER_WORLD = frozenset({"batch_size", "gather"})  # compared as the global batch and its candidate pool


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
    fingerprint: str  # of the training examples (mgh_train.data.fingerprint)
    world: int = 1  # the processes that wrote it

    @property
    def sharded(self) -> bool:
        """Whether its weights and optimizer are FSDP2's shards (``sharded/``, no ``trainable.pt``)."""
        return self.trainable is None


@dataclass
class RunPlan:
    """What a run does with its folder: the checkpoint it resumes, and the state it replaces."""

    output: Path
    checkpoint: Checkpoint | None = None
    changed: list = field(default_factory=list)  # options changed since the checkpoint, applied
    remove: list = field(default_factory=list)  # paths deleted before the first write (--overwrite)
    set_aside: list = field(default_factory=list)  # damaged checkpoints moved to step-N.damaged
    notes: list = field(default_factory=list)  # said by check_data once the data is known to match

    def check_data(self, fingerprint: str, log: Callable[[str], None]) -> None:
        """Refuse to resume on other training examples than the checkpoint's (ValueError)."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        if checkpoint.fingerprint != fingerprint:
            raise ValueError(
                f"resume: {checkpoint.path} was trained on other examples than --data/--public-data give now "
                "(the files' content, --holdout, --public-ratio or --skip-bad-rows differ), so the data order "
                "would not continue; resume with the run's data, or start a new run (another --output, or "
                "--overwrite)"
            )
        for note in self.notes:  # "options changed ... applied": only once the resume is sure to go on
            log(note)
        self.notes = []

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
        raise ValueError(
            f"output: cannot write to {output} ({error.strerror or error}); expected a folder this user may write to"
        ) from None


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


def plan_run(cfg, log: Callable[[str], None], world: int = 1) -> RunPlan:
    """Check ``cfg.output`` and ``cfg.resume`` before anything heavy runs; the :class:`RunPlan`
    (``world``: the processes of this run).

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
    changes = compare_options(checkpoint, cfg, world)
    if cfg.steps < checkpoint.step:
        raise ValueError(
            f"steps: expected at least the checkpoint's step {checkpoint.step} to resume "
            f"{checkpoint.path}, got {cfg.steps}"
        )
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
        plan.notes.append(
            f"resume: options changed since {checkpoint.path.name}, applied from step {checkpoint.step + 1}: "
            + "; ".join(f"{name} {before!r} -> {now!r}" for name, (before, now) in changes.items())
        )
    if world != checkpoint.world:
        log(
            f"resume: {checkpoint.path.name} was written by {checkpoint.world} process(es) of batch "
            f"{checkpoint.config.get('batch_size')}, this run is {world} of batch {cfg.batch_size}: the global batch "
            f"({cfg.batch_size * world}) is unchanged, so the data, the negatives and the losses continue; "
            "dropout's random state restarts from the seed on the ranks the checkpoint holds none for"
        )
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
            raise ValueError(
                f"resume: {path} is not a checkpoint folder (expected 'latest' or a "
                f"checkpoints/step-N folder holding {', '.join(CHECKPOINT_FILES)})"
            )
        try:
            return read_checkpoint(path), []
        except DamagedCheckpoint as error:
            raise DamagedCheckpoint(
                f"{error}; resume from another checkpoint (--resume latest takes the newest intact one)"
            ) from None
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
    raise ValueError(
        f"resume: every checkpoint in {output / 'checkpoints'} is damaged "
        f"({', '.join(p.name for p in found)}); start a new run (--overwrite)"
    )


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check one checkpoint folder; :class:`DamagedCheckpoint` says what is wrong with it."""
    sharded = (path / SHARDED).is_dir()
    wanted = (
        [n for n in CHECKPOINT_FILES if n != "trainable.pt"] + [f"{SHARDED}/.metadata"] if sharded else CHECKPOINT_FILES
    )
    missing = [name for name in wanted if not (path / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"resume: checkpoint {path} is damaged: {', '.join(missing)} missing")
    manifest = _read_json(path / "run.json", path)
    if not isinstance(manifest.get("data_fingerprint"), str) or not isinstance(manifest.get("sizes"), dict):
        raise DamagedCheckpoint(
            f"resume: checkpoint {path} is damaged: run.json lacks the data fingerprint or the files' sizes"
        )
    for name, size in manifest["sizes"].items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            raise DamagedCheckpoint(
                f"resume: checkpoint {path} is damaged: {name} has {actual} bytes, {size} were written"
            )
    config = _read_json(path / "config.json", path)
    try:
        trainable = None if sharded else torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file fails in many ways; all mean damaged
        raise DamagedCheckpoint(
            f"resume: checkpoint {path} is damaged: cannot read it ({type(error).__name__}: {_first_line(error)})"
        ) from None
    expected = {"step", "optimizer", "scheduler", "sampler", "negatives_rng", "rng", "world_size"}
    if not (sharded or isinstance(trainable, dict)) or not isinstance(state, dict) or not expected <= set(state):
        raise DamagedCheckpoint(
            f"resume: checkpoint {path} is damaged: its state lacks "
            f"{', '.join(sorted(expected - set(state if isinstance(state, dict) else ())))}"
        )
    return Checkpoint(
        path, int(state["step"]), trainable, state, config, manifest["data_fingerprint"], int(state["world_size"])
    )


def _read_json(file: Path, checkpoint: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(
            f"resume: checkpoint {checkpoint} is damaged: {file.name} cannot be read ({_first_line(error)})"
        ) from None
    if not isinstance(value, dict):
        raise DamagedCheckpoint(f"resume: checkpoint {checkpoint} is damaged: {file.name} is not a JSON object")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no message"


def compare_options(checkpoint: Checkpoint, cfg, world: int = 1) -> dict:
    """Refuse options that differ from the checkpoint's where they change the model, the objective
    or the data order (ValueError listing them); the changed :data:`MAY_CHANGE` options, as
    ``{name: (before, now)}``. ``batch_size`` and ``gather`` are compared as what they make of
    ``world`` processes: the global batch, and whether every query's candidates are all of it."""
    options = {f.name: f for f in fields(cfg)}
    saved = {name: checkpoint.config.get(name, _default(f)) for name, f in options.items()}
    refused, applied = _per_world_changes(saved, checkpoint.world, cfg, world), {}
    for name in options:
        if name in NOT_COMPARED or name in PER_WORLD:
            continue
        now, before = getattr(cfg, name), saved[name]
        if _same(before, now):
            continue
        if name in MAY_CHANGE:
            applied[name] = (before, now)
        else:
            refused.append(f"{name} {before!r} -> {now!r}")
    if refused:
        raise ValueError(
            f"resume: {checkpoint.path} was trained with other options, which change the model, the objective "
            f"or the data order: {'; '.join(refused)}. Resume with the run's options, or start a new run "
            "(another --output, or --overwrite)"
        )
    return applied


def _per_world_changes(saved: dict, saved_world: int, cfg, world: int) -> list:
    """The refused changes of :data:`PER_WORLD`: the global batch (``batch_size`` x processes) and
    whether each query's candidates are the whole global batch (``gather``)."""
    refused = []
    before_batch, now_batch = saved["batch_size"] * saved_world, cfg.batch_size * world
    if before_batch != now_batch and saved_world == world:
        refused.append(f"batch_size {saved['batch_size']!r} -> {cfg.batch_size!r}")
    elif before_batch != now_batch:
        refused.append(
            f"the global batch (batch_size x processes) {saved['batch_size']} x {saved_world} "
            f"= {before_batch} -> {cfg.batch_size} x {world} = {now_batch}"
        )
    before_pool, now_pool = _pool(saved["gather"], saved_world), _pool(cfg.gather, world)
    if before_pool != now_pool:
        refused.append(f"gather: each query's candidates {before_pool} -> {now_pool}")
    return refused


def _pool(gather: bool | None, world: int) -> str:
    return "the whole global batch" if world == 1 or gather is not False else "the process's own batch"


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


def rank_rng_state(checkpoint: Checkpoint, rank: int, world: int) -> dict | None:
    """Rank ``rank``'s RNG state in ``checkpoint`` (rank 0's is in ``state.pt``), or None where it
    holds none for it or was written by another world size."""
    if rank == 0:
        return checkpoint.state["rng"]
    file = checkpoint.path / f"rng-{rank}.pt"
    if world != checkpoint.world or not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=False)


def load_weights_and_optimizer(embedder, optimizer, checkpoint: Checkpoint, *, sharded: bool) -> None:
    """The checkpoint's trainable weights and optimizer state into ``embedder`` and ``optimizer``,
    whichever engine wrote it and whichever runs now (``sharded``: FSDP2's DTensor weights)."""
    if checkpoint.sharded:
        _load_sharded(embedder, optimizer, checkpoint)
        return
    load_trainable(embedder, checkpoint)
    if not sharded:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in embedder.named_parameters() if p.requires_grad]  # the optimizer's order
    state = checkpoint.state["optimizer"]
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(embedder, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _load_sharded(embedder, optimizer, checkpoint: Checkpoint) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(embedder, optimizer)
    try:
        dcp.load(state, checkpoint_id=checkpoint.path / SHARDED)
    except Exception as error:  # noqa: BLE001 - DCP reports a mismatch in several exception types
        raise ValueError(
            f"resume: {checkpoint.path} does not match this model ({type(error).__name__}: {_first_line(error)})"
        ) from None
    set_model_state_dict(embedder, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(
        embedder, optimizer, state["optimizer"], options=StateDictOptions(ignore_frozen_params=True)
    )


def _sharded_state(embedder, optimizer) -> dict:
    """FSDP2's checkpoint state: the trainable weights' and the optimizer's shards of this rank, as
    ``torch.distributed.checkpoint`` saves them and loads into them in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    return {
        "model": get_model_state_dict(embedder, options=options),
        "optimizer": get_optimizer_state_dict(embedder, optimizer, options=options),
    }


def load_trainable(embedder, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's trainable weights into ``embedder`` (ValueError if they do not fit)."""
    params = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(checkpoint.trainable))
    if missing:
        raise ValueError(f"resume: {checkpoint.path} does not match this model (missing {missing[:3]})")
    wrong = [n for n, p in params.items() if tuple(checkpoint.trainable[n].shape) != tuple(p.shape)]
    if wrong:
        raise ValueError(
            f"resume: {checkpoint.path} does not match this model ({wrong[0]} has shape "
            f"{list(checkpoint.trainable[wrong[0]].shape)}, the model's is {list(params[wrong[0]].shape)})"
        )
    if any(type(p).__name__ == "DTensor" for p in params.values()):  # FSDP2: each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            embedder,
            {n: checkpoint.trainable[n] for n in params},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        return
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(checkpoint.trainable[name])


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    embedder,
    optimizer,
    scheduler,
    sampler: dict,
    cfg,
    scaler=None,
    data_fingerprint: str | None = None,
    ranks=None,
    sharded: bool = False,
) -> Path:
    """Write ``folder/checkpoints/step-N`` atomically (a temporary folder renamed into place), then
    delete the oldest checkpoints beyond ``cfg.keep_checkpoints`` (never the one just written).

    ``sampler``: the no-duplicates sampler's and the negatives RNG's state after the step's last
    micro-batch (``{"sampler": ..., "negatives_rng": ...}``, as :class:`mgh_train.batches.Plan`
    carries it: the DataLoader plans ahead of the step). With ``ranks`` (:class:`mgh_train.
    distributed.Ranks`) of several processes every rank calls it: rank 0 writes the run's state,
    each other rank its RNG state, and ``sharded`` (FSDP2) weights and optimizer go through
    ``torch.distributed.checkpoint`` from every rank."""
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    barrier = ranks.barrier if ranks is not None else (lambda: None)
    final = folder / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()  # the folder is there, empty
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(embedder, optimizer), checkpoint_id=tmp / SHARDED)
    if rank > 0:
        torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    else:
        _write_run_state(tmp, step, embedder, optimizer, scheduler, sampler, cfg, scaler, world, sharded)
    barrier()  # every rank's files are written
    if rank == 0:
        _publish(tmp, final, step, data_fingerprint, world)
        apply_retention(folder, step, cfg.keep_checkpoints)
    barrier()  # no rank goes on (or reads the folder) before the rename
    return final


def _write_run_state(tmp: Path, step, embedder, optimizer, scheduler, sampler, cfg, scaler, world, sharded) -> None:
    """Rank 0's share of a checkpoint: the trainable weights (unless FSDP2 wrote them sharded), the
    optimizer, schedule, sampler and RNG state, and the run's options."""
    if not sharded:
        torch.save(trainable_state(embedder), tmp / "trainable.pt")
    state = {
        "step": step,
        "optimizer": None if sharded else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler["sampler"],
        "negatives_rng": sampler["negatives_rng"],
        "rng": rng_state(),
        "world_size": world,
        "scaler": scaler.state_dict() if scaler is not None else None,  # float16's gradient scaler
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _publish(tmp: Path, final: Path, step: int, data_fingerprint, world: int) -> None:
    """The manifest (every file's size, for the damage check on resume) written last, then the
    temporary folder renamed into place."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "data_fingerprint": data_fingerprint,
        "world_size": world,
        "sizes": {str(p.relative_to(tmp)): p.stat().st_size for p in files},
    }
    (tmp / "run.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def apply_retention(folder: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep - 1`` before it (``keep`` 0: keep all)."""
    if not keep:
        return
    older = [p for p in list_checkpoints(folder) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "Checkpoint",
    "DamagedCheckpoint",
    "MAY_CHANGE",
    "RunPlan",
    "apply_retention",
    "check_output",
    "compare_options",
    "find_checkpoint",
    "list_checkpoints",
    "load_trainable",
    "load_weights_and_optimizer",
    "plan_run",
    "rank_rng_state",
    "read_checkpoint",
    "restore_schedule",
    "run_state",
    "save_checkpoint",
]
