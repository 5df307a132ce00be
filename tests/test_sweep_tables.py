"""The tile sweeps compare candidate tiles against the kernels' defaults: the first variant of
each of their lists must be exactly the default (the next GPU round reads its rows that way)."""

import sys
from pathlib import Path

import pytest
import torch

from mgh_kernels.attention import tiles as attention_tiles
from mgh_kernels.infonce import tiles as infonce_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sweep_attention = pytest.importorskip("sweep_attention")
sweep_infonce = pytest.importorskip("sweep_infonce")

CUDA = torch.device("cuda")  # the configs are plain functions of the device type: no GPU needed


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("kind", ["fwd", "colsum", "bwd"])
def test_attention_sweep_starts_from_the_defaults(kind, dim):
    table = {"fwd": sweep_attention.FWD, "colsum": sweep_attention.COLSUM, "bwd": sweep_attention.BWD}[kind]
    config = {
        "fwd": attention_tiles.flash_tiles,
        "colsum": attention_tiles.colsum_tiles,
        "bwd": attention_tiles.backward_tiles,
    }[kind]
    default = config(CUDA, dim, torch.bfloat16)
    first = sweep_attention.tiles(table[dim][0], dim, kind)
    assert first == {key: default[key] for key in first}
    assert sorted(first) == sorted(default)  # every setting the kernel takes is swept from its default
    assert len(set(table[dim])) == len(table[dim]), "a variant listed twice"


def test_attention_colsum_variants_are_valid():
    for dim, variants in sweep_attention.COLSUM.items():
        for variant in variants:
            cfg = sweep_attention.tiles(variant, dim, "colsum")
            assert cfg["BLOCK_M"] % 16 == 0, variant


@pytest.mark.parametrize("kind, table", [("fwd", sweep_infonce.FWD), ("dlogits", sweep_infonce.DLOGITS)])
@pytest.mark.parametrize("dim", [1024, 4096])
def test_infonce_sweep_starts_from_the_defaults(kind, table, dim):
    assert sweep_infonce.tiles(table[0], kind, dim, CUDA) == infonce_tiles.kernel_tiles(CUDA, dim, torch.bfloat16)
    assert len({repr(v) for v in table}) == len(table), "a variant listed twice"
