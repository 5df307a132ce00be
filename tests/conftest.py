"""Shared fixtures: fresh random inputs every run, with the seed printed so a failure can be replayed.

Set MGH_TEST_SEED=<n> to replay a run.
"""

import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter. It is chosen when the kernels
# are defined, so this must happen before any test module imports mgh_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A torch.Generator seeded afresh for each test (the seed is in the captured output)."""
    seed = int(os.environ.get("MGH_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MGH_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)

