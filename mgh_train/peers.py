"""The other processes of a multi-process run: a timeout on every collective, and a lost or stalled
peer turned into one line naming its rank and what to do.

    group_timeout(cfg.dist_timeout)     # the timedelta init_process_group gets (--dist-timeout)
    register(ranks)                     # after the group is up: every rank's host and pid, for the message
    lost = explain(error, ranks)        # a collective that failed: a PeerLost naming the rank, or None

Without a timeout a rank that is stopped (SIGSTOP, a hung file system) or never starts leaves the
others waiting for gloo's or NCCL's long default (30 or 10 minutes); ``--dist-timeout`` bounds that
wait, for the rendezvous (a rank that never starts) and every collective after it. It must cover
the longest time one rank works alone while the others wait in a barrier: rank 0's evaluations
(``--eval-every``, the held-out accuracy) and checkpoint writes. A peer found dead, stopped or
missing on this host is named by rank and pid; on another host by rank and host.
"""

from __future__ import annotations

import datetime
import os
import socket

DEFAULT_TIMEOUT = 600  # seconds: --dist-timeout's default
_FAILURE_WORDS = (
    "connection reset by peer",
    "connection closed by peer",
    "timed out",
    "timeout",
    "broken pipe",
    "connection refused",
    "clients joined",
    "socket",
    "nccl error",
    "process group",
    "wait for",
)

_peers: list = []  # [(host, pid)] by rank, for this process's group


class PeerLost(RuntimeError):
    """Another process of the run died, stalled or never started; ``rank``: which, when known."""

    def __init__(self, message: str, *, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def group_timeout(seconds) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds or DEFAULT_TIMEOUT))


def register(ranks) -> None:
    """Every rank's (host, pid), gathered once after the group is up (collective)."""
    import torch.distributed as dist

    _peers.clear()
    if not ranks.distributed:
        return
    everyone: list = [None] * ranks.world
    dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
    _peers.extend(everyone)


def _state(pid: int) -> str | None:
    """'dead', 'stopped' or None (running, or unknown) for a process of this host."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        except OSError:
            return None
        return None
    return {"Z": "dead", "X": "dead", "T": "stopped", "t": "stopped"}.get(state)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` looks like a collective that failed because of another process."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if k)
    if kinds and isinstance(error, kinds):
        return True
    text = str(error).lower()  # gloo's and the store's plain RuntimeErrors (not our own subclasses)
    return type(error) is RuntimeError and any(word in text for word in _FAILURE_WORDS)


def explain(
    error: BaseException, ranks, *, timeout: float | None = None, before_start: bool = False
) -> PeerLost | None:
    """A :class:`PeerLost` for ``error`` if another process caused it (None otherwise)."""
    if not is_peer_failure(error):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    rank_self = getattr(ranks, "rank", None)
    host = socket.gethostname()
    culprit, what = None, None
    for rank, (peer_host, pid) in enumerate(_peers):
        if rank == rank_self:
            continue
        if peer_host == host:
            state = _state(pid)
            if state:
                culprit, what = (
                    rank,
                    f"rank {rank} (pid {pid}) {'died' if state == 'dead' else 'is stopped (SIGSTOP?)'}",
                )
                break
    if what is None:
        if before_start or not _peers:
            what = (
                "not every process joined the run within --dist-timeout (one never started or cannot reach "
                "MASTER_ADDR:MASTER_PORT)"
            )
        else:
            others = ", ".join(f"rank {r} on {h}" for r, (h, _) in enumerate(_peers) if r != rank_self)
            what = f"another process stopped answering ({others}; not on this host, or its state is unknown)"
    waited = f" within {timeout:g} s (--dist-timeout)" if timeout and "timed out" in first.lower() else ""
    return PeerLost(
        f"world: {what}{waited}; this process (rank {rank_self}) cannot go on alone ({first}). Stop every "
        "process of the run, then start them all again with --resume latest",
        rank=culprit,
    )


__all__ = ["DEFAULT_TIMEOUT", "PeerLost", "explain", "group_timeout", "is_peer_failure", "register"]
