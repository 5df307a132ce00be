"""benchmarks/bench_infonce.py's largest-batch probe, on a fake device whose memory ends at a known B."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_infonce", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_infonce.py")
bench_infonce = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_infonce)


@pytest.mark.parametrize("capacity", [4096, 5000, 12345, 65536, 100_000, 1 << 21])
def test_largest_batch_brackets_the_capacity(capacity):
    tried = []

    def runs(batch):
        tried.append(batch)
        return batch <= capacity

    found = bench_infonce.largest_batch(runs, 4096, 1 << 21)
    assert found <= capacity
    if capacity < 1 << 21:
        # doubling, then four bisections: within 1/16 of the last doubling step
        assert capacity - found <= max(found // 16, 1)
    else:
        assert found == capacity
    assert len(tried) <= 10 + 4


def test_largest_batch_when_even_the_start_fails_or_the_limit_runs():
    assert bench_infonce.largest_batch(lambda b: False, 4096, 1 << 16) == 0
    assert bench_infonce.largest_batch(lambda b: True, 4096, 10_000) == 10_000
    with pytest.raises(ValueError, match="start, limit"):
        bench_infonce.largest_batch(lambda b: True, 0, 10)
