"""Where the fused InfoNCE's forward+backward time goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_infonce.py [--shapes B,K,D ...] [--steps 5]
    TRITON_INTERPRET=1 python benchmarks/profile_infonce.py --shapes 40,3,48 --steps 1   # CPU check

For each shape (default: the bench_infonce.py shapes where the D = 4096 bar is missed), runs
``infonce_loss`` forward+backward in bf16 (float32 on the CPU) a few times under the profiler
after a warm-up, and prints the device time per kernel name per step, its share of the step, and,
for the dot-product kernels and the GEMMs, the TFLOP/s implied by the plan's FLOPs: each Triton
dot-product kernel and each cuBLAS GEMM does 2 B N D FLOPs per step over all its launches (N =
B(1+K)), the logit kernel twice under the "sweeps" plan. The last line is the step's wall time
beside the sum of its kernels: a large gap means the step waits on the host (launches, syncs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mgh_kernels import infonce_loss
from mgh_kernels.infonce import planner

SHAPES = [(16384, 3, 4096), (4096, 7, 4096), (4096, 3, 1024)]


def shape_arg(text: str) -> tuple[int, int, int]:
    try:
        batch, k, dim = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,K,D (three integers), got {text!r}") from None
    return batch, k, dim


def dot_kernel_flops(name: str, batch: int, k: int, dim: int, plan) -> float | None:
    """FLOPs per step of the kernel ``name`` if it computes dot products over the whole of D."""
    gemm = 2.0 * batch * batch * (1 + k) * dim
    if "_global_fwd_kernel" in name:
        return gemm
    if "_global_dlogits_kernel" in name:
        return gemm * (2 if plan.mode == "sweeps" and plan.columns and plan.rows else 1)
    return None  # cuBLAS's GEMMs are reported together, the rest are not dot products


def profile_shape(shape, steps, device):
    batch, k, dim = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, pos = (torch.randn(batch, dim, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    neg = torch.randn(batch, k, dim, generator=gen, device=device, dtype=dtype).requires_grad_()

    def step():
        infonce_loss(q, pos, neg, tau=0.05).backward()
        for t in (q, pos, neg):
            t.grad = None

    step()  # compile, cuBLAS workspace
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - start) / steps
    plan = planner.backward_plan(batch, batch * (1 + k), dim, q.element_size())
    per_kernel, launches = defaultdict(float), defaultdict(int)
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name] += event.device_time_total / steps / 1e3  # ms per step
                launches[event.name] += 1
    else:  # a check of this script: the operators' own CPU time (interpreted kernels are not events)
        for row in prof.key_averages():
            per_kernel[row.key] = row.self_cpu_time_total / steps / 1e3
            launches[row.key] = row.count
    total = sum(per_kernel.values())
    print(
        f"\nB{batch} K{k} D{dim} {dtype}, plan {plan.mode} (columns {plan.columns}, rows {plan.rows}), "
        f"{steps} steps, {device}:"
    )
    cublas = 0.0
    for name, ms in sorted(per_kernel.items(), key=lambda item: -item[1])[:25]:
        flops = dot_kernel_flops(name, batch, k, dim, plan)
        rate = f"  {flops / ms / 1e9:6.0f} TFLOP/s" if flops else ""
        if any(tag in name.lower() for tag in ("gemm", "cutlass", "xmma")):
            cublas += ms
        print(f"  {ms:9.3f} ms {100 * ms / max(total, 1e-12):5.1f}%  x{launches[name] // steps:<4d} {name[:90]}{rate}")
    if cublas:
        gemms = 2 * 2.0 * batch * batch * (1 + k) * dim  # E^T Q and E C
        print(f"  cuBLAS GEMMs together: {cublas:.3f} ms, {gemms / cublas / 1e9:.0f} TFLOP/s")
    print(f"  kernels {total:.3f} ms per step; wall {wall * 1e3:.3f} ms per step")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=shape_arg, default=SHAPES, metavar="B,K,D")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps: expected at least 1, got {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for shape in args.shapes:
        profile_shape(shape, args.steps, device)


if __name__ == "__main__":
    main()
