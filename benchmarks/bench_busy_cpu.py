"""Our CPU ops against the ops they replace on a busy machine: quiet, then under a deliberate
background load, side by side in one run.

    python -m pytest --benchmark benchmarks/bench_busy_cpu.py

Skipped where CUDA is present (these are the CPU paths). Pairs (the steps of
``bench_cpu_paths.py``, float32): ``ata_attention`` (out + column sums) against SDPA (role
"fused"), forward and forward + backward, causal, [2, 8, 512, 64]; ``infonce_loss`` forward +
backward against the eager loss of sentence-transformers' MultipleNegativesRankingLoss (role
"eager"), B 512, K 3, D 256. Each pair runs twice: in the group ending "quiet" with nothing of
ours beside it, and in the group ending "load N" while the fixture ``background_load`` keeps N
processes (``LOAD_PER_CPU`` per CPU) spinning in pure Python on every core, started before the
group and stopped after it. The ratio table then shows ours / theirs quiet and loaded: an op that
degrades no worse than its peer keeps its ratio. "Quiet" means no load of ours: other jobs on a
shared machine still count (note the load average, printed after the run).
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from bench_cpu_paths import attention_step, infonce_step

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths: run on a machine without CUDA")

LOAD_PER_CPU = 2
"""Spinning processes per CPU under load (2 on a 2-core machine: a load average of about 4)."""

ATTENTION = (2, 8, 512, 64)
INFONCE = (512, 3, 256)

PAIRS = {
    "attention fwd": (
        "ata_attention (out + colsum)",
        "SDPA (out only)",
        "fused",
        lambda impl, shape: attention_step(impl, "fwd", shape, True),
        ("ours", "sdpa"),
        ATTENTION,
    ),
    "attention fwd+bwd": (
        "ata_attention (out + colsum)",
        "SDPA (out only)",
        "fused",
        lambda impl, shape: attention_step(impl, "fwd+bwd", shape, True),
        ("ours", "sdpa"),
        ATTENTION,
    ),
    "infonce fwd+bwd": (
        "infonce_loss",
        "eager, as MultipleNegativesRankingLoss",
        "eager",
        lambda impl, shape: infonce_step(impl, "fwd+bwd", shape),
        ("ours", "eager"),
        INFONCE,
    ),
}


def start_load(count: int) -> list:
    """``count`` processes, each spinning on a core in pure Python (no threads of its own) until
    ``stop_load``."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL) for _ in range(count)
    ]


def stop_load(processes: list) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


@pytest.fixture(
    scope="module", params=[0, LOAD_PER_CPU * (os.cpu_count() or 1)], ids=lambda n: "quiet" if n == 0 else f"load{n}"
)
def background_load(request):
    """The phase's name ("quiet" or "load N"); under load, N spinning processes for its life."""
    count = request.param
    processes = start_load(count)
    try:
        if processes:
            time.sleep(1.0)  # every spinner running before the first timing
        yield "quiet" if not count else f"load {count}"
    finally:
        stop_load(processes)


@pytest.mark.parametrize("impl", [0, 1], ids=["ours", "peer"])
@pytest.mark.parametrize("pair", list(PAIRS))
def bench_busy_cpu(measure, note, background_load, pair, impl):
    ours_name, peer_name, peer_role, make, impls, shape = PAIRS[pair]
    group = "busy cpu {} {} {}".format(pair, "x".join(map(str, shape)), background_load)
    if impl == 0:
        note(
            f"{group}: load average {os.getloadavg()[0]:.1f} before ours, {torch.get_num_threads()} torch "
            f"threads, {os.cpu_count()} CPUs"
        )
    measure(
        make(impls[impl], shape),
        group=group,
        name=(ours_name, peer_name)[impl],
        role=("ours", peer_role)[impl],
        rounds=15,
    )
