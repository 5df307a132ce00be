"""A test-only shortcut in Triton's interpreter (``TRITON_INTERPRET=1``, the CPU runs of the kernels).

Triton's interpreter re-patches ``triton.language`` on every call of a ``@triton.jit`` helper made
from inside a kernel (``InterpretedFunction.__call__`` runs ``_patch_lang``: an
``inspect.getmembers`` over ``tl``, ``tl.math`` and ``tl.tensor``), once per helper call and per
program of the grid. The kernel launch around it (``GridExecutor.__call__``) has already patched
the same modules, so the helper's patching finds nothing left to patch and only costs time (a large
share of a kernel test's run: the kernels call their tile helpers in every program).
``install()`` skips it while a launch that patched the helper's language modules is running; the
interpreted kernels compute what they computed before (tests/test_triton_interpreter.py checks).
A helper whose globals hold a language module the launch did not patch takes Triton's own path the
first time in a launch (that path's patching is never undone, so later calls may skip it too).
"""

from __future__ import annotations

import threading

_STOCK: dict = {}
"""Triton's own ``GridExecutor.__call__`` and ``InterpretedFunction.__call__`` while installed."""


def install() -> bool:
    """Install the shortcut (once per process). False, with nothing changed, when Triton's
    interpreter does not have the shape this was written against (another Triton version)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    if _STOCK:
        return True
    # the classes' own __call__ functions are what gets wrapped, not a callable check
    grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)  # noqa: B004
    device_call = getattr(getattr(interpreter, "InterpretedFunction", None), "__call__", None)  # noqa: B004
    if grid_call is None or device_call is None or not hasattr(interpreter, "_patch_lang"):
        return False
    langs = (tl, tl.core)  # the modules _patch_lang looks for in a function's globals
    state = threading.local()

    def patched_langs(fn) -> frozenset:
        return frozenset(id(value) for value in fn.__globals__.values() if any(value is m for m in langs))

    def launch(self, *args, **kwargs):
        stack = state.__dict__.setdefault("stack", [])
        stack.append(patched_langs(self.fn))
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            stack.pop()

    def helper_call(self, *args, **kwargs):
        stack = getattr(state, "stack", None)
        if not stack:
            return device_call(self, *args, **kwargs)
        wanted = patched_langs(self.fn)
        if not wanted <= stack[-1]:
            # Triton patches the helper's modules and never undoes it: they stay patched for the
            # rest of this launch (e.g. tl.core for tl.cdiv, whose module imports core, not tl).
            stack[-1] = stack[-1] | wanted
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()  # what Triton's call runs after its _patch_lang
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    _STOCK.update(grid=grid_call, device=device_call)
    interpreter.GridExecutor.__call__ = launch
    interpreter.InterpretedFunction.__call__ = helper_call
    return True


def installed() -> bool:
    return bool(_STOCK)


def uninstall() -> None:
    """Triton's interpreter as it was (for the test that compares the two)."""
    from triton.runtime import interpreter

    if _STOCK:
        interpreter.GridExecutor.__call__ = _STOCK["grid"]
        interpreter.InterpretedFunction.__call__ = _STOCK["device"]
        _STOCK.clear()
