#!/usr/bin/env bash
# One GPU round: the machine and versions, the GPU correctness tests of ata_attention (bf16
# included), enable_ata and the trainer's default precision (bf16 weights under bf16 autocast),
# then the attention, InfoNCE, training-step (in that default precision) and reference benchmarks
# (pytest-benchmark JSON plus the ratio table in the log).
#
# Run from the repository root on a CUDA machine that has torch and triton (this package need not
# be installed: PYTHONPATH=. is used):
#     OUT=/some/dir bash benchmarks/gpu_round.sh [PART ...]
# PARTs (default: all but sweeps, in this order): tests, attention, infonce, train, reference;
# sweeps (the tile sweeps sweep_attention.py and sweep_infonce.py, JSON beside the log, then
# profile_infonce.py: device time per kernel); colsum (only the column-sum pass's sweep,
# sweep_attention.py --parts colsum: the variants that decide the forward's 2.0x bar); scale
# (bench_scale.py: GradCache against a plain step, the largest batch per device). One device
# command may run for at most 10 minutes, so a first round on a fresh machine can be split, e.g.
# "tests attention" in one call and "infonce train reference" in the next.
# With $OUT set, everything printed also goes to $OUT/gpu_round.log and the benchmark JSON to
# $OUT/bench.json; without it the JSON goes to .benchmarks/gpu_round.json. Every step runs even
# if an earlier one failed; the exit status is non-zero if any step failed. PYTHON picks the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

step() {
    printf '\n=== %s ===\n' "$*"
}

PARTS=("$@")
[ "${#PARTS[@]}" -eq 0 ] && PARTS=(tests attention infonce train reference)
for part in "${PARTS[@]}"; do
    case "$part" in
        tests|attention|infonce|train|reference|sweeps|colsum|scale) ;;
        *) echo "gpu_round.sh: unknown part '$part' (expected tests, attention, infonce, train, reference, sweeps," \
                "colsum or scale)" >&2
           exit 2 ;;
    esac
done

wants() {
    local part
    for part in "${PARTS[@]}"; do [ "$part" = "$1" ] && return 0; done
    return 1
}

round() {
    local failed=()

    step "machine"
    nvidia-smi || failed+=("nvidia-smi")
    "$PY" - <<'EOF' || failed+=("versions")
import platform
import torch
import triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}")
print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible to torch'}")
EOF

    if wants tests; then
        local tests=(tests/test_attention.py tests/test_enable_ata.py tests/test_infonce.py tests/test_compile.py
                     tests/test_autocast.py tests/test_bench_train.py)
        step "GPU correctness tests: ${tests[*]}"
        "$PY" -m pytest -q "${tests[@]}" || failed+=("tests")
    fi

    if wants colsum && ! wants sweeps; then
        step "column-sum tile sweep: benchmarks/sweep_attention.py --parts colsum"
        "$PY" benchmarks/sweep_attention.py --parts colsum ${OUT:+--json "$OUT/sweep_colsum.json"} \
            || failed+=("sweep_colsum")
    fi

    if wants sweeps; then
        local sweep
        for sweep in attention infonce; do
            step "tile sweep: benchmarks/sweep_$sweep.py"
            "$PY" "benchmarks/sweep_$sweep.py" ${OUT:+--json "$OUT/sweep_$sweep.json"} || failed+=("sweep_$sweep")
        done
        step "InfoNCE profile: benchmarks/profile_infonce.py"
        "$PY" benchmarks/profile_infonce.py || failed+=("profile_infonce")
    fi

    if wants scale; then
        step "GradCache against a plain step: benchmarks/bench_scale.py"
        "$PY" benchmarks/bench_scale.py ${OUT:+--json "$OUT/bench_scale.json"} || failed+=("bench_scale")
    fi

    local benches=() part
    for part in attention infonce train reference; do
        wants "$part" && benches+=("benchmarks/bench_$part.py")
    done
    local json=${OUT:+$OUT/bench.json}
    json=${json:-.benchmarks/gpu_round.json}
    if [ "${#benches[@]}" -eq 0 ]; then
        :
    elif "$PY" -c 'import pytest_benchmark' 2>/dev/null; then
        step "benchmarks: ${benches[*]}"
        mkdir -p "$(dirname "$json")"
        "$PY" -m pytest --benchmark -q "${benches[@]}" --benchmark-json="$json" || failed+=("benchmarks")
    else
        echo "pytest-benchmark is not installed for $PY: carry its wheels (pytest-benchmark and"
        echo "py-cpuinfo, e.g. 'pip download pytest-benchmark -d wheels') and 'pip install wheels/*.whl'"
        failed+=("benchmarks (pytest-benchmark missing)")
    fi

    step "summary"
    if [ "${#failed[@]}" -eq 0 ]; then
        echo "gpu_round: every step passed"
        return 0
    fi
    (IFS=,; echo "gpu_round: failed: ${failed[*]}")
    return 1
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    round 2>&1 | tee "$OUT/gpu_round.log"
else
    round
fi
