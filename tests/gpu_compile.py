"""Compile the Triton kernels of a fused op for an NVIDIA GPU, on a machine without one.

``compile_launches(op, dtype, ...)`` captures the kernel launches that one forward and backward of
the op would make on CUDA, and compiles each of them ahead of time for ``sm_<arch>`` with the real
Triton pipeline (frontend, MLIR lowering, PTX, ptxas), returning one summary per launch.

What is captured (the real launch code, not a re-typed copy): the op's autograd Function runs its
``forward`` and ``backward`` on ``meta`` tensors (shapes and dtypes, no data), its launches
recorded and not run (``mgh_kernels.testing.recorded_launches(run=False)``), with the tile
choices (``mgh_kernels.attention.tiles``, ``mgh_kernels.infonce.tiles``) forced to their CUDA
branch.

* ``"attention"``: ``attention.ops.ATAAttentionFunction`` forward with the column sums, then backward with
  gradients of both the output and the column sums; GQA (Hq = 4 Hkv), a key padding mask as
  ``ata_attention`` passes it (a float32 bias), ``causal`` as given. Kernels: ``_fwd_kernel``, ``_colsum_kernel``,
  ``_bwd_delta_kernel``, ``_bwd_dkdv_kernel``, ``_bwd_dq_kernel`` (``_fwd_short_kernel`` in place
  of the first two when ``length`` is short enough for the one-sweep forward).
* ``"attention-varlen"``: ``attention.varlen.VarlenAttentionFunction`` on two packed texts of
  ``length`` tokens, forward with the column sums and backward through both: ``_varlen_fwd_kernel``,
  ``_varlen_colsum_kernel``, ``_varlen_delta_kernel``, ``_varlen_dkdv_kernel``, ``_varlen_dq_kernel``.
* ``"infonce"``: ``infonce.ops.InfoNCEFunction`` forward and backward with K = 3 hard negatives per query:
  ``_row_norms_kernel`` for the queries, positives and negatives, then for ``negatives`` "global"
  ``_global_fwd_kernel``; then ``_global_dlogits_kernel`` and ``_unscale_project_kernel`` for the
  positives and for the negatives, and ``_unscale_project_kernel`` for the queries (the GEMMs
  between them are cuBLAS calls, run here on meta tensors); for "own" ``_own_fwd_kernel`` and
  ``_own_bwd_kernel``.

Each launch is specialised the way ``JITFunction.run`` does it (Triton's own binder and
``_pack_args``: integers equal to 1 become constants, 16-divisibility hints, pointer dtypes).

With ``sass=True`` each summary also lists the kernel's hot loops as the GPU would run them: the
innermost loops of its SASS (``nvdisasm``, bundled with Triton) that hold a tensor-core
instruction, each with its instruction count per thread per iteration and the count per opcode.
A static measure (no GPU), for comparing two versions of a kernel's inner loop;
``benchmarks/sass_loops.py`` prints it.

The work runs in a child Python without ``TRITON_INTERPRET``: the test session sets it on machines
without a GPU, and kernels defined under it are interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Largest shared memory one block may use (opt-in), bytes: A100, RTX 30/A10, RTX 40/L4, H100.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def unavailable_reason():
    """None when Triton's NVIDIA backend and its ptxas are installed here, else why not."""
    try:
        import triton
        from triton.backends import backends

        if "nvidia" not in backends:
            return f"triton {triton.__version__} has no NVIDIA backend"
        path = triton.knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"Triton's NVIDIA backend or ptxas is unavailable: {type(e).__name__}: {e}"
    return None if path and os.path.exists(path) else "ptxas not found"


def compile_launches(op: str, dtype: str, *, arch: int = 90, sass: bool = False, **params) -> list[dict]:
    """Capture one forward + backward of ``op`` and compile every launch for ``sm_<arch>``.

    Args:
        op: "attention" or "infonce".
        dtype: "float16", "bfloat16" or "float32".
        sass: also disassemble each kernel and summarise its hot loops (``loops`` below).
        params: attention: ``head_dim`` (64), ``causal`` (False), ``length`` (1000), ``padding``
            (True: a key padding mask); infonce: ``dim`` (1024), ``negatives`` ("global" or
            "own"), ``batch`` (100); either: ``tiles`` ({key: value} set in every tile config
            that has the key, e.g. {"BLOCK_N_FWD": 128}: to compile a variant).

    Returns:
        One dict per launch, in launch order: ``kernel``, ``constants`` (its constexpr arguments),
        ``seconds`` (compile time), and either ``error`` (the compiler's message) or ``shared``
        (bytes of shared memory), ``registers`` and ``spill_stores`` / ``spill_loads`` (bytes per
        thread, from ptxas -v); with ``sass``, ``loops``: one dict per innermost SASS loop holding a
        tensor-core instruction, in code order: ``instructions`` (per thread per iteration) and
        ``opcodes`` ({opcode without modifiers: count}).
    """
    return compile_many([dict(op=op, dtype=dtype, arch=arch, sass=sass, **params)])[0]


def compile_many(cases: list[dict], timeout: float = 600) -> list[list[dict]]:
    """``compile_launches(**case)`` for each case, all in one child process (it takes ~5 s to start)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every kernel is really compiled
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), json.dumps(cases)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"capturing the launches of {cases} failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# The child process
# ------------------------------------------------------------------------------------------------


def _capture(
    op,
    dtype,
    *,
    head_dim=64,
    causal=False,
    length=1000,
    padding=True,
    dim=1024,
    negatives="global",
    batch=100,
    tiles=None,
):
    """[(kernel, args, kwargs)] of one CUDA forward + backward, run on meta tensors."""
    import torch

    from mgh_kernels import testing
    from mgh_kernels.attention import ops as attention_ops
    from mgh_kernels.attention import tiles as attention_tiles
    from mgh_kernels.infonce import ops as infonce_ops
    from mgh_kernels.infonce import tiles as infonce_tiles

    tile_module, tile_functions = {
        "attention": (attention_tiles, ("flash_tiles", "colsum_tiles", "one_sweep_tiles", "backward_tiles")),
        "attention-varlen": (attention_tiles, ("flash_tiles", "colsum_tiles", "backward_tiles")),
        "infonce": (infonce_tiles, ("kernel_tiles",)),
    }[op]
    dtype, meta, cuda = getattr(torch, dtype), torch.device("meta"), torch.device("cuda")
    applied = set()

    def on_cuda(choose):
        def cuda_tiles(device, *args, **kwargs):
            cfg = choose(cuda, *args, **kwargs)
            if cfg is not None:
                cfg.update({key: value for key, value in (tiles or {}).items() if key in cfg})
                applied.update(key for key in tiles or {} if key in cfg)
            return cfg

        return cuda_tiles

    def empty(*shape, dt=dtype, grad=False):
        return torch.empty(shape, dtype=dt, device=meta, requires_grad=grad)

    saved = {name: getattr(tile_module, name) for name in tile_functions}
    try:
        for name, choose in saved.items():  # documented, overridable: the CUDA choices on meta tensors
            setattr(tile_module, name, on_cuda(choose))
        with testing.recorded_launches(run=False) as launches:
            if op == "attention":
                hkv, group = 2, 4
                q = empty(2, hkv * group, length, head_dim, grad=True)
                k, v = empty(2, hkv, length, head_dim, grad=True), empty(2, hkv, length, head_dim, grad=True)
                bias = empty(2, length, dt=torch.float32) if padding else None  # as ata_attention passes it
                out, colsum = attention_ops.ATAAttentionFunction.apply(q, k, v, bias, causal, head_dim**-0.5, True)
                torch.autograd.grad((out, colsum), (q, k, v), (torch.empty_like(out), torch.empty_like(colsum)))
            elif op == "attention-varlen":  # two packed texts of ``length`` tokens
                from mgh_kernels.attention import varlen as varlen_ops

                hkv, group = 2, 4
                q = empty(2 * length, hkv * group, head_dim, grad=True)
                k, v = empty(2 * length, hkv, head_dim, grad=True), empty(2 * length, hkv, head_dim, grad=True)
                cu = empty(3, dt=torch.int32)
                out, colsum = varlen_ops.VarlenAttentionFunction.apply(
                    q, k, v, cu, length, causal, head_dim**-0.5, True
                )
                torch.autograd.grad((out, colsum), (q, k, v), (torch.empty_like(out), torch.empty_like(colsum)))
            else:
                q, pos, neg = (
                    empty(batch, dim, grad=True),
                    empty(batch, dim, grad=True),
                    empty(batch * 3, dim, grad=True),
                )
                own = {"global": False, "own": True}[negatives]
                losses = infonce_ops.InfoNCEFunction.apply(q, pos, neg, 0.05, True, own, 0)  # neg flattened
                torch.autograd.grad(losses, (q, pos, neg), torch.empty_like(losses))
    finally:
        for name, choose in saved.items():
            setattr(tile_module, name, choose)
    unknown = sorted(set(tiles or {}) - applied)
    if unknown:
        raise ValueError(f"tiles: {unknown} in none of {op}'s tile configs")
    return [(launch.kernel, launch.args, launch.kwargs) for launch in launches]


_SUMMARIES: dict = {}  # repeated identical launches: Triton's cache serves them without ptxas's log


def _compile(kernel, args, kwargs, arch, sass=False):
    """Summary dict of compiling one launch exactly as specialised by ``JITFunction.run`` (a launch
    identical to an earlier one gets the earlier one's figures: the compile cache prints none)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"debug": False, **kwargs}
    mocked = [MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
    bound, specialization, _ = binder(*mocked, **kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, None)
    key = (kernel.__name__, repr(signature), repr(constants), repr(attrs), repr(options), arch, sass)
    if key in _SUMMARIES:
        return dict(_SUMMARIES[key], seconds=0.0)
    result = dict(kernel=kernel.__name__, constants={kernel.arg_names[p[0]]: c for p, c in constants.items()})
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constants, attrs), target=target, options=options.__dict__
            )
    except Exception as e:  # noqa: BLE001 - the error is the result
        # Triton's CompilationError points at the call site; the reason is in its chained causes.
        chain = [e]
        while chain[-1].__cause__ is not None and len(chain) < 8:
            chain.append(chain[-1].__cause__)
        result["error"] = "\n".join(f"{type(err).__name__}: {err}" for err in chain)
    else:
        text = log.getvalue()

        def number(pattern):
            found = re.search(pattern, text)
            return int(found.group(1)) if found else None

        result.update(
            shared=compiled.metadata.shared,
            registers=number(r"Used (\d+) registers"),
            spill_stores=number(r"(\d+) bytes spill stores"),
            spill_loads=number(r"(\d+) bytes spill loads"),
        )
        if sass:
            result["loops"] = hot_loops(_disassemble(compiled.asm["cubin"]))
    result["seconds"] = round(time.perf_counter() - start, 2)
    _SUMMARIES[key] = result
    return result


def _disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from the nvdisasm that ships with Triton's ptxas."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def _opcode(instruction: str) -> str:
    """``@!P0 FFMA.FTZ R1, ...`` -> ``FFMA`` (predicate and modifiers dropped)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def hot_loops(sass: str) -> list[dict]:
    """The innermost loops of a kernel's SASS that hold a tensor-core instruction (HGMMA, HMMA):
    [{"instructions": n, "opcodes": {opcode: count}}] in code order. A loop is a backward branch
    to a label; innermost: no other such loop inside it (a loop inside it without tensor-core
    work, e.g. a wait loop, does not hide it; its instructions are counted once per iteration of
    the outer loop)."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        code = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if code:
            instructions.append(code.group(1))
    spans = []
    for end, instruction in enumerate(instructions):
        target = re.search(r"(\.L_x_\d+)", instruction) if _opcode(instruction) == "BRA" else None
        if target and labels.get(target.group(1), end + 1) <= end:
            spans.append((labels[target.group(1)], end))

    def opcodes(start, end):
        counts = {}
        for instruction in instructions[start : end + 1]:
            counts[_opcode(instruction)] = counts.get(_opcode(instruction), 0) + 1
        return counts

    tensor_core = [(start, end) for start, end in spans if {"HGMMA", "HMMA"} & set(opcodes(start, end))]
    return [
        dict(instructions=end - start + 1, opcodes=opcodes(start, end))
        for start, end in tensor_core
        if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in tensor_core)
    ]


def _main(cases):
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v (registers, spills) while compiling
    results = []
    for case in json.loads(cases):
        case = dict(case)
        op, dtype, arch, sass = case.pop("op"), case.pop("dtype"), case.pop("arch", 90), case.pop("sass", False)
        launches = _capture(op, dtype, **case)
        results.append([_compile(kernel, args, kwargs, arch, sass) for kernel, args, kwargs in launches])
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1])
