"""Static instruction counts of the kernels' hot loops, compiled for an H100 without one.

    python benchmarks/sass_loops.py attention [--dtype bfloat16] [--head-dim 128] [--causal]
                                    [--length 1000] [--no-padding]
    python benchmarks/sass_loops.py infonce [--dtype bfloat16] [--dim 1024] [--negatives global]
    ... [--tile BLOCK_N_FWD=128 ...]   (a variant: set in every tile config that has the key)

Captures the launches of one forward + backward of the op on CUDA (``tests/gpu_compile.py``: the
real launch code on meta tensors), compiles each for sm_90 with Triton's ptxas, disassembles it and
prints, per launch, its registers and spills and each innermost loop that holds a tensor-core
instruction: SASS instructions per thread per iteration, and the main opcodes among them (HGMMA
tensor-core ops, MUFU exponentials, FFMA/FMUL/FADD arithmetic, FMNMX max, FSEL/FSETP selects and
compares, F2FP conversions, LDGSTS asynchronous copies, SHFL shuffles, the rest as "other").

What this measures: the instructions the warp schedulers must issue per tile, which bounds a loop
that is issue-bound (see RESULTS.md: the flash forward's loop issued about as many instructions as
its tensor cores took cycles). It is not a timing: memory stalls, occupancy and overlap are not in
it, so a change that saves instructions still needs a GPU round to show it is faster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import gpu_compile

SHOWN = ["HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "F2FP", "LDGSTS", "SHFL"]


def describe(result: dict) -> list[str]:
    """Lines for one launch: the kernel, its registers and spills, then one line per hot loop."""
    head = f"{result['kernel']:24s} "
    if "error" in result:
        return [head + "FAILED " + result["error"].splitlines()[0]]
    lines = [
        head + f"registers={result['registers']} spills={result['spill_stores']}/{result['spill_loads']} bytes "
        f"shared={result['shared']} {result['constants']}"
    ]
    for i, loop in enumerate(result.get("loops", [])):
        counts = loop["opcodes"]
        other = loop["instructions"] - sum(counts.get(op, 0) for op in SHOWN)
        mix = " ".join(f"{op}={counts.get(op, 0)}" for op in SHOWN)
        lines.append(f"    loop {i}: {loop['instructions']:4d} instructions  {mix} other={other}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=["attention", "infonce"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--arch", type=int, default=90, help="sm_<arch> (default 90, an H100)")
    parser.add_argument("--head-dim", type=int, default=128, help="attention: head dim D")
    parser.add_argument("--causal", action="store_true", help="attention: causal masking")
    parser.add_argument("--length", type=int, default=1000, help="attention: sequence length L (picks the forward)")
    parser.add_argument("--no-padding", action="store_true", help="attention: no key padding mask")
    parser.add_argument("--dim", type=int, default=1024, help="infonce: embedding dim D")
    parser.add_argument("--negatives", default="global", choices=["global", "own"], help="infonce: candidate mode")
    parser.add_argument(
        "--tile",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compile a variant: KEY (e.g. BLOCK_N, num_warps) set to the integer VALUE in every "
        "tile config that has it",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    args = parser.parse_args(argv)
    reason = gpu_compile.unavailable_reason()
    if reason:
        parser.error(f"cannot compile for sm_{args.arch} here: {reason}")
    if args.op == "attention":
        params = dict(head_dim=args.head_dim, causal=args.causal, length=args.length, padding=not args.no_padding)
    else:
        params = dict(dim=args.dim, negatives=args.negatives)
    try:
        params["tiles"] = {key: int(value) for key, value in (item.split("=", 1) for item in args.tile)}
    except ValueError:
        parser.error(f"--tile: expected KEY=INTEGER, got {args.tile}")
    results = gpu_compile.compile_launches(args.op, args.dtype, arch=args.arch, sass=True, **params)
    print(f"{args.op} {args.dtype} {params}, sm_{args.arch}, one forward + backward:")
    for result in results:
        print("\n".join(describe(result)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
