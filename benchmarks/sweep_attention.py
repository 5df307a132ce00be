"""Tile sweep for the ATA attention kernels on a GPU: which tiles each kernel should use.

    python benchmarks/sweep_attention.py [--parts fwd colsum bwd] [--workers 12] [--json FILE]

For each shape of ``bench_attention.py`` (bf16) and each candidate tile set, times one kernel
alone with ``triton.testing.do_bench`` (median of its repeats), beside SDPA's cuDNN forward (and
forward+backward for the backward), all in this one process on one GPU:

* ``fwd``: the flash pass (``attention.forward.flash_forward``: output and log-sum-exp, no column
  sums);
* ``colsum``: the column-sum pass (``attention.colsum.column_sums``, from that log-sum-exp);
* ``bwd``: the three backward kernels together (``attention.backward.backward`` with one tile set),
  with a column-sum gradient.

Each variant's result is checked against the default tiles' (a broken tile set fails loudly, not
fast). Triton compiles every variant first in ``--workers`` processes (into its on-disk cache), so
the timed process only loads them. Prints one line per variant and the best per kernel and shape.
This chooses the tiles of ``mgh_kernels.attention.tiles``; ``bench_attention.py`` then measures
the op as users call it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mgh_kernels.attention import backward, colsum, forward

SHAPES = [(32, 32, 512, 128), (8, 32, 2048, 128), (2, 32, 8192, 128), (32, 32, 512, 64)]  # B, H, L, D

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the default
# (tiles.flash_tiles, colsum_tiles, backward_tiles for bf16). Earlier sweeps' figures are in RESULTS.md.
FWD = {
    128: [(64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 128, 8, 2)],
}
# The column-sum pass: besides the default, a third stage; 256 keys per program (8 warps), which
# halves the queries each program streams from L2. Why these: RESULTS.md.
COLSUM = {
    128: [(64, 128, 4, 2), (64, 128, 4, 3), (64, 256, 8, 2), (64, 256, 8, 3)],
    64: [(64, 64, 4, 3), (64, 128, 4, 3), (64, 256, 8, 2)],
}
BWD = {
    128: [(64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 3)],
    64: [(64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 2)],
}


def tiles(variant: tuple, dim: int, kind: str = "fwd") -> dict:
    """The launch settings of ``variant`` for kernel ``kind``."""
    return dict(
        BLOCK_M=variant[0], BLOCK_N=variant[1], BLOCK_D=max(16, dim), num_warps=variant[2], num_stages=variant[3]
    )


def inputs(shape):
    """q, k, v [B, H, L, D] bf16, dout like them, dc [B, L] float32: the same on every call."""
    batch, heads, length, dim = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, heads, length, dim, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    return q, k, v, dout, torch.randn(batch, length, generator=gen, device="cuda")


def kernel_call(kind, shape, causal, variant):
    """A no-argument function that runs the kernel(s) with ``variant``'s tiles on fixed inputs
    and returns the tensors to compare."""
    q, k, v, dout, dc = inputs(shape)
    dim = shape[3]
    scale = dim**-0.5
    cfg = tiles(variant, dim, kind)
    if kind == "fwd":
        return lambda: forward.flash_forward(q, k, v, None, causal, scale, cfg)
    out, lse = forward.flash_forward(q, k, v, None, causal, scale, tiles(FWD[dim][0], dim))
    if kind == "colsum":
        return lambda: (colsum.column_sums(q, k, None, lse, causal, scale, cfg),)
    return lambda: backward.backward(q, k, v, out, lse, None, dout, dc, causal, scale, cfg)


def run_variant(kind, shape, causal, variant):
    return kernel_call(kind, shape, causal, variant)()


def jobs(parts):
    for shape in SHAPES:
        for causal in (False, True):
            for kind, table in (("fwd", FWD), ("colsum", COLSUM), ("bwd", BWD)):
                if kind in parts and not (kind == "bwd" and shape[2] > 2048):
                    for variant in table[shape[3]]:
                        yield kind, shape, causal, variant


def _warm(chunk):
    for job in chunk:
        try:
            run_variant(*job)
        except Exception as e:  # noqa: BLE001 - reported again, with context, by the timed process
            print(f"warm-up failed for {job}: {type(e).__name__}: {e}", flush=True)
    torch.cuda.synchronize()


def warm_cache(all_jobs, workers):
    """Compile every variant in parallel processes (Triton's on-disk cache serves the timed run)."""
    unique = {
        (kind, shape[3], causal, variant): (kind, shape, causal, variant) for kind, shape, causal, variant in all_jobs
    }
    todo = list(unique.values())
    chunks = [todo[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, chunks)


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["fwd", "colsum", "bwd"], choices=["fwd", "colsum", "bwd"])
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    all_jobs = list(jobs(args.parts))
    if args.workers > 1:
        warm_cache(all_jobs, args.workers)
    rows, best = [], {}
    baseline, reference = {}, {}  # cuDNN's time per (shape, causal, backward); default tiles' result per key
    for kind, shape, causal, variant in all_jobs:
        key = (kind, shape, causal)
        if (shape, causal, kind == "bwd") not in baseline:
            q, k, v = (t.requires_grad_(kind == "bwd") for t in inputs(shape)[:3])
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                if kind == "bwd":

                    def step():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal).float().sum().backward()
                else:

                    def step():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                baseline[(shape, causal, kind == "bwd")] = bench(step)
        try:
            call = kernel_call(kind, shape, causal, variant)
            if key not in reference:
                default = {"fwd": FWD, "colsum": COLSUM, "bwd": BWD}[kind][shape[3]][0]
                reference = {key: run_variant(kind, shape, causal, default)}  # one key's tensors at a time
            got = call()
            err = max(
                ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                for a, b in zip(got, reference[key])
            )
            if not err < 2e-2:  # bf16 outputs; accumulation order differs between tiles
                raise AssertionError(f"differs from the default tiles' result by {err:.3g} (relative)")
            del got
            ms = bench(call)
        except Exception as e:  # noqa: BLE001 - a tile set that does not compile or launch (e.g. shared memory)
            print(f"{kind:6s} {shape} causal={causal} {variant}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        base = baseline[(shape, causal, kind == "bwd")]
        row = dict(
            kind=kind, shape=shape, causal=causal, variant=variant, ms=ms, cudnn_ms=base, ratio=ms / base, max_diff=err
        )
        rows.append(row)
        print(
            f"{kind:6s} B{shape[0]} H{shape[1]} L{shape[2]} D{shape[3]} {'causal' if causal else 'bidir '} "
            f"{str(variant):28s} {ms:8.3f} ms  x{ms / base:5.2f} of cuDNN {'fwd+bwd' if kind == 'bwd' else 'fwd'}"
            f"  rel. diff vs default {err:.1e}",
            flush=True,
        )
        if key not in best or ms < best[key]["ms"]:
            best[key] = row
    print("\nbest per kernel and shape (default first in each list):")
    for (kind, shape, causal), row in best.items():
        default = next(r for r in rows if (r["kind"], r["shape"], r["causal"]) == (kind, shape, causal))
        print(
            f"  {kind:6s} B{shape[0]} H{shape[1]} L{shape[2]} D{shape[3]} {'causal' if causal else 'bidir '} "
            f"best {str(row['variant']):28s} {row['ms']:8.3f} ms (x{row['ratio']:.2f} cuDNN)  "
            f"default {default['ms']:8.3f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
