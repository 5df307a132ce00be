"""Independent pieces of one CPU op, run on PyTorch's own intra-op threads in ONE parallel region.

Why. A chain of PyTorch ops over a block (a GEMM, a row pass, another GEMM, ...) is one OpenMP
parallel region per op, each with a fork and a join (a barrier). On a quiet machine that costs
microseconds. On a busy one (other jobs on every core) each join waits until the scheduler gives
the slowest of our threads its turn again: milliseconds per op, so an op made of many small
parallel steps falls far behind one that is a single parallel loop (SDPA's CPU flash kernel is one
``at::parallel_for``). Here the pieces (blocks of query rows and heads, chunks of queries) are
tasks: ``run`` hands them to the threads of the OpenMP pool that PyTorch itself uses, through the
native library's ``mgh_parallel_tasks`` (one ``#pragma omp parallel for schedule(dynamic)``), and
each task's PyTorch ops then run single-threaded on its thread (PyTorch and MKL do not fork again
inside a parallel region). One fork and one join per call; a thread that is descheduled holds up
no other, since the rest take the next tasks. No thread pool of our own, no thread count of our
own: ``torch.get_num_threads()`` threads.

Each task is called as ``fn(task, slot)``; ``slot`` (0 .. ``threads`` - 1) is the thread's number,
so tasks of one slot never run at the same time: per-slot buffers and accumulators need no lock.
Tasks run under ``torch.no_grad()`` (``torch.inference_mode()`` when the caller is in it), since
grad mode is per thread. Without the native library (``MGH_NATIVE=0``, no compiler), with one
thread, inside a parallel region, or while a Python dispatch or function mode is active (they are
per thread too: a ``FlopCounterMode`` would not see the other threads' ops) the tasks run in order
on the calling thread, slot 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _native

try:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without them: tasks run on the calling thread

    def _modes_active() -> bool:
        return True
else:

    def _modes_active() -> bool:
        return _get_current_dispatch_mode() is not None or bool(_get_current_function_mode_stack())


def threads() -> int:
    """Slots ``run`` will use: PyTorch's intra-op thread count where the native library loads (and
    no Python mode is active), else 1."""
    if _native.library() is None or _modes_active():
        return 1
    return torch.get_num_threads()


def run(count: int, fn: Callable[[int, int], None], slots: int | None = None) -> None:
    """``fn(task, slot)`` for each task in range(count), in parallel as the module docstring says;
    ``slots`` (default ``threads()``) the most threads, fixed by the caller when it sized per-slot
    buffers. The first exception of any task is raised here (later tasks are skipped)."""
    lib = _native.library()
    slots = threads() if slots is None else slots
    if lib is None or slots <= 1 or count <= 1:
        for task in range(count):
            fn(task, 0)
        return
    failed: list = []
    inference = torch.is_inference_mode_enabled()

    def task(index: int, slot: int) -> None:
        if failed:
            return
        try:
            with torch.inference_mode() if inference else torch.no_grad():
                fn(index, slot)
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the caller's thread
            failed.append(error)

    callback = _native.TASK(task)  # kept alive by this frame for the call
    lib.mgh_parallel_tasks(count, min(slots, count), callback)
    if failed:
        raise failed[0]
