"""The native CPU library (``mgh_kernels/csrc/cpu_sweep.c`` built by ``_native``) and its row passes
(``cpu_rows``): against float64 by flash-attention's rule, against the PyTorch ops they
replace, and the fallbacks (no compiler, a failed build, ``MGH_NATIVE=0``)."""

import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mgh_kernels import _native, cpu_rows
from mgh_kernels._precision import exp_floor

ROOT = Path(__file__).resolve().parents[1]
FLOOR = exp_floor(torch.float32)
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None


@pytest.fixture
def native():
    lib = _native.library()
    if lib is None:
        pytest.skip(f"the native library is not available here: {_native.status()}")
    return lib


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build cache and no loaded library; the real one is found again afterwards."""
    monkeypatch.setenv("MGH_NATIVE_CACHE", str(tmp_path / "cache"))
    _native.reset()
    yield tmp_path
    _native.reset()


def scores(rows, cols, gen):
    """Scores with what the sweeps meet: spreads past the exp floor, -inf (the causal mask), the
    padding bias, and ties at the max."""
    s = torch.randn(2, rows, cols, generator=gen) * 30
    s[0, 0, : cols // 2] = float("-inf")
    s[1, -1, ::3] = torch.finfo(torch.float32).min / 4
    if cols > 1:
        s[0, -1, :2] = 5.0
    return s


def torch_ops(fn):
    old, _native.ENABLED = _native.ENABLED, False
    try:
        return fn()
    finally:
        _native.ENABLED = old


@pytest.mark.parametrize("cols", [1, 17, 256, 1000])
def test_softmax_rows_within_the_rule(native, cols, gen):
    s = scores(5, cols, gen)
    top, total = torch.empty(2, 5, 1), torch.empty(2, 5, 1)
    p = cpu_rows.softmax_(s.clone(), FLOOR, top, total)
    top_ops, total_ops = torch.empty(2, 5, 1), torch.empty(2, 5, 1)
    p_ops = torch_ops(lambda: cpu_rows.softmax_(s.clone(), FLOOR, top_ops, total_ops))
    wide = s.double()
    want_top = wide.amax(-1, keepdim=True)
    want_p = (wide - want_top).clamp_min(FLOOR).exp()
    assert torch.equal(top, top_ops) and torch.equal(top.double(), want_top)
    for got, ops, want in ((p, p_ops, want_p), (total, total_ops, want_p.sum(-1, keepdim=True))):
        err = ((got.double() - want) / want).abs().max().item()
        own = ((ops.double() - want) / want).abs().max().item()
        assert err <= 2 * own + 2**-23, f"relative error {err:.3g}, the PyTorch ops' {own:.3g}"


@pytest.mark.parametrize("cols", [1, 17, 1000])
@pytest.mark.parametrize("fixed", [False, True], ids=["row-max", "fixed-shift"])
def test_scaled_softmax_rows_within_the_rule(native, cols, fixed, gen):
    """The loss's form: a scale per column (1 / (tau |c|)) and, for cosine logits, a fixed shift."""
    raw = torch.randn(3, cols, generator=gen)
    scale = torch.rand(cols, generator=gen) * 20 + 1
    shift = (raw * scale).abs().max().item() if fixed else None
    got = [torch.empty(3, 1), torch.empty(3, 1)]
    ops = [torch.empty(3, 1), torch.empty(3, 1)]
    p = cpu_rows.softmax_(raw.clone(), FLOOR, *got, scale=scale, shift=shift)
    p_ops = torch_ops(lambda: cpu_rows.softmax_(raw.clone(), FLOOR, *ops, scale=scale, shift=shift))
    x = raw.double() * scale.double()
    want_top = torch.full((3, 1), shift, dtype=torch.float64) if fixed else x.amax(-1, keepdim=True)
    assert torch.equal(got[0], ops[0])
    torch.testing.assert_close(got[0].double(), want_top, rtol=2**-23, atol=0)
    want_p = (x - got[0].double()).clamp_min(FLOOR).exp()  # against the top both return, in float32
    for mine, theirs, want in ((p, p_ops, want_p), (got[1], ops[1], want_p.sum(-1, keepdim=True))):
        err = ((mine.double() - want) / want).abs().max().item()
        own = ((theirs.double() - want) / want).abs().max().item()
        assert err <= 2 * own + 2**-22, f"relative error {err:.3g}, the PyTorch ops' {own:.3g}"


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("fixed", [False, True], ids=["row-max", "fixed-shift"])
def test_sums_without_storing(native, scaled, fixed, gen):
    """``store=False`` (a loss without gradients): the same top and sums, the block left as it was."""
    raw = torch.randn(2, 3, 77, generator=gen) * 4
    scale = torch.rand(77, generator=gen) + 0.5 if scaled else None
    shift = 40.0 if fixed else None
    stored, kept = [torch.empty(2, 3, 1), torch.empty(2, 3, 1)], [torch.empty(2, 3, 1), torch.empty(2, 3, 1)]
    cpu_rows.softmax_(raw.clone(), FLOOR, *stored, scale=scale, shift=shift)
    block = raw.clone()
    cpu_rows.softmax_(block, FLOOR, *kept, scale=scale, shift=shift, store=False)
    assert torch.equal(block, raw) and torch.equal(stored[0], kept[0]) and torch.equal(stored[1], kept[1])


@pytest.mark.parametrize("cols", [1, 33, 1000])
def test_exp_shifted_rows_within_the_rule(native, cols, gen):
    s = scores(4, cols, gen)
    shift = s.amax(-1, keepdim=True) + torch.rand(2, 4, 1, generator=gen) * 3  # a log-sum-exp is >= the max
    got = cpu_rows.exp_shifted_(s.clone(), shift, FLOOR)
    ops = torch_ops(lambda: cpu_rows.exp_shifted_(s.clone(), shift, FLOOR))
    want = (s.double() - shift.double()).clamp_min(FLOOR).exp()
    err = ((got.double() - want) / want).abs().max().item()
    own = ((ops.double() - want) / want).abs().max().item()
    assert err <= 2 * own + 2**-23, f"relative error {err:.3g}, the PyTorch ops' {own:.3g}"


def test_shift_that_is_a_strided_view(native, gen):
    """cpu_flash passes lse[heads, rows], a view with a stride between heads."""
    s = torch.randn(3, 4, 9, generator=gen)
    lse = torch.logsumexp(torch.randn(3, 10, 9, generator=gen), -1, keepdim=True) + 5
    view = lse[:, 2:6]
    assert not view.is_contiguous()
    got = cpu_rows.exp_shifted_(s.clone(), view, FLOOR)
    torch.testing.assert_close(got, (s - view).clamp_min(FLOOR).exp(), rtol=3e-7, atol=0)


def test_nan_propagates_as_in_pytorch(native):
    s = torch.zeros(1, 2, 8)
    s[0, 0, 3] = float("nan")
    top, total = torch.empty(1, 2, 1), torch.empty(1, 2, 1)
    p = cpu_rows.softmax_(s, FLOOR, top, total)
    assert torch.isnan(p[0, 0, 3]) and torch.isnan(total[0, 0]) and torch.isfinite(p[0, 1]).all()
    assert torch.isnan(cpu_rows.exp_shifted_(torch.full((1, 1, 4), float("nan")), torch.zeros(1, 1, 1), FLOOR)).all()


def test_same_result_at_any_thread_count(native, gen):
    s = torch.randn(2, 37, 300, generator=gen) * 10
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            top, total = torch.empty(2, 37, 1), torch.empty(2, 37, 1)
            results.append((cpu_rows.softmax_(s.clone(), FLOOR, top, total), top, total))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_float64_and_discontiguous_blocks_take_the_pytorch_ops(native, gen):
    s = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    top, total = torch.empty(2, 3, 1, dtype=torch.float64), torch.empty(2, 3, 1, dtype=torch.float64)
    p = cpu_rows.softmax_(s.clone(), FLOOR, top, total)
    torch.testing.assert_close(p.sum(-1, keepdim=True), total, rtol=1e-15, atol=0)
    torch.testing.assert_close(top, s.amax(-1, keepdim=True), rtol=0, atol=0)
    assert cpu_rows._native_for(torch.empty(3, 4).t()) is None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_builds_once_into_the_cache(fresh):
    path = _native._build()
    assert path.parent == fresh / "cache" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert _native._build() == path and path.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert _native.library() is not None and _native.status() == f"loaded from {path}"


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_concurrent_builds_agree(fresh):
    paths, errors = [], []

    def build():
        try:
            paths.append(_native._build())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(set(paths)) == 1
    names = sorted(p.name for p in paths[0].parent.iterdir())  # no partial files left
    assert names == [paths[0].name, paths[0].name + ".sha256"]


def test_no_compiler_falls_back_quietly(fresh, monkeypatch, recwarn):
    """No ``cc`` on a machine without a compiler is expected: quiet."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh))  # an empty folder: no cc
    assert _native.library() is None
    assert _native.status() == "no C compiler ('cc' is not on PATH)"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_named_compiler_that_is_missing_warns_once(fresh, monkeypatch):
    """``CC=/nonexistent``: the user asked for that compiler, so the fallback says so, once."""
    monkeypatch.setenv("CC", "/nonexistent")
    with pytest.warns(RuntimeWarning) as caught:
        assert _native.library() is None
        assert _native.library() is None
    assert len(caught) == 1 and "'/nonexistent' is not on PATH" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)


LOAD = (
    "import sys, torch; from mgh_kernels import _native, cpu_rows\n"
    "lib = _native.library()\n"
    "print(_native.status())\n"
    "s = torch.randn(3, 40); top, total = torch.empty(3, 1), torch.empty(3, 1)\n"
    "cpu_rows.softmax_(s, -80.0, top, total)\n"
    "assert torch.allclose(total, torch.ones(3, 1) * total), total\n"
)


def load_in_child(cache):
    """Load the library in a fresh process (a bus error there must not take the test down)."""
    env = {**os.environ, "MGH_NATIVE_CACHE": str(cache), "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", LOAD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def wrong_library(path):
    """A real shared library without our symbols, at ``path``."""
    src = path.with_name("other.c")
    src.write_text("int mgh_other(void) { return 1; }\n")
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    src.unlink()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-library", "wrong-library-stamped", "no-stamp"])
def test_a_damaged_cache_is_rebuilt(fresh, damage):
    """What an interrupted copy, a full disk or a stray file leaves in the cache: the next process
    neither dies (a truncated library bus-errors inside dlopen) nor stays on the slow path; it
    rebuilds once, quietly, and loads."""
    path = _native._build()
    good = path.read_bytes()
    stamp = _native._stamp_path(path)
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(len(good) // 2)
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(good)))
    elif damage.startswith("wrong-library"):
        wrong_library(path)
        if damage == "wrong-library-stamped":  # passes the stamp: only the symbol check sees it
            stamp.write_text(_native._fingerprint(path))
    else:
        stamp.unlink()
    done = load_in_child(fresh / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"loaded from {path}", done.stdout + done.stderr
    assert "RuntimeWarning" not in done.stderr, done.stderr
    assert path.read_bytes() == good and _native._intact(path)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
def test_a_rebuild_that_fails_again_falls_back_with_one_warning(fresh, monkeypatch):
    """A compiler that keeps producing a library without our symbols: rebuilt once, then the
    PyTorch ops, with one warning."""
    compiler = fresh / "wrong-cc"
    real = shutil.which(os.environ.get("CC", "cc"))
    compiler.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && echo wrong 1.0 && exit 0\n'
        f"for a; do out=$a; done\n"
        f"echo 'int mgh_other(void) {{ return 1; }}' > {fresh}/other.c\n"
        f'exec {real} -shared -fPIC {fresh}/other.c -o "$out"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.warns(RuntimeWarning) as caught:
        assert _native.library() is None
        assert _native.library() is None
    assert len(caught) == 1 and "will not load as ours" in str(caught[0].message)


def test_failed_build_warns_and_falls_back(fresh, monkeypatch):
    compiler = fresh / "broken-cc"
    compiler.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'broken: no' >&2\nexit 1\n"
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.warns(RuntimeWarning, match="native CPU sweep is off"):
        assert _native.library() is None
    assert "failed" in _native.status() and "broken: no" in _native.status()
    s = torch.randn(1, 2, 6)
    top, total = torch.empty(1, 2, 1), torch.empty(1, 2, 1)
    p = cpu_rows.softmax_(s.clone(), FLOOR, top, total)  # the PyTorch ops
    torch.testing.assert_close(p, (s - s.amax(-1, keepdim=True)).exp())


def test_turned_off_by_the_environment():
    code = (
        "import torch; from mgh_kernels import _native, ata_attention, use_backend\n"
        "assert _native.library() is None, _native.status()\n"
        "q = torch.randn(1, 2, 40, 16)\n"
        "with use_backend('torch'):\n    out, colsum = ata_attention(q, q, q)\n"
        "assert torch.allclose(colsum.sum(-1), torch.tensor([40.0])), colsum.sum(-1)\n"
        "print(_native.status())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MGH_NATIVE": "0"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "off (MGH_NATIVE=0)"


def test_exp_floor_is_a_float32_normal_exponent():
    """The C exp assumes its clamped input keeps 2^n normal (n >= -126)."""
    assert math.exp(FLOOR) >= torch.finfo(torch.float32).tiny and round(FLOOR / math.log(2)) >= -126


def test_missing_source_falls_back_quietly(fresh, monkeypatch, recwarn):
    """A packaging that dropped mgh_kernels/csrc/: the PyTorch ops run, with no warning."""
    monkeypatch.setattr(_native, "SOURCE", fresh / "absent" / "cpu_sweep.c")
    assert _native.library() is None
    assert _native.status() == f"no source at {fresh / 'absent' / 'cpu_sweep.c'}"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
