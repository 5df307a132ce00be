"""``benchmarks/bench_busy_cpu.py``: its step functions run once here, at small shapes, and its
background load is real processes that spin while it lasts and are gone after it."""

import os
import sys
import time

import pytest

import benchmark_modules

sys.path.insert(0, str(benchmark_modules.BENCHMARKS))  # it imports bench_cpu_paths' steps
bench = benchmark_modules.load("bench_busy_cpu")

SMALL = {"attention fwd": (1, 2, 40, 8), "attention fwd+bwd": (1, 2, 40, 8), "infonce fwd+bwd": (16, 3, 8)}


@pytest.mark.parametrize("impl", [0, 1], ids=["ours", "peer"])
@pytest.mark.parametrize("pair", list(bench.PAIRS))
def test_steps_run(pair, impl):
    _, _, _, make, impls, _ = bench.PAIRS[pair]
    make(impls[impl], SMALL[pair])()


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_the_load_spins_while_it_lasts_and_is_gone_after():
    processes = bench.start_load(2)
    try:
        start = [_cpu_ticks(p.pid) for p in processes]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_cpu_ticks(p.pid) > s + 5 for p, s in zip(processes, start)):
            time.sleep(0.1)
        assert all(_cpu_ticks(p.pid) > s + 5 for p, s in zip(processes, start)), "a load process is not spinning"
    finally:
        bench.stop_load(processes)
    assert all(p.poll() is not None for p in processes)
