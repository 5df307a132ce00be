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

from mgh_kernels.attention import tiles

gpu_compile = pytest.importorskip("gpu_compile")

SKIP = gpu_compile.unavailable_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"cannot compile for sm_90 here: {SKIP}")

ARCH = 90
CASES = {
    "attention-bf16-d128-causal": dict(op="attention", dtype="bfloat16", head_dim=128, causal=True),
    "attention-bf16-d128-bidirectional": dict(op="attention", dtype="bfloat16", head_dim=128, causal=False, sass=True),
    "attention-fp16-d64-causal": dict(op="attention", dtype="float16", head_dim=64, causal=True),
    "attention-fp16-d64-bidirectional": dict(op="attention", dtype="float16", head_dim=64, causal=False),
    # without a key padding mask (HAS_MASK False: float32, or inputs cuDNN refuses)
    "attention-bf16-d128-causal-no-mask": dict(
        op="attention", dtype="bfloat16", head_dim=128, causal=True, padding=False
    ),
    # the one-sweep forward: causal L = 200 (two key chunks), bidirectional L = 100 (one; from 129
    # bidirectional takes the two passes); the default L = 1000 the two-pass one
    "attention-short-bf16-d128-causal": dict(op="attention", dtype="bfloat16", head_dim=128, causal=True, length=200),
    "attention-short-fp16-d64-bidirectional": dict(
        op="attention", dtype="float16", head_dim=64, causal=False, length=100
    ),
    "attention-varlen-bf16-d128-causal": dict(op="attention-varlen", dtype="bfloat16", head_dim=128, causal=True),
    "attention-varlen-fp16-d64-bidirectional": dict(op="attention-varlen", dtype="float16", head_dim=64, causal=False),
    "attention-varlen-fp32-d64-causal": dict(op="attention-varlen", dtype="float32", head_dim=64, causal=True),
    "infonce-bf16-global-D1024": dict(op="infonce", dtype="bfloat16", dim=1024, negatives="global"),
    "infonce-bf16-own-D1024": dict(op="infonce", dtype="bfloat16", dim=1024, negatives="own"),
}
KERNELS = {
    "attention": ["_fwd_kernel", "_colsum_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
    "attention-varlen": [
        "_varlen_fwd_kernel",
        "_varlen_colsum_kernel",
        "_varlen_delta_kernel",
        "_varlen_dkdv_kernel",
        "_varlen_dq_kernel",
    ],
    "attention-short": ["_fwd_short_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"],
    # inverse norms of q, pos, neg; the splits' statistics and their combination with the loss;
    # the gradient scale, then one pass (B=100 is small): per source the logit gradients then
    # their projection; dq's last
    "global": ["_row_norms_kernel"] * 3
    + [
        "_global_fwd_kernel",
        "_combine_splits_kernel",
        "_gradient_scale_kernel",
        "_global_dlogits_kernel",
        "_unscale_project_kernel",
        "_global_dlogits_kernel",
        "_unscale_project_kernel",
        "_unscale_project_kernel",
    ],
    "own": ["_row_norms_kernel"] * 3 + ["_own_fwd_kernel", "_own_bwd_kernel"],  # the projection inside
}


# The default run compiles one case per kernel family (the trainer's bf16 at head size 128, and the
# case test_sass_summary_of_the_flash_forward reads); `pytest -m slow` compiles the rest.
SASS_CASE = "attention-bf16-d128-bidirectional"
DEFAULT_CASES = (SASS_CASE, "attention-varlen-bf16-d128-causal", "infonce-bf16-global-D1024")


@pytest.fixture(scope="module")
def compiled(request):
    """The cases the selected tests read, compiled in one child process (starting one costs ~5 s)."""
    selected = set()
    for item in request.session.items:
        function = getattr(item, "function", None)
        if function is test_kernels_compile_for_h100:
            selected.add(item.callspec.params["name"])
        elif function is test_sass_summary_of_the_flash_forward:
            selected.add(SASS_CASE)
    names = [name for name in CASES if name in selected]
    results = gpu_compile.compile_many([dict(CASES[name], arch=ARCH) for name in names])
    return dict(zip(names, results))


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[] if name in DEFAULT_CASES else [pytest.mark.slow]) for name in CASES]
)
def test_kernels_compile_for_h100(compiled, name):
    case, results = CASES[name], compiled[name]
    for r in results:  # shown with -rP or on failure
        print(
            f"{r['kernel']:20} shared={r.get('shared')} registers={r.get('registers')} "
            f"spills={r.get('spill_stores')}/{r.get('spill_loads')} {r['seconds']}s {r['constants']}"
        )
    limit = tiles.SHORT_MAX_LENGTH["half" if case.get("causal") else "half-bidirectional"]
    short = case["op"] == "attention" and case.get("length", 1000) <= limit
    kind = case.get("negatives", case["op"] + ("-short" if short else ""))
    assert [r["kernel"] for r in results] == KERNELS[kind]
    errors = [f"{r['kernel']} {r['constants']}:\n{r['error']}" for r in results if "error" in r]
    assert not errors, "\n\n".join(errors)
    limit = gpu_compile.MAX_SHARED[ARCH]
    too_big = [f"{r['kernel']}: {r['shared']} bytes" for r in results if r["shared"] > limit]
    assert not too_big, f"shared memory over the H100's {limit} bytes: {too_big}"


def test_hot_loops_are_the_innermost_tensor_core_loops():
    """``hot_loops`` on a hand-written listing: an outer loop holding an inner one with an HGMMA,
    and a second inner loop without tensor-core work (not a hot loop)."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/              @!P0 FFMA.FTZ R4, R3, R5, R4 ;
        /*0050*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0060*/                   FADD R6, R6, R7 ;
        /*0070*/                   BRA `(.L_x_2) ;
        /*0080*/                   BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""
    assert gpu_compile.hot_loops(sass) == [
        dict(instructions=4, opcodes={"HGMMA": 1, "MUFU": 1, "FFMA": 1, "BRA": 1}),
    ]
    # A wait loop inside the tensor-core loop does not hide it.
    waiting = """
.L_x_0:
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
.L_x_1:
        /*0010*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R2 ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
        /*0030*/                   BRA `(.L_x_0) ;
"""
    assert gpu_compile.hot_loops(waiting) == [dict(instructions=4, opcodes={"HGMMA": 1, "SYNCS": 1, "BRA": 2})]


def test_unknown_tile_key_is_an_error():
    with pytest.raises(RuntimeError, match=r"tiles: \['BLOCK_NFWD'\] in none of infonce's tile configs"):
        gpu_compile.compile_launches("infonce", "bfloat16", dim=64, tiles={"BLOCK_NFWD": 128})


def test_sass_summary_of_the_flash_forward(compiled):
    """With ``sass=True`` each launch lists its hot loops: the flash forward has two (key tiles
    within L, then the boundary tiles), each with its two tensor-core products per tile."""
    forward = compiled[SASS_CASE][0]
    assert forward["kernel"] == "_fwd_kernel"
    assert len(forward["loops"]) == 2
    for loop in forward["loops"]:
        assert loop["opcodes"]["HGMMA"] >= 2 and loop["opcodes"]["MUFU"] > 0
        assert 100 < loop["instructions"] < 2000, loop["instructions"]  # a tile's work, not a stub loop
