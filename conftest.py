"""Project-wide pytest options.

``pytest --benchmark`` runs the pytest-benchmark suites in benchmarks/ (and nothing else); plain
``pytest`` runs tests/ only.
"""

from pathlib import Path

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
