"""The training progress bar: its loss refreshes every step without making the host wait on the device.

Each step's loss (a device scalar) is copied to the host without blocking (into pinned memory on
CUDA, with an event recorded after the copy); the bar shows the newest step whose copy has
finished, so the loop never reads a device value outside its logging steps (:mod:`mgh_train.metrics`).
On the CPU the copy is the value itself and the bar shows every step's own loss.
The stage and examples/s come from the logging steps' rows.
"""

from __future__ import annotations

from collections import deque

import torch


class TrainBar:
    """A tqdm bar over ``total`` optimizer steps, starting at ``initial`` (a resumed run)."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.copies: deque = deque()  # (host loss, event or None), oldest first
        self.loss: float | None = None
        self.extra: dict = {}

    def step(self, loss: torch.Tensor) -> None:
        """Advance one step; ``loss`` is the step's loss (any device, 0-dim)."""
        loss = loss.detach()
        if loss.device.type == "cuda":
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.copies.append((host, event))
        else:
            self.copies.append((loss, None))
        while self.copies and (self.copies[0][1] is None or self.copies[0][1].query()):
            host, _ = self.copies.popleft()
            self.loss = float(host)
        self._postfix()
        self.bar.update(1)  # redraws at tqdm's own rate (mininterval)

    def logged(self, row: dict) -> None:
        """A logging step's row: its loss (read anyway), stage and examples/s join the bar."""
        self.copies.clear()  # steps up to this row: their losses are read
        self.loss = row["loss"]
        self.extra = {"stage": row["stage"], "ex_s": f"{row['examples_per_s']:.1f}"}
        self._postfix()
        self.bar.refresh()

    def _postfix(self) -> None:
        if self.loss is not None:
            self.bar.set_postfix({"loss": f"{self.loss:.4f}", **self.extra}, refresh=False)

    def close(self) -> None:
        self.bar.close()


__all__ = ["TrainBar"]
