"""The training bar's loss refreshes every step (not only at --log-every's logging steps)."""

import pytest
import torch

from mgh_train.progress import TrainBar


def test_the_bar_shows_each_steps_loss_and_the_logged_rows(capsys):
    bar = TrainBar(total=5)
    shown = []
    for step, loss in enumerate([2.5, 2.25, 2.0], start=1):
        bar.step(torch.tensor(loss, dtype=torch.float64))
        shown.append(bar.bar.postfix)
        assert bar.bar.n == step
    assert shown == ["loss=2.5000", "loss=2.2500", "loss=2.0000"]
    bar.logged({"loss": 2.0, "stage": 1, "examples_per_s": 12.345})
    bar.step(torch.tensor(1.5))
    assert bar.bar.postfix == "loss=1.5000, stage=1, ex_s=12.3"
    bar.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_bar_never_waits_and_catches_up():
    bar = TrainBar(total=3)
    bar.step(torch.tensor(3.0, device="cuda"))
    torch.cuda.synchronize()
    bar.step(torch.tensor(2.0, device="cuda"))
    torch.cuda.synchronize()
    bar.step(torch.tensor(1.0, device="cuda"))  # the first two copies are done by now
    assert bar.loss in (2.0, 1.0)
    bar.close()


def test_a_run_feeds_the_bar_every_steps_loss(tmp_path, monkeypatch, cpu_kernels):
    pytest.importorskip("peft")
    import json

    from mgh_train import trainer
    from test_st_compat import config, pair_rows, tiny_embedder, write_jsonl

    seen = []
    original = TrainBar.step
    monkeypatch.setattr(TrainBar, "step", lambda self, loss: (original(self, loss), seen.append(self.loss)))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = config(tmp_path, data=[str(data)], steps=3, log_every=10, progress=True, schedule="random")
    trainer.train(cfg, embedder=tiny_embedder(), log=lambda _: None, report_accuracy=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert seen == pytest.approx([r["loss"] for r in rows if "loss" in r])  # before the step-3 flush read them
