"""The command line, the import promised by the README, and the --benchmark switch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [["kernel-demo"], ["kernel-demo", "--causal", "--seed", "3"]])
def test_kernel_demo_runs_and_is_padding_invariant(args):
    result = run("-m", "mgh_train", *args)
    assert result.returncode == 0, result.stderr
    assert "ATA weights of passage 0" in result.stdout
    drift = float(result.stdout.split("max |difference| = ")[1].split()[0])
    assert drift < 1e-5
    for pooling in ("mean", "ata"):
        loss = float(result.stdout.split(f"{pooling} pooling: loss ")[1].split()[0])
        assert 0 < loss < 10


def test_demo_rejects_bad_arguments():
    result = run("-m", "mgh_train", "kernel-demo", "--tau", "0")
    assert result.returncode == 2
    assert "--tau: expected a positive number" in result.stderr
    result = run("-m", "mgh_train", "--tau", "0")  # the training demo
    assert result.returncode == 2
    assert "tau: expected a positive temperature" in result.stderr


def test_public_import():
    result = run("-c", "from mgh_kernels import ata_pool; print(ata_pool.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mgh_kernels.pooling"


def test_importing_the_cli_leaves_torch_dynamo_unloaded():
    """torch._dynamo costs ~1.5 s to import: a CLI start (``--help``, a one-line error) does not pay it."""
    result = run("-c", "import sys, mgh_train.__main__; print('torch._dynamo' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def collected(*args):
    result = run("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.mark.slow  # collects the whole suite twice in child processes (~20 s)
def test_plain_pytest_collects_tests_only_and_benchmark_flag_the_suites_only():
    plain = collected()
    assert plain and all(line.startswith("tests/") for line in plain)
    bench = collected("--benchmark")
    assert bench and all(line.startswith("benchmarks/bench_") for line in bench)
