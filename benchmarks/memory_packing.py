"""Where the memory of a training step goes, packed (``--packing``) against length buckets: an
allocation-level account of ``bench_packing``'s step, at the SmolLM2-135M architecture (its first
``MGH_BENCH_LAYERS`` layers), on the CPU.

Three measures, each entry in its own process (its first step, as ``bench_packing``'s fresh-process
RSS figure, then its second):

* **allocator**: ``torch.profiler`` with ``profile_memory``: every allocation and free of PyTorch's
  CPU allocator with its size and the allocator's running total. The peak of that total is the
  step's peak of live tensor bytes (no glibc slack, no freed-but-kept pages: what the resident set
  size also counts). At the peak, the live allocations made during the step are summed by the
  operator that made them (the innermost ``aten::`` op around the allocation).
* **resident set**: the process's peak RSS growth over the same first step (``VmHWM`` beyond the
  step's start), for comparison with the allocator's figure;
* **saved for backward** (second step): bytes of the tensors autograd keeps for backward (``saved_tensors_hooks``,
  each storage once), by the module that ran when they were saved (attention, MLP, norms, LoRA):
  the activations the forward leaves for backward.

Run: ``MGH_BENCH_LAYERS=4 python benchmarks/memory_packing.py`` (both workloads, both modes; one
process each), or ``python benchmarks/memory_packing.py WORKLOAD MODE`` for one.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_packing


def _op_name(node) -> str:
    """The innermost operator (``aten::...`` or a Python-level record) around an allocation event."""
    parent = node.parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.parent
    return parent.name if parent is not None else "(outside any aten op)"


def allocator_account(step) -> dict:
    """Run ``step`` once under the profiler; the allocator's peak live bytes and, at the peak, the
    live allocations of the step by the op that made them."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                f = node.extra_fields
                events.append((node.start_time_ns, f.ptr, f.alloc_size, f.total_allocated, _op_name(node)))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    start_total = events[0][3] - events[0][2]
    peak_at = max(range(len(events)), key=lambda i: events[i][3])
    live = {}
    for _, ptr, size, _, op in events[: peak_at + 1]:
        if size > 0:
            live[ptr] = (size, op)
        else:
            live.pop(ptr, None)  # freed (an allocation from before the step: not in ``live``)
    by_op = collections.Counter()
    for size, op in live.values():
        by_op[op] += size
    allocated = sum(e[2] for e in events if e[2] > 0)
    churn = collections.Counter()  # bytes allocated over the step by (op, size): what the step allocates most
    for e in events:
        if e[2] > 0:
            churn[(e[4], e[2])] += e[2]
    return {
        "peak_live_bytes_beyond_start": events[peak_at][3] - start_total,
        "live_at_peak_made_in_step": sum(by_op.values()),
        "allocations": sum(1 for e in events if e[2] > 0),
        "allocated_bytes": allocated,
        "at_peak_by_op": dict(by_op.most_common(12)),
        "allocated_by_op_and_size": [[op, size, total // size] for (op, size), total in churn.most_common(10)],
    }


def _module_kind(name: str) -> str:
    for part in ("lora_", "self_attn", "mlp", "norm", "embed_tokens"):
        if part in name:
            return {
                "lora_": "LoRA A/B",
                "self_attn": "attention (projections, rotary, attention)",
                "mlp": "MLP",
                "norm": "RMSNorm",
                "embed_tokens": "embedding",
            }[part]
    return "other (pooling, loss, model top)"


def saved_account(step, model) -> dict:
    """Bytes saved for backward in one step, each storage once, by the kind of module saving them."""
    current = ["(none)"]
    handles = []

    def enter(name):
        def hook(module, args):
            current.append(name)

        return hook

    def leave(module, args, output):
        current.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    seen, by_kind = set(), collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes():
            seen.add(key)
            by_kind[_module_kind(current[-1])] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in handles:
            h.remove()
    return {"saved_bytes": sum(by_kind.values()), "saved_by_module": dict(by_kind.most_common())}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_bytes(field: str) -> int:
    import re

    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def measure(workload: str, mode: str) -> dict:
    triplets, negatives = bench_packing.CASES["cpu"][workload]
    lengths = bench_packing.lengths_of(workload, triplets, negatives)
    dims = {**bench_packing.SMOLLM2_135M, "num_hidden_layers": bench_packing.LAYERS}
    step, tokens = bench_packing.make_step(
        mode, dims, lengths, triplets=triplets, negatives=negatives, device=torch.device("cpu")
    )
    result = {
        "workload": workload,
        "mode": mode,
        "layers": bench_packing.LAYERS,
        "real_tokens": tokens,
        "computed_tokens": step.padded_tokens,
        "forwards": step.forwards,
    }
    gc.collect()
    reset = _reset_peak_rss()
    base = _rss_bytes("VmRSS")
    result.update(allocator_account(step))  # the first step, as bench_packing's fresh-process RSS figure
    result["rss_growth_bytes"] = _rss_bytes("VmHWM") - base if reset else None
    result.update(saved_account(step, step.model))  # the second step
    return result


def main() -> int:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for workload in bench_packing.CASES["cpu"]:
        for mode in bench_packing.MODES:
            out = subprocess.run(
                [sys.executable, __file__, workload, mode], capture_output=True, text=True, check=True, env=env
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
