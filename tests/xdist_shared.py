"""The folder one test run's pytest-xdist workers share, for fixtures that do expensive work once
per run (a dequantised model, one llama server at a time)."""

import os


def run_shared_dir(tmp_path_factory):
    """A folder of this test run shared by its pytest-xdist workers (each worker's own temporary
    folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
