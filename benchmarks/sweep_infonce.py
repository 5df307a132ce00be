"""Tile sweep for the fused InfoNCE's two dot-product kernels on a GPU: which tiles they should use.

    python benchmarks/sweep_infonce.py [--parts fwd dlogits] [--workers 12] [--json FILE]
    TRITON_INTERPRET=1 python benchmarks/sweep_infonce.py --smoke   # tiny shapes on the CPU

Each of the two kernels computes one "GEMM" worth of dot products (2 B N D FLOPs over the whole
of D) plus its own element-wise work, so each is timed against cuBLAS computing the same dot
products (``torch.mm`` into bf16), all in this one process on one GPU, for the shapes of
``bench_infonce.py`` where the kernels dominate (bf16):

* ``fwd``: ``infonce.forward.global_forward`` (``_global_fwd_kernel`` over all B(1+K) candidates and
  the combination of its per-split statistics); baseline ``q @ [pos; neg]^T``;
* ``dlogits``: ``infonce.backward.logit_gradients`` (``_global_dlogits_kernel``) for one 4096-column
  chunk of negatives, as the backward's column sweep runs it; baseline ``q @ chunk^T``.

Each line gives the variant's time, its TFLOP/s and its ratio to cuBLAS; each variant's result is
checked against the default tiles' (a broken tile set fails loudly, not fast). Triton compiles
every variant first in ``--workers`` processes (into its on-disk cache), so the timed process only
loads them. This chooses ``mgh_kernels.infonce.tiles.kernel_tiles``; ``bench_infonce.py`` then
measures the loss as users call it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mgh_kernels.infonce import backward, forward
from mgh_kernels.infonce import tiles as infonce_tiles

SHAPES = [(16384, 3, 4096), (16384, 3, 1024), (4096, 7, 4096), (4096, 7, 1024)]  # B, K, D
SMOKE_SHAPES = [(40, 3, 48)]
TAU = 0.05
CHUNK = 4096  # candidate columns of the dlogits chunk (the backward's accumulating mode uses 4096)

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages[, overrides of other kernel_tiles entries]);
# the first of each list is tiles.kernel_tiles's bf16 default, the second the forward's 128 x 64
# (RESULTS.md says why both). The overrides vary the L2 locality of the program order: for the
# forward, cache_bytes=2**40 leaves only the occupancy rule in planner.candidate_splits (3 splits at
# B16384); for the logit gradients, GROUP_M=65536 makes one group of all query blocks (the
# row-block-fastest order).
NO_LOCALITY_FWD = {"cache_bytes": 1 << 40}
ROW_ORDER = {"GROUP_M": 65536}
FWD = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 64, 64, 8, 3, NO_LOCALITY_FWD),
    (128, 64, 64, 8, 3, {"cache_bytes": 25 << 20}),
    (128, 128, 64, 8, 3, NO_LOCALITY_FWD),
    (128, 64, 64, 4, 4),
    (128, 64, 32, 8, 4),
    (64, 128, 64, 4, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 128, 8, 2),
    (64, 64, 64, 4, 4),
    (256, 64, 64, 8, 3),
    (128, 128, 64, 8, 4),
]
DLOGITS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 3, ROW_ORDER),
    (128, 128, 64, 8, 3, {"GROUP_M": 4}),
    (128, 128, 64, 8, 3, {"GROUP_M": 16}),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 3, ROW_ORDER),
    (256, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 128, 8, 2),
    (256, 128, 32, 8, 4),
    (128, 256, 32, 8, 4),
]
SMOKE_TILES = [(16, 16, 16, 4, 1), (32, 16, 16, 4, 1), (16, 16, 16, 4, 1, {"GROUP_M": 65536, "cache_bytes": 1 << 40})]


def tiles(variant: tuple, kind: str, dim: int, device: torch.device) -> dict:
    """``tiles.kernel_tiles``'s dict with ``variant``'s tiles for ``kind``'s kernel."""
    cfg = dict(infonce_tiles.kernel_tiles(device, dim, torch.bfloat16 if device.type == "cuda" else torch.float32))
    block_m, block_n, block_d, warps, stages = variant[:5]
    cfg.update(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    cfg.update(*variant[5:])
    cfg["BLOCK_N_FWD" if kind == "fwd" else "BLOCK_N"] = block_n
    return cfg


def inputs(shape, device):
    """q, pos [B, D], neg [B K, D] (bf16 on a GPU, float32 on the CPU): the same on every call."""
    batch, k, dim = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, dim, generator=gen, device=device, dtype=dtype)
    pos = q + torch.randn(batch, dim, generator=gen, device=device, dtype=dtype)
    return q, pos, torch.randn(batch * k, dim, generator=gen, device=device, dtype=dtype)


def kernel_call(kind, shape, variant, device, defaults):
    """(a no-argument function running ``kind``'s kernel with ``variant``'s tiles on fixed inputs and
    returning the tensors to compare, the cuBLAS baseline doing the same dot products, FLOPs)."""
    q, pos, neg = inputs(shape, device)
    batch, _, dim = shape
    norms = infonce_tiles.kernel_tiles(device, dim, q.dtype)
    rq, rp, rn = (forward.row_norms(t, True, False, norms)[0] for t in (q, pos, neg))
    cfg = tiles(variant, kind, dim, device)
    if kind == "fwd":
        candidates = torch.cat([pos, neg])  # the baseline's one matrix (ours reads pos and neg where they are)
        return (
            lambda: forward.global_forward(q, pos, neg, rq, rp, rn, TAU, 0, cfg),
            lambda: torch.mm(q, candidates.t()),
            2 * batch * candidates.shape[0] * dim,
        )
    lse, tail, _ = forward.global_forward(q, pos, neg, rq, rp, rn, TAU, 0, tiles(defaults["fwd"], "fwd", dim, device))
    w = torch.full((batch,), 1.0 / batch, device=device)
    sigma = backward.gradient_scale(w, rq, rp, rn, TAU)
    columns = min(CHUNK, neg.shape[0])
    chunk = neg[:columns]
    e = torch.empty(batch, columns, dtype=q.dtype, device=device)

    def call():
        backward.logit_gradients(q, rq, lse, tail, w, sigma, neg, rn, 0, e, False, 0, TAU, cfg)
        return (e,)

    return call, lambda: torch.mm(q, chunk.t()), 2 * batch * columns * dim


def jobs(parts, shapes, tables):
    for shape in shapes:
        for kind in parts:
            for variant in tables[kind]:
                yield kind, shape, variant


def _warm(args):
    chunk, tables = args
    device = torch.device("cuda")
    defaults = {kind: table[0] for kind, table in tables.items()}
    for kind, shape, variant in chunk:
        try:
            kernel_call(kind, shape, variant, device, defaults)[0]()
        except Exception as e:  # noqa: BLE001 - reported again, with context, by the timed process
            print(f"warm-up failed for {(kind, shape, variant)}: {type(e).__name__}: {e}", flush=True)
    torch.cuda.synchronize()


def warm_cache(all_jobs, tables, workers):
    """Compile every variant in parallel processes (Triton's on-disk cache serves the timed run).
    One job per (kind, D, variant): the compiled kernel does not depend on B or K."""
    unique = {(kind, shape[2], repr(variant)): (kind, shape, variant) for kind, shape, variant in all_jobs}
    todo = list(unique.values())
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, [(todo[i::workers], tables) for i in range(workers)])


def bench(fn, device):
    """Median milliseconds of ``fn``: triton's do_bench on a GPU, a few wall-clock runs on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_diff(got, want):
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["fwd", "dlogits"], choices=["fwd", "dlogits"])
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and tiles (runs on the CPU interpreter)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1 for a check of the script itself)")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tables = {"fwd": SMOKE_TILES, "dlogits": SMOKE_TILES} if args.smoke else {"fwd": FWD, "dlogits": DLOGITS}
    defaults = {kind: table[0] for kind, table in tables.items()}
    all_jobs = list(jobs(args.parts, shapes, tables))
    if device.type == "cuda" and args.workers > 1:
        warm_cache(all_jobs, tables, args.workers)
    rows, best, baseline, reference = [], {}, {}, {}
    for kind, shape, variant in all_jobs:
        key = (kind, shape)
        try:
            call, cublas, flops = kernel_call(kind, shape, variant, device, defaults)
            if key not in baseline:
                baseline[key] = bench(cublas, device)
            if key not in reference:
                reference = {key: kernel_call(kind, shape, defaults[kind], device, defaults)[0]()}
            got = call()
            err = relative_diff(got, reference[key])
            if not err < 2e-2:  # bf16 E; accumulation order differs between tiles
                raise AssertionError(f"differs from the default tiles' result by {err:.3g} (relative)")
            del got
            ms = bench(call, device)
        except Exception as e:  # noqa: BLE001 - a tile set that does not compile or launch (e.g. shared memory)
            print(f"{kind:7s} {shape} {variant}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        base = baseline[key]
        row = dict(
            kind=kind,
            shape=shape,
            variant=variant,
            ms=ms,
            cublas_ms=base,
            ratio=ms / base,
            tflops=flops / ms / 1e9,
            cublas_tflops=flops / base / 1e9,
            max_diff=err,
        )
        rows.append(row)
        print(
            f"{kind:7s} B{shape[0]} K{shape[1]} D{shape[2]} {str(variant):24s} {ms:8.3f} ms "
            f"{row['tflops']:6.1f} TFLOP/s  x{row['ratio']:5.2f} of cuBLAS ({row['cublas_tflops']:.0f} TFLOP/s)"
            f"  rel. diff vs default {err:.1e}",
            flush=True,
        )
        if key not in best or ms < best[key]["ms"]:
            best[key] = row
    print("\nbest per kernel and shape (default first in each list):")
    for (kind, shape), row in best.items():
        default = next(r for r in rows if (r["kind"], r["shape"]) == (kind, shape))
        print(
            f"  {kind:7s} B{shape[0]} K{shape[1]} D{shape[2]} best {str(row['variant']):24s} {row['ms']:8.3f} ms "
            f"({row['tflops']:.0f} TFLOP/s, x{row['ratio']:.2f} cuBLAS)  default {default['ms']:8.3f} ms "
            f"({default['tflops']:.0f} TFLOP/s)"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
