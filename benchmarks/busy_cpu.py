"""Our CPU ops against the ops they replace on a busy machine: quiet, then under a deliberate
background load, side by side in one run.

    python benchmarks/busy_cpu.py [--load 4] [--rounds 9]
    OMP_WAIT_POLICY=passive python benchmarks/busy_cpu.py     # OpenMP threads sleep, not spin, when idle

Pairs (the steps of ``bench_cpu_paths.py``): ``ata_attention`` forward (out + column sums) against
SDPA's forward, causal, [2, 8, 512, 64]; ``infonce_loss`` forward + backward against the eager loss
of sentence-transformers' MultipleNegativesRankingLoss, B 512, K 3, D 256. The load is ``--load``
processes spinning in pure Python (no threads of their own). Each figure is the median of
``--rounds`` calls, the two ops of a pair alternating, so both see the same load. Prints one line
per pair and phase: milliseconds of each and the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from bench_cpu_paths import attention_step, infonce_step

PAIRS = {
    "attention fwd [2, 8, 512, 64] causal": (lambda: attention_step("ours", "fwd", (2, 8, 512, 64), True),
                                             lambda: attention_step("sdpa", "fwd", (2, 8, 512, 64), True)),
    "infonce fwd+bwd B512 K3 D256": (lambda: infonce_step("ours", "fwd+bwd", (512, 3, 256)),
                                     lambda: infonce_step("eager", "fwd+bwd", (512, 3, 256))),
}


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10000))


def measure(rounds: int) -> dict:
    """{pair: (ours ms, theirs ms)}: medians of alternating calls."""
    result = {}
    for name, (make_ours, make_theirs) in PAIRS.items():
        ours, theirs = make_ours(), make_theirs()
        ours(), theirs()  # warm up: scratch buffers, the native library
        times = ([], [])
        for _ in range(rounds):
            for fn, seen in ((ours, times[0]), (theirs, times[1])):
                start = time.perf_counter()
                fn()
                seen.append(time.perf_counter() - start)
        result[name] = tuple(1e3 * statistics.median(t) for t in times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=int, default=4, help="background processes spinning (default 4)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    from mgh_kernels import _native

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, native: {_native.status()}")
    phases = {"quiet": measure(args.rounds)}
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for process in load:
        process.start()
    try:
        time.sleep(1.0)
        phases[f"load {args.load}"] = measure(args.rounds)
    finally:
        stop.set()
        for process in load:
            process.join()
    for phase, result in phases.items():
        for name, (ours, theirs) in result.items():
            print(f"{phase:8} {name:40} ours {ours:8.1f} ms  theirs {theirs:8.1f} ms  x{ours / theirs:.2f}")


if __name__ == "__main__":
    main()
