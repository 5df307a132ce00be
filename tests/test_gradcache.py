"""GradCache in one process (mgh_train/gradcache.py): a micro-batch encoded in chunks, its loss taken
on the cached embeddings and the chunks re-encoded with gradients gives the loss and every LoRA
gradient of the unchunked micro-batch; the two passes' embeddings are bit-equal with dropout; the
chunks follow --chunk-size and --chunk-tokens; and a GradCache run trains as the plain one."""

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from mgh_kernels import infonce_loss
from mgh_train import trainer
from mgh_train.batches import Collate, MicroBatchPlanner, chunks
from mgh_train.config import TrainConfig
from mgh_train.data import NoDuplicatesBatcher, load_training_data
from mgh_train.gradcache import gradcache_step
from mgh_train.model import Embedder, EmbedderConfig
from mgh_train.step import embedding_loss, micro_batch_loss
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")

B = 5  # queries; with one hard negative each, 15 texts


def tiny_embedder(**options):
    """A tiny random Llama with LoRA whose B matrices are random too (peft starts them at zero, where
    every A gradient is zero and dropout on the adapter's input changes nothing)."""
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    torch.manual_seed(0)
    embedder = Embedder.build(
        EmbedderConfig(base_model=None, **options), model=tiny_decoder("llama", seed=0), tokenizer=tiny_tokenizer()
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return embedder


@pytest.fixture(scope="module")
def plan():
    cfg = TrainConfig(output="/unused", progress=False)
    examples = load_training_data(cfg, lambda _: None)[0]
    batcher = NoDuplicatesBatcher(examples, B, seed=3)
    return next(
        iter(
            MicroBatchPlanner(
                examples, batcher, random.Random(3), schedule="level:4", steps=1, stage_steps=None, grad_accum=1
            )
        )
    )


def lora_grads(embedder) -> dict:
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad}


def run_gradcache(embedder, batch):
    def backward(output, grad=None, *, sync):
        torch.autograd.backward(output, grad)

    def loss_on(emb, micro_batch):
        return embedding_loss(emb, micro_batch, infonce_loss, tau=0.05, negatives="global")

    return gradcache_step(embedder, batch, loss_on, scale=1.0, backward=backward, last=True)


@pytest.mark.parametrize("pooling", ["mean", "last_token", "ata"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_gradcache_equals_the_unchunked_batch(plan, pooling, bidirectional):
    """Loss and every LoRA gradient, chunks of 1, 3 and B texts against one forward per length bucket.
    Both compute the same float32 values, in other groupings (each chunk padded to its own longest
    text, other matmul shapes): they agree to float32 rounding (measured: 1e-6 of each tensor's
    largest element at most), so the bounds are 1e-5 relative over all gradients together and 1e-4
    of its largest element for each tensor."""
    embedder = tiny_embedder(pooling=pooling, bidirectional=bidirectional)
    embedder.train()
    plain = Collate(embedder.tokenizer, embedder.config)(plan)
    loss = micro_batch_loss(embedder, plain, infonce_loss, tau=0.05, negatives="global")
    loss.backward()
    want = lora_grads(embedder)
    for size in (1, 3, B):
        embedder.zero_grad(set_to_none=True)
        batch = Collate(embedder.tokenizer, embedder.config, chunk_size=size)(plan)
        assert len(batch.buckets) == -(-len(batch.inverse) // size)
        got = run_gradcache(embedder, batch)
        torch.testing.assert_close(got, loss.detach(), rtol=1e-5, atol=0)
        grads = lora_grads(embedder)
        error = sum(((grads[n] - want[n]) ** 2).sum() for n in want).sqrt()
        assert error <= 1e-5 * sum((g**2).sum() for g in want.values()).sqrt(), (size, float(error))
        for name in want:  # each tensor to 1e-4 of its largest element
            worst = float((grads[name] - want[name]).abs().max())
            assert worst <= 1e-4 * float(want[name].abs().max()), (name, size, worst)
    assert all(g.abs().sum() > 0 for g in want.values())  # every LoRA weight takes a gradient


def test_dropout_passes_are_bit_equal_and_ata_takes_its_gradient(plan):
    """With LoRA dropout, each chunk's second forward replays its RNG state: the embeddings of the
    two passes are bit-equal; and the column sums ATA pools with carry a gradient in the second."""
    embedder = tiny_embedder(pooling="ata", lora_dropout=0.3)
    embedder.train()
    outputs, colsums = [], []
    handle = embedder.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    real = embedder.pool

    def pool(hidden, mask, colsum):
        colsums.append(colsum)
        return real(hidden, mask, colsum)

    embedder.pool = pool
    batch = Collate(embedder.tokenizer, embedder.config, chunk_size=4)(plan)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    run_gradcache(embedder, batch)
    handle.remove()
    n = len(batch.buckets)
    assert len(outputs) == 2 * n
    for first, second in zip(outputs[:n], outputs[n:]):
        assert torch.equal(first, second)
    assert not any(c.requires_grad for c in colsums[:n]) and all(c.requires_grad for c in colsums[n:])
    # dropout was on: another RNG state gives other embeddings
    torch.manual_seed(12)
    with torch.no_grad():
        assert not torch.equal(embedder(batch.buckets[0]), outputs[0])
    # the RNG continues as after one pass (the replays are forked)
    torch.set_rng_state(before)
    with torch.no_grad():
        for features in batch.buckets:
            embedder(features)
    after_one_pass = torch.get_rng_state()
    torch.set_rng_state(before)
    run_gradcache(embedder, batch)
    assert torch.equal(torch.get_rng_state(), after_one_pass)


def test_chunks_follow_the_size_and_the_token_budget():
    lengths = [50, 9, 17, 33, 8, 120, 64, 10]
    order = sorted(range(8), key=lambda i: -lengths[i])
    assert chunks(lengths, size=3) == [order[0:3], order[3:6], order[6:8]]
    assert chunks(lengths, size=0) == [order]
    budget = chunks(lengths, tokens=130, multiple=8)  # 120 -> 120 alone; 64 -> 2 texts of 64 padded ...
    assert [i for c in budget for i in c] == order
    for c in budget:
        padded = len(c) * -(-lengths[c[0]] // 8) * 8
        assert padded <= 130 or len(c) == 1
    assert chunks(lengths, size=2, tokens=10_000) == chunks(lengths, size=2)


def test_a_gradcache_run_trains_as_the_plain_one(tmp_path):
    """The trainer with --chunk-size 2 and --grad-accum 2: the losses and final weights of the plain
    run (float32 rounding: 1e-5 on the losses; weights after AdamW's normalised steps within 2e-5)."""
    options = dict(
        steps=3,
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        warmup=0.0,
        progress=False,
        max_length=64,
        schedule="random",
        workers=0,
        report_to=["none"],
    )
    runs = {}
    for name, extra in (("plain", {}), ("gradcache", {"chunk_size": 2})):
        embedder = tiny_embedder(pooling="ata")
        result = trainer.train(
            TrainConfig(output=str(tmp_path / name), **options, **extra),
            embedder=embedder,
            log=lambda _: None,
            report_accuracy=False,
        )
        runs[name] = (result.losses, {n: p.detach().clone() for n, p in embedder.named_parameters() if p.requires_grad})
    assert runs["gradcache"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    for name, value in runs["plain"][1].items():
        torch.testing.assert_close(runs["gradcache"][1][name], value, rtol=0, atol=2e-5)
    assert Path(tmp_path / "gradcache" / "model" / "mgh_config.json").is_file()
