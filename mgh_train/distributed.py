"""Training past one process: the process group, the ranks, the two engines and the reductions
the loop needs, all from PyTorch's own stack.

    ranks = setup(cfg.device, log)                 # torchrun's RANK, WORLD_SIZE, ... -> a process group
    with ranks.same_outcome():                     # a ValueError on one rank is raised on every rank
        ...                                        # (no collectives inside)
    ranks.agree({"embedding dimension D": 4096})   # ValueError on every rank where they differ
    engine = make_engine(cfg.parallel, ranks, embedder, precision)
    with engine.gradient_sync(last):               # around each backward of a step
        loss.backward()
    engine.finish_gradients()                      # replicate: the step's one all-reduce
    loss, finite, tokens = engine.reduce(loss, finite, tokens)   # on the device, no host sync

Any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
(torchrun on one or many nodes, ``accelerate launch``, torchrun inside a SLURM job) starts a data
parallel run: NCCL between CUDA devices (process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``), gloo
between CPU processes. Without them nothing changes: one process, no process group.

Engines (``--parallel``):

* ``replicate`` (the default): every rank holds the whole model. The trainable weights start from
  rank 0's (one broadcast); after the step's last backward, one flat all-reduce averages their
  gradients (DDP would do the same with hooks and ``no_sync``; with GradCache's several backward
  passes per step, one explicit all-reduce is simpler and is exactly one sync per step).
* ``fsdp``: FSDP2, ``fully_shard`` on every decoder layer and on the embedder, LoRA and frozen weights
  sharded together, a ``MixedPrecisionPolicy`` in the run's autocast dtype (bfloat16 on a GPU) that
  reduces gradients in float32. Gradients are reduce-scattered in the step's last backward only
  (``set_requires_gradient_sync``). Every forward is collective, so evaluation runs on every rank.

The loss (each rank's micro-batch mean) is averaged over the ranks and the finite flag combined
on the device in one small all-reduce per step; a non-finite loss on any rank skips the update
on every rank, and every rank stops with the same message at the next logging step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENGINES = ("replicate", "fsdp")


def _silent(_: str) -> None:
    pass


@dataclass
class Ranks:
    """This process's place in the job.

    Attributes:
        rank, world: its rank and the number of processes (1: no process group).
        local_rank: its index on its node (the CUDA device it takes).
        device: the device it trains on.
        owned: whether :func:`setup` created the process group (and :meth:`close` ends it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, shows the progress bar, evaluates and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def main_only(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0, a no-op elsewhere."""
        return log if self.main else _silent

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """End the process group if :func:`setup` made it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False

    @contextlib.contextmanager
    def same_outcome(self):
        """A ValueError raised inside the block on any rank is raised on every rank, with the message
        of the lowest rank that failed, when every rank has left the block: no rank waits forever in
        a collective for one that stopped. The block itself must hold no collective."""
        if not self.distributed:
            yield
            return
        error = None
        try:
            yield
        except ValueError as raised:
            error = raised
        messages: list = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return
        rank, message = failed[0]
        if error is not None and rank == self.rank:
            raise error
        raise ValueError(message) from error

    def agree(self, facts: dict) -> None:
        """Check that every rank holds the same ``facts`` (a name -> a value); ValueError, with the
        same message on every rank, naming each fact that differs and its value on every rank."""
        if not self.distributed:
            return
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, facts)
        names = list(dict.fromkeys(name for values in everyone for name in values))
        differ = [name for name in names if any(values.get(name) != everyone[0].get(name) for values in everyone)]
        if differ:
            what = "; ".join(
                f"{name} (" + ", ".join(f"rank {r}: {values.get(name)!r}" for r, values in enumerate(everyone)) + ")"
                for name in differ
            )
            raise ValueError(
                f"world: the {self.world} processes disagree on {what}; every process must run the "
                "same command on the same data and base model"
            )


def launched() -> bool:
    """Whether a launcher asked for more than one process (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected a number of processes, got {os.environ['WORLD_SIZE']!r}") from None


def setup(device_name: str | None, log: Callable[[str], None] = print, timeout: float | None = None) -> Ranks:
    """This process's :class:`Ranks`, the process group initialised where a launcher asked for one.

    Under a launcher (``WORLD_SIZE`` > 1) the device is ``cuda:LOCAL_RANK`` with CUDA (``device_name``
    may say ``cuda`` or ``cpu``, not a device index), the CPU otherwise, and the group uses NCCL or
    gloo to match. A process group made before (a test, a notebook) is used as it is. One process
    with several GPUs in view is told how to use them all.
    """
    from .checks import check_device

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Ranks(rank, world, local, _rank_device(device_name, local, world), owned=False)
    if not launched():
        device = check_device(device_name)
        visible = torch.cuda.device_count() if device.type == "cuda" else 0
        if visible > 1:
            log(
                f"note: {visible} GPUs are visible but this is one process, on {device}; to train on all of them "
                f"run the same command as torchrun --nproc-per-node {visible} -m mgh_train train ... "
                "(--batch-size is per process; see README, Training on many GPUs)"
            )
        return Ranks(device=device)
    missing = [name for name in LAUNCH_VARIABLES if name != "LOCAL_RANK" and not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE: {os.environ['WORLD_SIZE']} processes asked for, but {', '.join(missing)} "
            "unset; start the run with torchrun (or another launcher that sets "
            f"{', '.join(LAUNCH_VARIABLES)})"
        )
    if not dist.is_available():
        raise ValueError("WORLD_SIZE: this torch build has no torch.distributed; run one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = _rank_device(device_name, local, world)
    from . import peers

    wait = peers.group_timeout(timeout)  # every collective's bound, the rendezvous's too (--dist-timeout)
    ranks = Ranks(rank, world, local, device, owned=True)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=wait)
        else:
            dist.init_process_group("gloo", timeout=wait)
        peers.register(ranks)
    except Exception as error:  # a rank that never joins fails the rendezvous in several ways
        lost = peers.explain(error, ranks, timeout=wait.total_seconds(), before_start=True)
        if lost is None:
            raise
        raise lost from None
    return ranks


def _rank_device(device_name: str | None, local: int, world: int) -> torch.device:
    from .checks import check_device

    device = check_device(device_name)
    if world == 1:
        return device
    if device.type == "cuda":
        if device_name is not None and device.index is not None:
            raise ValueError(
                f"device: {device_name!r} names one GPU, but with {world} processes process "
                "LOCAL_RANK takes cuda:LOCAL_RANK; pass --device cuda (or leave it unset)"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"device: LOCAL_RANK {local} has no GPU here ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local)
    if device.type != "cpu":
        raise ValueError(f"device: {device.type} has no process-group backend here; train on cuda (NCCL) or cpu (gloo)")
    return device


# --------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------


class Single:
    """One process: nothing to synchronise."""

    name = "single"
    sharded = False  # whether the weights are DTensor shards (checkpoints through DCP)
    collective_forward = False  # whether every forward needs every rank (evaluation runs everywhere)

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def gradient_sync(self, enabled: bool):
        """The context of one backward pass: whether it is the step's last (which syncs)."""
        return contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """After the step's last backward: the gradients are the job's from here on."""

    def reduce(self, loss: torch.Tensor, finite: torch.Tensor, tokens):
        """(the mean loss over ranks, finite on every rank, the job's tokens), on the device."""
        return loss, finite, tokens

    def whole_forward(self, context):
        """``context`` (a context manager), in which the embedder's inner model may run on its own
        (not through the embedder's call): FSDP2 gathers the root's own weights for it."""
        return context


class Replicate(Single):
    """A whole model per rank: trainable weights broadcast from rank 0 once, gradients averaged by
    one flat all-reduce (per dtype; LoRA's weights are all float32) per optimizer step."""

    name = "replicate"

    def __init__(self, ranks: Ranks, params: list):
        super().__init__(ranks)
        self.params = list(params)
        _broadcast(self.params)

    def finish_gradients(self) -> None:
        for group in _by_dtype(self.params):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)  # SUM: gloo has no AVG
            flat.mul_(1.0 / self.ranks.world)
            for p, value in zip(group, torch._utils._unflatten_dense_tensors(flat, grads)):
                if p.grad is None:
                    p.grad = value
                else:
                    p.grad.copy_(value)

    def reduce(self, loss, finite, tokens):
        return _reduce_outcome(self.ranks, loss, finite, tokens)


class FSDP(Single):
    """FSDP2: ``fully_shard`` on every decoder layer, then on the embedder (the root); LoRA and frozen
    weights sharded together. ``param_dtype`` is the run's autocast dtype (None: as stored), and
    gradients reduce in float32."""

    name = "fsdp"
    sharded = True
    collective_forward = True

    def __init__(self, ranks: Ranks, embedder, precision):
        super().__init__(ranks)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.embedder = embedder
        _broadcast([p for p in embedder.parameters() if p.requires_grad])
        policy = MixedPrecisionPolicy(param_dtype=precision.autocast, reduce_dtype=torch.float32)
        for layer in decoder_layers(embedder.model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(embedder, mp_policy=policy)

    def gradient_sync(self, enabled: bool):
        self.embedder.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def whole_forward(self, context):
        self.embedder.unshard()  # the root's embeddings and norm (the layers gather their own)
        try:
            with context:
                yield
        finally:
            self.embedder.reshard()

    def reduce(self, loss, finite, tokens):
        return _reduce_outcome(self.ranks, loss, finite, tokens)


def make_engine(kind: str | None, ranks: Ranks, embedder, precision) -> Single:
    """The engine ``--parallel`` names (None: replicate) for a run of ``ranks.world`` processes;
    one process runs :class:`Single` whatever it says."""
    if not ranks.distributed:
        return Single(ranks)
    if (kind or "replicate") == "replicate":
        return Replicate(ranks, [p for p in embedder.parameters() if p.requires_grad])
    return FSDP(ranks, embedder, precision)


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model (peft-wrapped or not): the modules whose class the
    model lists in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"parallel: fsdp shards a model per decoder layer, but {type(base).__name__} names none "
            "(_no_split_modules); use --parallel replicate"
        )
    return layers


def _by_dtype(params: list) -> list:
    groups: dict = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def _broadcast(params: list) -> None:
    """Rank 0's values of ``params`` on every rank (one flat broadcast per dtype)."""
    with torch.no_grad():
        for group in _by_dtype(params):
            flat = torch._utils._flatten_dense_tensors([p.detach() for p in group])
            dist.broadcast(flat, src=0)
            for p, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                p.copy_(value)


def _reduce_outcome(ranks: Ranks, loss: torch.Tensor, finite: torch.Tensor, tokens):
    """One float64 all-reduce on the device: the loss summed (then averaged), the non-finite ranks
    counted, the real tokens summed. ``tokens`` (this rank's, a host int) enters as a fill value,
    so nothing is copied from the host."""
    values = torch.stack(
        [
            loss.detach().double(),
            (~finite).double(),
            torch.full((), float(tokens), dtype=torch.float64, device=loss.device),
        ]
    )
    dist.all_reduce(values)
    return (values[0] / ranks.world).float(), values[1] == 0, values[2]


# --------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------


def full_state(embedder, *, trainable_only: bool) -> dict:
    """The embedder's weights as whole CPU tensors on rank 0 ({} elsewhere) from FSDP2's shards,
    names as ``embedder.state_dict()`` gives them (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(embedder, options=options)


__all__ = [
    "ENGINES",
    "FSDP",
    "LAUNCH_VARIABLES",
    "Ranks",
    "Replicate",
    "Single",
    "decoder_layers",
    "full_state",
    "launched",
    "make_engine",
    "setup",
]
