"""Shared fixtures: fresh random inputs every run, with the seed printed so a failure can be replayed.

Set MGH_TEST_SEED=<n> to replay a run.
"""

import os
import random

import pytest
import torch


@pytest.fixture
def gen():
    """A torch.Generator seeded afresh for each test (the seed is in the captured output)."""
    seed = int(os.environ.get("MGH_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"MGH_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)

