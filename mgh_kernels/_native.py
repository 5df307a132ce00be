"""The native CPU library built from ``mgh_kernels/csrc/cpu_sweep.c``: compiled with the system's C
compiler on first use, kept in a cache folder, loaded with ctypes. The source is package data, so a
clone, ``pip install -e .``, ``pip install .`` and the wheel all build it the same way.

Why C through ctypes rather than an ATen extension: the row passes need no tensor API, so the
library compiles in about a second with no PyTorch headers and no ABI tie to the installed torch;
OpenMP threads it (the same libgomp torch loads, so the same pool of threads), the compiler
vectorises it. It also runs Python tasks on that pool in one parallel region (``_tasks``).

Where it cannot be had, ``library()`` is None and callers run the PyTorch ops instead (``status()``
says why): no compiler, a failed build, the source missing (a packaging that dropped
``mgh_kernels/csrc/``), or ``MGH_NATIVE=0``. Environment: ``MGH_NATIVE=0`` turns it off; ``CC``
names the compiler (default ``cc``); ``MGH_NATIVE_CACHE`` the folder for built libraries (default
``$XDG_CACHE_HOME/mgh_kernels`` or ``~/.cache/mgh_kernels``). A build failure warns once, and so
does a compiler named by ``CC`` that is not there (a missing default ``cc`` is quiet).

The cache. A build writes to a temporary name, records the library's size and SHA-256 in a
stamp file beside it (``<name>.sha256``), and renames both into place. A cached library is loaded
only when its stamp matches (a truncated file, from an interrupted copy or a full disk, would
otherwise kill the process with a bus error inside ``dlopen``), and kept only when it has our
symbols; any other cached file (truncated, garbage, a wrong library) is rebuilt once, and if the
rebuilt one fails too the PyTorch ops run, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

try:
    from _ctypes import dlclose as _dlclose
except ImportError:  # not POSIX

    def _dlclose(handle) -> None:
        pass


SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_sweep.c"
"""The C source, shipped inside the package (``[tool.setuptools.package-data]`` in pyproject.toml)."""

FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
    ["-O3", "-fopenmp", "-ffp-contract=off"],
    ["-O3"],
)
"""Compiler flags tried in turn: the first set that builds is kept."""

ENABLED = os.environ.get("MGH_NATIVE", "1") != "0"
"""Whether callers use the library (``MGH_NATIVE=0`` at import turns it off; tests switch it)."""

_lock = threading.Lock()
_state: dict = {}


TASK = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int)
"""The C type of ``mgh_parallel_tasks``' task: (task number, slot)."""


class _Damaged(Exception):
    """A cached library that fails its checks: rebuilt once."""


class _Unavailable(Exception):
    """Why the library cannot be had; ``quiet`` where that is expected (no compiler, no source)."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("MGH_NATIVE_CACHE"):
        return Path(os.environ["MGH_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mgh_kernels"


def _machine_key() -> str:
    """The CPU the library is built for (``-march=native``): its architecture and feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build() -> Path:
    if not SOURCE.is_file():
        raise _Unavailable(f"no source at {SOURCE}", quiet=True)
    name = os.environ.get("CC") or "cc"
    compiler = shutil.which(name)
    if compiler is None:  # quiet where no compiler was asked for; a CC that is not there is the user's to know
        raise _Unavailable(f"no C compiler ({name!r} is not on PATH)", quiet=not os.environ.get("CC"))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode() if isinstance(s, str) else s
            for s in (SOURCE.read_bytes(), version, repr(FLAG_SETS), _machine_key())
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_sweep-{key}.so"
    if target.is_file() and _intact(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            done = subprocess.run(
                [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(partial)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode == 0:
                stamp = _stamp_path(partial)
                stamp.write_text(_fingerprint(partial))
                # atomic: concurrent builders each write their own files. The stamp goes first: a
                # library without its matching stamp is never loaded, only rebuilt.
                os.replace(stamp, _stamp_path(target))
                os.replace(partial, target)
                return target
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
        finally:
            partial.unlink(missing_ok=True)
            _stamp_path(partial).unlink(missing_ok=True)
    raise _Unavailable(f"{compiler} failed: " + " | ".join(errors))


def _stamp_path(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


def _fingerprint(path: Path) -> str:
    """ "<size> <sha256>" of the file at ``path``."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _intact(path: Path) -> bool:
    """Whether the cached library at ``path`` is the file its build stamped: checked before
    ``dlopen``, which a truncated file kills with a bus error (no exception to catch)."""
    try:
        return _stamp_path(path).read_text().strip() == _fingerprint(path)
    except (OSError, UnicodeDecodeError):
        return False


def _discard(path: Path) -> None:
    """Remove a cached library that failed its checks, and its stamp (another process may have
    replaced it already: the rebuild then finds the good one)."""
    for stale in (path, _stamp_path(path)):
        try:
            stale.unlink()
        except OSError:
            pass


def _load(path: Path) -> ctypes.CDLL:
    if not _intact(path):
        raise _Damaged(f"{path} does not match its build stamp (truncated or replaced)")
    try:
        lib = ctypes.CDLL(str(path))  # ctypes releases the GIL for the call
    except OSError as error:
        raise _Damaged(f"{path} will not load as ours ({error})") from None
    try:  # a library without our symbols
        for symbol in ("mgh_softmax_rows_f32", "mgh_exp_shifted_rows_f32", "mgh_parallel_tasks"):
            getattr(lib, symbol)
    except AttributeError as error:
        _dlclose(lib._handle)  # else dlopen of the rebuilt file at this path returns this one again
        raise _Damaged(f"{path} will not load as ours ({error})") from None
    f32, i64, cint = ctypes.c_float, ctypes.c_int64, ctypes.c_int
    ptr = ctypes.c_void_p
    lib.mgh_softmax_rows_f32.argtypes = [ptr, i64, i64, ptr, cint, f32, f32, cint, ptr, ptr, cint]
    lib.mgh_softmax_rows_f32.restype = None
    lib.mgh_exp_shifted_rows_f32.argtypes = [ptr, i64, i64, ptr, f32, cint]
    lib.mgh_exp_shifted_rows_f32.restype = None
    lib.mgh_parallel_tasks.argtypes = [i64, cint, TASK]
    lib.mgh_parallel_tasks.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call; None where it cannot be had or is turned off."""
    if not ENABLED:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    path = _build()
                    try:
                        lib = _load(path)
                    except _Damaged:  # rebuilt once; a second failure falls back below
                        _discard(path)
                        path = _build()
                        lib = _load(path)
                    _state["lib"], _state["why"] = lib, f"loaded from {path}"
                except (_Unavailable, _Damaged, OSError, subprocess.SubprocessError) as error:
                    _state["lib"], _state["why"] = None, str(error)
                    if not getattr(error, "quiet", False):  # a compiler that fails, a library that will not load
                        warnings.warn(
                            f"mgh_kernels: the native CPU sweep is off ({error}); the PyTorch ops run instead",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    return _state["lib"]


def status() -> str:
    """Whether the library is in use, and from where or why not."""
    if not ENABLED:
        return "off (MGH_NATIVE=0)"
    library()
    return _state["why"]


def reset() -> None:
    """Forget the loaded library (the next ``library()`` builds or finds it again): for tests."""
    with _lock:
        _state.clear()
