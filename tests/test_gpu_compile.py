"""The Triton kernels compile for an H100 (sm_90), checked on any machine with Triton's NVIDIA backend.

Why this exists: without a GPU the other tests run the kernels under Triton's interpreter, which
executes them with NumPy and never runs the GPU compiler. It does not catch errors that only the
compiler sees: a ``tl.dot`` of mismatched dtypes (e.g. float32 probabilities times bfloat16
values), tiles below the tensor cores' minimum shape (16 in every dot dimension), constexpr/type
errors in untaken branches, MLIR lowering or ptxas failures, or tiles whose shared memory exceeds
the GPU's. Here the exact launches of a CUDA forward + backward are captured on meta tensors and
compiled ahead of time for sm_90 (see ``gpu_compile``); no GPU is needed, only ptxas, which the
Triton wheel bundles.
"""

import pytest

from mgh_kernels import attention

gpu_compile = pytest.importorskip("gpu_compile")

SKIP = gpu_compile.unavailable_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"cannot compile for sm_90 here: {SKIP}")

ARCH = 90
CASES = {
    "attention-bf16-d128-causal": dict(op="attention", dtype="bfloat16", head_dim=128, causal=True),
    "attention-bf16-d128-bidirectional": dict(op="attention", dtype="bfloat16", head_dim=128, causal=False),
    "attention-fp16-d64-causal": dict(op="attention", dtype="float16", head_dim=64, causal=True),
    "attention-fp16-d64-bidirectional": dict(op="attention", dtype="float16", head_dim=64, causal=False),
    # the one-sweep forward: causal L = 200 (two key chunks), bidirectional L = 100 (one; from 129
    # bidirectional takes the two passes); the default L = 1000 the two-pass one
    "attention-short-bf16-d128-causal": dict(op="attention", dtype="bfloat16", head_dim=128, causal=True, length=200),
    "attention-short-fp16-d64-bidirectional": dict(op="attention", dtype="float16", head_dim=64, causal=False,
                                                   length=100),
    "infonce-bf16-global-D1024": dict(op="infonce", dtype="bfloat16", dim=1024, negatives="global"),
    "infonce-bf16-own-D1024": dict(op="infonce", dtype="bfloat16", dim=1024, negatives="own"),
}
KERNELS = {
    "attention": ["_fwd_kernel", "_colsum_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
    "attention-short": ["_fwd_short_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
    # inverse norms of q, pos, neg; the splits' statistics and their combination with the loss;
    # the gradient scale, then one pass (B=100 is small): per source the logit gradients then
    # their projection; dq's last
    "global": ["_row_norms_kernel"] * 3 + ["_global_fwd_kernel", "_combine_splits_kernel", "_gradient_scale_kernel",
                                           "_global_dlogits_kernel", "_unscale_project_kernel",
                                           "_global_dlogits_kernel", "_unscale_project_kernel",
                                           "_unscale_project_kernel"],
    "own": ["_row_norms_kernel"] * 3 + ["_own_fwd_kernel", "_own_bwd_kernel"],  # the projection inside
}


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled in one child process (starting one costs ~5 s)."""
    results = gpu_compile.compile_many([dict(case, arch=ARCH) for case in CASES.values()])
    return dict(zip(CASES, results))


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_compile_for_h100(compiled, name):
    case, results = CASES[name], compiled[name]
    for r in results:  # shown with -rP or on failure
        print(f"{r['kernel']:20} shared={r.get('shared')} registers={r.get('registers')} "
              f"spills={r.get('spill_stores')}/{r.get('spill_loads')} {r['seconds']}s {r['constants']}")
    limit = attention.SHORT_MAX_LENGTH["half" if case.get("causal") else "half-bidirectional"]
    short = case["op"] == "attention" and case.get("length", 1000) <= limit
    kind = case.get("negatives", case["op"] + ("-short" if short else ""))
    assert [r["kernel"] for r in results] == KERNELS[kind]
    errors = [f"{r['kernel']} {r['constants']}:\n{r['error']}" for r in results if "error" in r]
    assert not errors, "\n\n".join(errors)
    limit = gpu_compile.MAX_SHARED[ARCH]
    too_big = [f"{r['kernel']}: {r['shared']} bytes" for r in results if r["shared"] > limit]
    assert not too_big, f"shared memory over the H100's {limit} bytes: {too_big}"
