"""The built distributions carry the native CPU sweep's source (``mgh_kernels/csrc/``), and an
installed wheel builds and runs it as a clone does: the wheel is built offline from a copy of the
tree (``pip wheel --no-build-isolation``), installed into a fresh virtualenv that sees this
environment's dependencies (torch, ...) but not this checkout, and a CPU op there runs through the
library built into an empty ``MGH_NATIVE_CACHE``. The sdist is checked for the source too."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "mgh_kernels/csrc/cpu_sweep.c"
HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None

# In the fresh virtualenv: the package must come from the wheel, the library must be built from the
# wheel's source into the empty cache, and ata_attention's CPU path must call its row pass.
CHECK = """
import sys, os, torch
import mgh_kernels
from mgh_kernels import _native, ata_attention, use_backend
venv, cache = sys.argv[1], sys.argv[2]
assert mgh_kernels.__file__.startswith(venv), mgh_kernels.__file__
assert str(_native.SOURCE).startswith(venv) and _native.SOURCE.is_file(), _native.SOURCE
lib = _native.library()
assert lib is not None, _native.status()
assert _native.status().startswith(f"loaded from {cache}{os.sep}cpu_sweep-"), _native.status()

called = []
class Recording:
    def __getattr__(self, name):
        called.append(name)
        return getattr(lib, name)
_native._state["lib"] = Recording()
q = torch.randn(1, 2, 40, 16)
with use_backend("torch"):
    out, colsum = ata_attention(q, q, q)
assert "mgh_softmax_rows_f32" in called, called
assert torch.allclose(colsum.sum(-1), torch.full((1, 2), 40.0)), colsum.sum(-1)
print(mgh_kernels.__file__)
"""


def _copy_tree(dest: Path) -> Path:
    """What a build reads (pyproject.toml, README.md, the packages), without caches, so the build's
    own folders (build/, *.egg-info) land outside the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for package in ("mgh_kernels", "mgh_train"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
        )
    return dest


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler to build the native library")
def test_installed_wheel_builds_and_runs_the_native_library(tmp_path):
    tree = _copy_tree(tmp_path / "tree")
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(tree),
        ],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("mgh-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert SOURCE in archive.namelist()
        assert archive.read(SOURCE) == (ROOT / SOURCE).read_bytes()

    # A bare virtualenv; this environment's site-packages after its own (a .pth line adds a folder
    # to sys.path without running that folder's .pth files, so this checkout's editable install
    # stays out), and the wheel installed by this environment's pip.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    outer = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "outer-site-packages.pth").write_text("".join(f"{path}\n" for path in outer))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MGH_NATIVE", "TRITON_INTERPRET")}
    env["MGH_NATIVE_CACHE"] = str(cache)
    done = _run([str(python), "-c", CHECK, str(venv), str(cache)], cwd=tmp_path, env=env)
    assert Path(done.stdout.strip()).is_relative_to(purelib)
    assert len(list(cache.glob("cpu_sweep-*.so"))) == 1


def test_sdist_carries_the_native_source(tmp_path):
    tree = _copy_tree(tmp_path / "tree")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tree).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}
        assert SOURCE in members, sorted(members)
        assert archive.extractfile(members[SOURCE]).read() == (ROOT / SOURCE).read_bytes()
