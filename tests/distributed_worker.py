"""One rank of the distributed tests (tests/test_distributed.py): ``python distributed_worker.py
SCENARIO[,SCENARIO...] FOLDER`` under the launch variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) that the test sets, as torchrun would. Each scenario runs several trainer
runs in one process group (a process costs seconds to start; one launch runs several scenarios, in
order) and what they saw goes to ``FOLDER/rank-R.pt``, ``{scenario: result}``, for the test to
compare with one process.

Kernels run on their PyTorch CPU path (the cpu_kernels fixture's choice), as in the one-process
runs the test compares with.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_cases import CASES, GradientTap, config, tiny_embedder
from mgh_kernels import use_backend
from mgh_train import trainer
from mgh_train.step import TrainStep


def trainable(embedder) -> dict:
    """Whole trainable weights (FSDP2's DTensors gathered: every rank calls this)."""
    out = {}
    for name, p in embedder.named_parameters():
        if p.requires_grad:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = value.detach().cpu().clone()
    return out


class SyncCount:
    """Counts the gradient syncs: all-reduces of the flat trainable gradients (replicate) and the
    reduce-scatters FSDP2 makes of its groups' gradients, per optimizer step."""

    def __init__(self):
        self.per_step, self.current = [], {"all_reduce": [], "reduce_scatter": 0}
        self.real_all_reduce, self.real_reduce_scatter = dist.all_reduce, dist.reduce_scatter_single
        self.real_call = TrainStep.__call__
        counter = self

        def all_reduce(tensor, *args, **kwargs):
            counter.current["all_reduce"].append((tensor.numel(), str(tensor.dtype)))
            return counter.real_all_reduce(tensor, *args, **kwargs)

        def reduce_scatter(*args, **kwargs):
            counter.current["reduce_scatter"] += 1
            return counter.real_reduce_scatter(*args, **kwargs)

        def step(self_, batches):
            counter.current = {"all_reduce": [], "reduce_scatter": 0}
            outcome = counter.real_call(self_, batches)
            counter.per_step.append(counter.current)
            return outcome

        dist.all_reduce, dist.reduce_scatter_single, TrainStep.__call__ = all_reduce, reduce_scatter, step

    def close(self):
        dist.all_reduce, dist.reduce_scatter_single = self.real_all_reduce, self.real_reduce_scatter
        TrainStep.__call__ = self.real_call


def equalities(folder: Path, rank: int) -> dict:
    """Each case of dist_cases.CASES at batch b per rank: its losses, its weights after the run and
    the gradient syncs of each step (``MGH_CASES=a,b``: those cases only, to debug one)."""
    out = {}
    only = os.environ.get("MGH_CASES")
    for name, case in CASES.items():
        if only and name not in only.split(","):
            continue
        embedder = tiny_embedder(**case["model"])
        counter = SyncCount()
        try:
            with GradientTap() as tap:
                result = trainer.train(
                    config(folder / name, **case["train"], **case["world"]),
                    embedder=embedder,
                    log=lambda _: None,
                    report_accuracy=False,
                )
        finally:
            counter.close()
        out[name] = {
            "losses": result.losses,
            "weights": trainable(embedder),
            "syncs": counter.per_step,
            "grads": tap.grads,
        }
    return out


class Killed(Exception):
    """Stands for the job being killed right after a checkpoint."""


def checkpoints(folder: Path, rank: int) -> dict:
    """Per engine: a whole 4-step run, one killed after its step-2 checkpoint, and that one resumed."""
    from mgh_train import trainer as module

    out = {}
    real_save = module.save_checkpoint
    for name, extra in (("replicate", {}), ("fsdp", {"parallel": "fsdp"}), ("gradcache", {"chunk_size": 3})):
        options = dict(steps=4, save_every=2, keep_checkpoints=0, batch_size=3, schedule="random", **extra)
        whole = trainer.train(
            config(folder / f"{name}-whole", **options),
            embedder=tiny_embedder(),
            log=lambda _: None,
            report_accuracy=False,
        )

        def save_then_die(*args, **kwargs):
            path = real_save(*args, **kwargs)
            if kwargs["step"] == 2:
                raise Killed(path)
            return path

        module.save_checkpoint = save_then_die
        try:
            trainer.train(
                config(folder / f"{name}-killed", **options),
                embedder=tiny_embedder(),
                log=lambda _: None,
                report_accuracy=False,
            )
            raise AssertionError("the run was not killed")
        except Killed:
            pass
        finally:
            module.save_checkpoint = real_save
        lines = []
        resumed = trainer.train(
            config(folder / f"{name}-killed", resume="latest", **options),
            embedder=tiny_embedder(lora_seed=7),
            log=lines.append,
            report_accuracy=False,
        )
        rows = (
            [json.loads(r) for r in (folder / f"{name}-killed" / "metrics.jsonl").read_text().splitlines()]
            if rank == 0
            else []
        )
        out[name] = {
            "whole": whole.losses,
            "resumed": resumed.losses,
            "start": resumed.start_step,
            "rows": rows,
            "log": lines,
        }
    return out


def failures(folder: Path, rank: int) -> dict:
    """Mismatched shapes across the ranks, and a NaN loss on rank 1 only."""
    out = {}
    # D: rank 1's base model is wider
    try:
        trainer.train(
            config(folder / "width"),
            embedder=tiny_embedder(hidden=48 if rank == 1 else 32),
            log=lambda _: None,
            report_accuracy=False,
        )
        out["width"] = None
    except ValueError as error:
        out["width"] = str(error)
    # K: rank 1 trains with all four negatives per query, rank 0 with one
    try:
        trainer.train(
            config(folder / "negatives", schedule="all" if rank == 1 else "level:1"),
            embedder=tiny_embedder(),
            log=lambda _: None,
            report_accuracy=False,
        )
        out["negatives"] = None
    except ValueError as error:
        out["negatives"] = str(error)
    # NaN: rank 1's loss at step 2 (its update is skipped on both ranks, both stop at step 2)
    for engine in ("replicate", "fsdp"):
        real = trainer.gathered_infonce
        calls = []

        def poisoned(*args, **kwargs):
            loss = real(*args, **kwargs)
            calls.append(1)
            return loss * float("nan") if rank == 1 and len(calls) == 2 else loss

        trainer.gathered_infonce = poisoned
        embedder = tiny_embedder()
        snapshots = []
        real_call = TrainStep.__call__

        def step(self_, batches):
            snapshots.append(trainable(embedder))
            return real_call(self_, batches)

        TrainStep.__call__ = step
        try:
            trainer.train(
                config(folder / f"nan-{engine}", steps=3, log_every=1, parallel=engine),
                embedder=embedder,
                log=lambda _: None,
                report_accuracy=False,
            )
            out[engine] = {"error": None}
        except trainer.NonFiniteTraining as error:
            after = trainable(embedder)
            out[engine] = {
                "error": str(error),
                "step": error.step,
                "unchanged": all(torch.equal(after[n], snapshots[1][n]) for n in after),
                "steps_run": len(snapshots),
            }
        finally:
            trainer.gathered_infonce = real
            TrainStep.__call__ = real_call
    return out


SCENARIOS = {"equalities": equalities, "checkpoints": checkpoints, "failures": failures}


def main() -> None:
    scenarios, folder = sys.argv[1].split(","), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with use_backend("torch"):  # the cpu_kernels fixture's choice (this worker's tensors are on the CPU)
        result = {scenario: SCENARIOS[scenario](folder, rank) for scenario in scenarios}
    torch.save(result, folder / f"rank-{rank}.pt")
    dist.barrier()
    # Both ranks' results are on disk. Skip gloo's teardown and the interpreter's: with torch 2.13 it
    # sometimes aborts ("terminate called without an active exception"; tests/test_infonce.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
