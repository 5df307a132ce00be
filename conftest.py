"""Project-wide pytest options.

``pytest --benchmark`` runs the pytest-benchmark suites in benchmarks/ (and nothing else), in one
process; plain ``pytest`` runs tests/ only, spread over worker processes (pytest-xdist's ``-n``,
set in pyproject.toml; ``-n 0`` runs them in this process).
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
BENCHMARKS = ROOT / "benchmarks"
TESTS = ROOT / "tests"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the performance suites in benchmarks/ instead of the tests in tests/",
    )


def pytest_ignore_collect(collection_path, config):
    path = Path(collection_path).resolve()
    other = TESTS if config.getoption("benchmark") else BENCHMARKS
    if path == other or other in path.parents:
        return True
    return None


def pytest_configure(config):
    """The test run shares the cores between its worker processes and the CLI processes tests start:
    idle OpenMP threads sleep rather than spin (the workers, started after this, and every child
    inherit it; libgomp reads it when torch loads). Benchmarks keep the user's default."""
    if not config.getoption("benchmark"):
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Benchmarks time one call at a time: no worker processes beside them."""
    if config.getoption("benchmark") and hasattr(config.option, "numprocesses"):
        config.option.numprocesses = 0
        config.option.dist = "no"
