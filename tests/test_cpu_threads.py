"""Our CPU ops and PyTorch's thread pool (issue 34, point 11): on a busy machine every OpenMP
parallel region costs a wait for the scheduler at its join, so an op must not fork once per
small step. Checked by counting the regions a call forks (tests/omp_regions.c, loaded with
LD_PRELOAD), not by timing; the timings are benchmarks/bench_busy_cpu.py's. Also ``_tasks.run``
itself, and the native library sharing PyTorch's OpenMP runtime (one pool of threads, not two)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mgh_kernels import _native, _tasks

TESTS = Path(__file__).resolve().parent
COMPILER = shutil.which(os.environ.get("CC") or "cc")


@pytest.fixture(scope="module")
def region_counts(tmp_path_factory):
    """{op: regions one call forks} from tests/omp_regions_worker.py under the counting shim."""
    if COMPILER is None or not sys.platform.startswith("linux"):
        pytest.skip("counting OpenMP regions needs a C compiler and Linux's LD_PRELOAD")
    shim = tmp_path_factory.mktemp("shim") / "omp_regions.so"
    subprocess.run(
        [COMPILER, "-O2", "-shared", "-fPIC", str(TESTS / "omp_regions.c"), "-o", str(shim), "-ldl"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(TESTS / "omp_regions_worker.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    if not counts.pop("native"):
        pytest.skip("the native library is not available here: the CPU sweeps run op by op")
    if counts.pop("threads") < 2:
        pytest.skip("one intra-op thread: nothing forks")
    if counts["sdpa fwd L256"] == 0:
        pytest.skip("the shim did not see libgomp's entry points (PyTorch not built with GNU OpenMP?)")
    return counts


@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def test_attention_forks_no_more_as_the_blocks_grow(region_counts, part):
    """ata_attention's CPU sweeps fork once per sweep, not once per op of every block of 128 rows:
    4x the length (4x the row blocks, up to 16x the blocks under the causal mask) forks no more."""
    short, long = region_counts[f"ours {part} L256"], region_counts[f"ours {part} L1024"]
    assert long == short, f"{part}: {short} parallel regions at L 256, {long} at L 1024"


def test_attention_forward_forks_about_as_often_as_sdpa(region_counts):
    ours, sdpa = region_counts["ours fwd L1024"], region_counts["sdpa fwd L1024"]
    assert ours <= sdpa + 2, f"ata_attention's forward forks {ours} times, SDPA's {sdpa}"


def test_infonce_forks_no_more_than_the_eager_loss(region_counts):
    ours, eager = region_counts["infonce ours"], region_counts["infonce eager"]
    assert ours <= eager, f"infonce_loss forward + backward forks {ours} times, the eager loss {eager}"


_RUNTIMES = """
import json, torch
from mgh_kernels import _native
loaded = _native.library() is not None
with open("/proc/self/maps") as maps:
    runtimes = {line.split()[-1] for line in maps if "/" in line and any(
        name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp", "libomp"))}
print(json.dumps([loaded, sorted(runtimes)]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_the_native_library_uses_pytorchs_openmp_runtime():
    """One OpenMP runtime in a process that imports torch and loads the library: its regions and
    tasks run on PyTorch's pool of threads, not on a second pool that would spin against it. (A
    fresh process: other libraries, scikit-learn's for one, bring their own.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _RUNTIMES], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded, runtimes = json.loads(done.stdout.strip().splitlines()[-1])
    if not loaded:
        pytest.skip(f"the native library is not available here: {_native.status()}")
    assert len(runtimes) <= 1, f"more than one OpenMP runtime loaded: {runtimes}"


@pytest.fixture
def parallel():
    if _native.library() is None:
        pytest.skip(f"the native library is not available here: {_native.status()}")
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread")
    return _tasks.threads()


def test_run_calls_every_task_once_on_the_pools_threads(parallel):
    seen, lock = [], threading.Lock()

    def task(index, slot):
        time.sleep(0.05)  # sleeps release the GIL: the other threads take tasks meanwhile
        with lock:
            seen.append((index, slot, threading.get_ident(), torch.is_grad_enabled()))

    _tasks.run(16, task)  # 0.8 s of sleeps: time for a busy machine to schedule every thread
    assert sorted(index for index, *_ in seen) == list(range(16))
    assert all(0 <= slot < parallel for _, slot, *_ in seen)
    assert len({ident for *_, ident, _ in seen}) >= 2, "every task ran on one thread"
    assert len({(slot, ident) for _, slot, ident, _ in seen}) == len({slot for _, slot, *_ in seen})
    assert not any(grad for *_, grad in seen), "tasks run without autograd"


def test_run_raises_a_tasks_error_in_the_caller(parallel):
    def task(index, slot):
        if index == 3:
            raise ValueError("task 3 failed")

    with pytest.raises(ValueError, match="task 3 failed"):
        _tasks.run(8, task)


def test_run_keeps_the_callers_inference_mode(parallel):
    modes = []
    with torch.inference_mode():
        _tasks.run(4, lambda index, slot: modes.append(torch.is_inference_mode_enabled()))
    assert modes == [True] * 4


def test_run_stays_on_the_calling_thread_under_a_dispatch_mode(parallel):
    """Modes are per thread: a FlopCounterMode must see every op, so the tasks run here."""

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    idents = set()
    with Passing():
        assert _tasks.threads() == 1
        _tasks.run(4, lambda index, slot: idents.add((threading.get_ident(), slot)))
    assert idents == {(threading.get_ident(), 0)}


def test_one_intra_op_thread_runs_the_tasks_in_order_here(monkeypatch):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = []
        _tasks.run(5, lambda index, slot: order.append((index, slot, threading.get_ident())))
    finally:
        torch.set_num_threads(saved)
    assert order == [(i, 0, threading.get_ident()) for i in range(5)]


def test_results_do_not_depend_on_which_thread_ran_what(parallel, gen):
    """Column sums and the loss are summed in a fixed order: repeated calls agree to the bit."""
    from mgh_kernels import ata_attention, infonce_loss, use_backend

    q, k, v = (torch.randn(3, 4, 300, 16, generator=gen) for _ in range(3))
    queries, pos, neg = (
        torch.randn(200, 16, generator=gen),
        torch.randn(200, 16, generator=gen),
        torch.randn(200, 2, 16, generator=gen),
    )
    with use_backend("torch"):
        first = [*ata_attention(q, k, v, causal=True), infonce_loss(queries, pos, neg, tau=0.05)]
        for _ in range(3):
            again = [*ata_attention(q, k, v, causal=True), infonce_loss(queries, pos, neg, tau=0.05)]
            assert all(torch.equal(a, b) for a, b in zip(first, again))
