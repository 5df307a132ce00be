"""Project-wide pytest options.

``pytest --benchmark`` runs the pytest-benchmark suites in benchmarks/ (and nothing else), in one
process; plain ``pytest`` runs tests/ only, spread over worker processes (pytest-xdist's ``-n``,
set in pyproject.toml; ``-n 0`` runs them in this process).
"""

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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Benchmarks time one call at a time: no worker processes beside them."""
    if config.getoption("benchmark") and hasattr(config.option, "numprocesses"):
        config.option.numprocesses = 0
        config.option.dist = "no"
