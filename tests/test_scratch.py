"""``_scratch``: the CPU paths' per-thread buffers, reused by name, never handed to two live users."""

import threading

import torch

from mgh_kernels import _scratch
from mgh_kernels._scratch import scratch


def test_same_name_reuses_the_storage_and_names_are_apart():
    _scratch.release()
    a = scratch("test.a", (3, 5), torch.float32, "cpu")
    again = scratch("test.a", (2, 4), torch.float32, "cpu")
    other = scratch("test.b", (3, 5), torch.float32, "cpu")
    wider = scratch("test.a", (3, 5), torch.float64, "cpu")
    assert again.data_ptr() == a.data_ptr() and again.shape == (2, 4)
    assert other.data_ptr() != a.data_ptr() and wider.data_ptr() != a.data_ptr()
    assert wider.dtype == torch.float64 and wider.is_contiguous()


def test_grows_when_asked_for_more():
    _scratch.release()
    small = scratch("test.grow", (4,), torch.float32, "cpu")
    big = scratch("test.grow", (64, 64), torch.float32, "cpu")
    assert big.shape == (64, 64) and big.numel() == 4096
    assert scratch("test.grow", (4,), torch.float32, "cpu").data_ptr() == big.data_ptr() != small.data_ptr()


def test_larger_than_kept_and_other_devices_are_fresh(monkeypatch):
    _scratch.release()
    monkeypatch.setattr(_scratch, "KEEP_ELEMENTS", 100)
    large = scratch("test.large", (11, 10), torch.float32, "cpu")
    kept = scratch("test.kept", (10, 10), torch.float32, "cpu")
    assert large._base is None and kept._base is not None  # fresh memory, not a view of a kept buffer
    meta = scratch("test.meta", (2, 3), torch.float32, "meta")
    assert meta.device.type == "meta" and meta.shape == (2, 3)
    assert set(_scratch._local.buffers) == {("test.kept", torch.float32)}


def test_each_thread_has_its_own_buffers():
    _scratch.release()
    mine = scratch("test.thread", (8,), torch.float32, "cpu").data_ptr()
    theirs = []
    worker = threading.Thread(
        target=lambda: theirs.append(scratch("test.thread", (8,), torch.float32, "cpu").data_ptr())
    )
    worker.start()
    worker.join()
    assert theirs[0] != mine


def test_release_drops_the_buffers():
    kept = scratch("test.release", (8,), torch.float32, "cpu")
    _scratch.release()
    fresh = scratch("test.release", (8,), torch.float32, "cpu")
    assert fresh._base is not kept._base


def test_made_in_inference_mode_then_used_outside(gen):
    """A buffer first made under ``torch.inference_mode`` (an evaluation) serves a training step
    after it, and the other way round: in-place writes to an inference tensor outside inference
    mode would be an error."""
    from mgh_kernels import ata_attention, infonce_loss, use_backend

    _scratch.release()
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    emb = [torch.randn(6, 8, generator=gen) for _ in range(2)]
    with use_backend("torch"):
        with torch.inference_mode():
            ata_attention(q, k, v)
            infonce_loss(*emb, torch.randn(6, 1, 8, generator=gen))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, colsum = ata_attention(*leaves)
        (out.sum() + colsum.sum()).backward()
        loss = infonce_loss(*(t.clone().requires_grad_() for t in emb), torch.randn(6, 1, 8, generator=gen))
        loss.backward()
        with torch.inference_mode():
            ata_attention(q, k, v)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
