"""benchmarks/bench_scale.py on the CPU with a tiny model, so its code cannot rot: both step functions
run (and compute the same loss: GradCache is the plain step's arithmetic), the memory probe
brackets a budget, and the table comes out."""

import pytest
import torch

import benchmark_modules

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("cpu_kernels")

bench_scale = benchmark_modules.load("bench_scale")

TINY = benchmark_modules.tiny(bench_scale.SMOLLM2_135M)


def test_both_steps_run_and_agree():
    from mgh_train.precision import resolve

    device, precision = torch.device("cpu"), resolve(torch.device("cpu"))
    rows = bench_scale.seed_rows(6, 12, TINY["vocab_size"])
    losses = {}
    for mode in bench_scale.MODES:
        embedder = bench_scale.make_embedder(device, TINY, precision)
        step = bench_scale.make_step(mode, embedder, rows, device, precision, chunk_size=4)
        losses[mode] = [float(step()) for _ in range(2)]
    assert losses["gradcache"] == pytest.approx(losses["plain"], rel=1e-5)


@pytest.mark.slow  # a dozen optimizer steps and the memory probe
def test_the_measurement_and_its_table():
    result = bench_scale.measure_case(
        torch.device("cpu"),
        TINY,
        batch=4,
        length=12,
        chunk_size=3,
        checkpointing=True,
        rounds=1,
        budget=1 << 40,
        limit=4,
    )
    assert result["plain_largest"] == result["gradcache_largest"] == 4  # everything fits a terabyte
    assert result["ratio"] > 0 and result["plain_loss"] == pytest.approx(result["gradcache_loss"], rel=1e-5)
    text = bench_scale.table([result])
    assert text.count("\n") == 2 and "| cpu | on | 4 x <=12 (chunks of 3) |" in text
    from mgh_train.precision import resolve

    cpu = torch.device("cpu")
    embedder = bench_scale.make_embedder(cpu, TINY, resolve(cpu))
    assert not bench_scale.fits(
        "plain", embedder, 4, device=cpu, dims=TINY, precision=resolve(cpu), length=12, chunk_size=3, budget=-1
    )  # nothing fits a negative budget
