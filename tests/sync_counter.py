"""Count host-device syncs on the CPU: the aten ops that read a tensor's values on the host (on a GPU
each drains the queue), attributed to the code that asked for them.

    with SyncCounter() as syncs:
        step()
    syncs.ours      # [(op, "mgh_train/step.py:42"), ...]: from mgh_train or mgh_kernels
    syncs.others    # from transformers, peft, ...: reported, not ours to remove

An op counts where its value reaches the host: ``.item()``, ``bool()``, ``int()`` (aten's
``_local_scalar_dense``), ops whose output shape depends on the values (``nonzero``, ``unique``,
``masked_select``, boolean indexing), and ``equal``/``is_nonzero``. Copies to the host are not
seen on a CPU-only machine (every tensor is already there). The attribution is the innermost Python
frame outside torch itself.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::unique_consecutive",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::masked_select",
    "aten::equal",
    "aten::is_nonzero",
    "aten::repeat_interleave",
}
OURS = ("/mgh_train/", "/mgh_kernels/")


def _is_bool_index(func, args) -> bool:
    if func.name() not in ("aten::index.Tensor", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _caller() -> str:
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(torch_dir) or frame.filename == __file__:
            continue
        return f"{frame.filename}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that records each sync op with the caller that triggered it."""

    def __init__(self):
        super().__init__()
        self.ours: list[tuple[str, str]] = []
        self.others: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if (
            name in SYNC_OPS
            and not (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size"))
            or _is_bool_index(func, args)
        ):
            where = _caller()
            (self.ours if any(part in where for part in OURS) else self.others).append((name, where))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        lines = [f"{len(self.ours)} from mgh, {len(self.others)} from libraries"]
        for label, found in (("mgh", self.ours), ("libraries", self.others)):
            for op, where in sorted(set(found)):
                lines.append(f"  {label}: {op} at {where} x{found.count((op, where))}")
        return "\n".join(lines)


__all__ = ["SyncCounter"]
