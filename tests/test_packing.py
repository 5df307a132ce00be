"""--packing (mgh_train/packing.py): packed rows against today's padded length buckets on the same
micro-batch, by equality.

Float rule: the packed and the padded paths do the same float32 arithmetic in other groupings
(other matmul shapes, per-text attention instead of padded rows), so each is compared with the
padded path run in float64 on the same weights: the packed error is at most twice the padded
float32 error plus a small absolute term (the rule of the kernel tests). This covers embeddings,
the loss and every LoRA gradient, for the tiny Llama and Qwen3 and for SmolLM2 (slow); left and
right padding pack to the same row; no tensor of total x total tokens is made in a packed step;
a packed run trains as the padded one on data it was not written against (SciFact) and resumes
exactly; the options are checked."""

import json
import random
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("peft")
from mgh_kernels import infonce_loss
from mgh_train import packing, trainer
from mgh_train.batches import Collate, MicroBatchPlanner
from mgh_train.config import TrainConfig
from mgh_train.data import NoDuplicatesBatcher, load_training_data
from mgh_train.gradcache import gradcache_step
from mgh_train.model import Embedder, EmbedderConfig
from mgh_train.step import embed, embedding_loss
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
B = 5
ATOL = 1e-6  # the absolute term of the rule (float32 values of order one)


def quiet(_):
    pass


def tiny_embedder(family="llama", dtype=torch.float32, padding_side="right", **options):
    """A tiny random decoder with LoRA whose B matrices are random too (so every LoRA weight takes a
    gradient), the same weights on every call; ``dtype`` float64 gives the reference."""
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    torch.manual_seed(0)
    embedder = Embedder.build(
        EmbedderConfig(base_model=None, **options),
        model=tiny_decoder(family, seed=0),
        tokenizer=tiny_tokenizer(padding_side=padding_side),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return embedder.to(dtype).train()


@pytest.fixture(scope="module")
def plan():
    cfg = TrainConfig(output="/unused", progress=False)
    examples = load_training_data(cfg, quiet)[0]
    batcher = NoDuplicatesBatcher(examples, B, seed=3)
    return next(
        iter(
            MicroBatchPlanner(
                examples, batcher, random.Random(3), schedule="level:4", steps=1, stage_steps=None, grad_accum=1
            )
        )
    )


def step_values(embedder, batch):
    """(embeddings, loss, LoRA gradients) of one micro-batch, float64 copies."""
    embedder.zero_grad(set_to_none=True)
    emb = embed(embedder, batch)
    loss = embedding_loss(emb, batch, infonce_loss, tau=0.05, negatives="global")
    loss.backward()
    grads = {n: p.grad.double() for n, p in embedder.named_parameters() if p.requires_grad}
    return emb.detach().double(), loss.detach().double(), grads


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def assert_rule(got, baseline, truth, what):
    err, ref_err = max_err(got, truth), max_err(baseline, truth)
    assert err <= 2 * ref_err + ATOL * max(1.0, float(truth.abs().max())), (
        f"{what}: packed error {err:.3g} vs padded float32's {ref_err:.3g}"
    )


def assert_packed_within_rule(make, plan, max_tokens):
    """Packed float32 vs padded float32 vs padded float64, on ``plan``'s micro-batch."""
    values = {}
    for name, dtype, collate in [
        ("padded", torch.float32, Collate),
        ("truth", torch.float64, Collate),
        ("packed", torch.float32, packing.PackingCollate),
    ]:
        embedder = make(dtype)
        options = {"max_tokens": max_tokens} if collate is packing.PackingCollate else {}
        batch = collate(embedder.tokenizer, embedder.config, **options)(plan)
        if collate is packing.PackingCollate:
            assert all(packing.is_packed(f) for f in batch.buckets)
            assert all(f["input_ids"].shape[1] <= max_tokens or packing.texts_in(f) == 1 for f in batch.buckets)
        values[name] = step_values(embedder, batch)
    (emb, loss, grads), (emb0, loss0, grads0), (emb64, loss64, grads64) = (
        values["packed"],
        values["padded"],
        values["truth"],
    )
    assert float(loss64) > 0.1  # a loss of order one: the gradients are real
    assert_rule(emb, emb0, emb64, "embeddings")
    assert_rule(loss, loss0, loss64, "loss")
    assert set(grads) == set(grads64) and all(float(g.abs().max()) > 0 for g in grads64.values())
    for name in grads64:
        assert_rule(grads[name], grads0[name], grads64[name], name)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "pooling, bidirectional", [("ata", False), ("mean", True), ("last_token", False), ("weighted_mean", True)]
)
def test_packed_step_equals_padded_within_the_float_rule(plan, family, pooling, bidirectional):
    """Embeddings, loss and every LoRA gradient; rows of at most 96 tokens (several rows)."""
    make = lambda dtype: tiny_embedder(
        family, dtype, pooling=pooling, bidirectional=bidirectional, exclude_instruction=pooling == "ata"
    )
    assert_packed_within_rule(make, plan, max_tokens=96)


@pytest.mark.slow
def test_smollm2_packed_step_equals_padded_within_the_float_rule(smollm2_plain, plan):
    """The real SmolLM2-135M (its tokenizer pads on the left), ATA pooling: one packed row."""
    from transformers import AutoModel, AutoTokenizer

    def make(dtype):
        torch.manual_seed(0)
        config = EmbedderConfig(base_model=None, lora_r=4, lora_alpha=8, max_length=64)
        embedder = Embedder.build(
            config,
            model=AutoModel.from_pretrained(smollm2_plain),
            tokenizer=AutoTokenizer.from_pretrained(smollm2_plain),
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in embedder.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
        return embedder.to(dtype).train()

    assert_packed_within_rule(make, plan, max_tokens=4096)


def test_left_and_right_padding_pack_to_the_same_row(plan):
    """The same texts padded on either side give one packed row and the same embeddings, bit for bit."""
    rows = {}
    for side in ("left", "right"):
        embedder = tiny_embedder(padding_side=side, exclude_instruction=True)
        features = embedder.tokenize(
            [e.query for e in plan.examples] + [e.positive for e in plan.examples], instruction="Find the passage"
        )
        assert bool((features["attention_mask"][:, 0 if side == "left" else -1] == 0).any())  # padding on that side
        rows[side] = packing.from_padded(features)
        with torch.no_grad():
            rows[side]["emb"] = embedder(rows[side])
    left, right = rows["left"], rows["right"]
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], torch.Tensor):
            assert torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key


def test_pack_bins_keep_the_budget_and_every_text_once():
    gen = random.Random(0)
    lengths = [gen.randint(1, 120) for _ in range(57)] + [300]
    for tokens, size in [(128, 0), (256, 5), (0, 7), (0, 0), (512, 0)]:
        bins = packing.pack_bins(lengths, tokens=tokens, size=size)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        for b in bins:
            if tokens and len(b) > 1:
                assert sum(lengths[i] for i in b) <= tokens
            assert not size or len(b) <= size
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        if tokens:  # first-fit decreasing: no two rows could have been one
            sums = sorted(sum(lengths[i] for i in b) for b in bins)
            assert size or len(sums) < 2 or sums[0] + sums[1] > tokens
        if not tokens:
            assert len(bins) == (-(-len(lengths) // size) if size else 1)
    assert [len(b) for b in packing.pack_bins(lengths, tokens=128)].count(1) >= 1  # 300 > 128: its own row


class SquareTensors(TorchDispatchMode):
    """Records every tensor an op returns with two dimensions of size ``n``."""

    def __init__(self, n):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.n) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return result


@pytest.mark.parametrize("pooling", ["ata", "mean"])
def test_no_total_by_total_tensor_in_a_packed_step(plan, pooling):
    """A whole packed training step (forward, pooling, loss, backward) under a dispatch mode that
    records any op output with two dimensions of the row's total tokens; the padded step of the
    same texts, which builds [B, 1, L, L] masks, is caught by the same mode at its own L."""
    embedder = tiny_embedder(pooling=pooling)
    batch = packing.PackingCollate(embedder.tokenizer, embedder.config)(plan)
    (row,) = batch.buckets
    total = row["input_ids"].shape[1]
    assert total not in (32, 64, 400, 8, 4, 2) and total > 64  # no model dimension aliases it
    with SquareTensors(total) as square:
        step_values(embedder, batch)
    assert not square.found, square.found[:5]
    padded = Collate(embedder.tokenizer, embedder.config, max_buckets=1)(plan)
    with SquareTensors(padded.buckets[0]["input_ids"].shape[1]) as square:
        step_values(tiny_embedder(pooling=pooling), padded)
    assert square.found  # the mode sees an L x L mask where there is one


def test_a_token_budget_is_refused_where_forwards_are_collective():
    """The collator refuses what the option check refuses (packing.check_max_tokens), for callers
    that build it directly."""
    embedder = tiny_embedder(pooling="ata")
    with pytest.raises(ValueError, match=r"^max_tokens_per_forward: under --parallel fsdp every forward is collective"):
        packing.PackingCollate(embedder.tokenizer, embedder.config, max_tokens=60, one_forward=True)
    packing.PackingCollate(embedder.tokenizer, embedder.config, max_tokens=0, one_forward=True)  # texts only: fine


def test_gradcache_chunks_cut_by_tokens_equal_the_plain_step(plan):
    """GradCache over packed chunks of at most 60 real tokens: the loss and LoRA gradients of one
    plain padded forward per bucket, to float32 rounding."""
    embedder = tiny_embedder(pooling="ata")
    want_emb, want_loss, want = step_values(embedder, Collate(embedder.tokenizer, embedder.config)(plan))
    batch = packing.PackingCollate(embedder.tokenizer, embedder.config, max_tokens=60)(plan)
    assert len(batch.buckets) > 2
    embedder.zero_grad(set_to_none=True)

    def backward(output, grad=None, *, sync):
        torch.autograd.backward(output, grad)

    loss = gradcache_step(
        embedder,
        batch,
        lambda e, b: embedding_loss(e, b, infonce_loss, tau=0.05, negatives="global"),
        scale=1.0,
        backward=backward,
        last=True,
    )
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    grads = {n: p.grad.double() for n, p in embedder.named_parameters() if p.requires_grad}
    error = sum(((grads[n] - want[n]) ** 2).sum() for n in want).sqrt()
    assert error <= 1e-5 * sum((g**2).sum() for g in want.values()).sqrt()


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


def scifact_rows(path: Path, count: int = 24) -> Path:
    """FlagEmbedding rows from SciFact's test qrels: a claim, its cited abstract, two other abstracts
    (long-tailed lengths, and text the tiny tokenizer was not trained on)."""
    corpus = {}
    for line in (DATA / "scifact" / "corpus.jsonl").read_text().splitlines():
        doc = json.loads(line)
        corpus[doc["_id"]] = (doc["title"] + " " + doc["text"])[: 40 + 37 * (len(corpus) % 11)]
    queries = {
        q["_id"]: q["text"] for q in map(json.loads, (DATA / "scifact" / "queries.jsonl").read_text().splitlines())
    }
    ids = list(corpus)
    rows = []
    for line in (DATA / "scifact" / "qrels" / "test.tsv").read_text().splitlines()[1 : count + 1]:
        query, doc, _ = line.split("\t")
        rows.append(
            {
                "query": queries[query],
                "pos": [corpus[doc]],
                "neg": [corpus[ids[(len(rows) * 7 + j) % len(ids)]] for j in (1, 2)],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(tmp_path, name, **options):
    base = dict(
        steps=3,
        batch_size=4,
        lr=5e-3,
        warmup=0.0,
        output=str(tmp_path / name),
        progress=False,
        max_length=64,
        workers=0,
        log_every=1,
        report_to=["none"],
        schedule="all",
    )
    return TrainConfig(**{**base, **options})


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason=f"no SciFact data at {DATA}")
def test_a_packed_run_trains_as_the_padded_one_on_unseen_data(tmp_path):
    data = [str(scifact_rows(tmp_path / "scifact.jsonl"))]
    padded = trainer.train(
        run_config(tmp_path, "padded", data=data),
        embedder=tiny_embedder(pooling="ata"),
        log=quiet,
        report_accuracy=False,
    )
    said = []
    packed = trainer.train(
        run_config(tmp_path, "packed", data=data, packing=True, max_tokens_per_forward=128),
        embedder=tiny_embedder(pooling="ata"),
        log=said.append,
        report_accuracy=False,
    )
    assert packed.losses == pytest.approx(padded.losses, rel=1e-5)
    assert any(
        line.startswith("packing: texts packed without padding into rows of at most 128 real tokens") for line in said
    ), said
    options = json.loads((tmp_path / "packed" / "model" / "mgh_config.json").read_text())["training"]
    assert options["packing"] is True and options["max_tokens_per_forward"] == 128


def test_a_packed_run_resumes_exactly_and_says_a_changed_packing(tmp_path):
    options = dict(steps=4, save_every=2, keep_checkpoints=0, packing=True, max_tokens_per_forward=100)
    full = trainer.train(
        run_config(tmp_path, "full", **options),
        embedder=tiny_embedder(lora_dropout=0.2),
        log=quiet,
        report_accuracy=False,
    )
    checkpoint = tmp_path / "full" / "checkpoints" / "step-0000002"
    resumed = trainer.train(
        run_config(tmp_path, "resumed", resume=str(checkpoint), **options),
        embedder=tiny_embedder(lora_dropout=0.2),
        log=quiet,
        report_accuracy=False,
    )
    assert resumed.losses == full.losses[2:]
    said = []
    padded = trainer.train(
        run_config(tmp_path, "padded", resume=str(checkpoint), steps=4),
        embedder=tiny_embedder(lora_dropout=0.2),
        log=said.append,
        report_accuracy=False,
    )
    assert any("packing True -> False" in line and "max_tokens_per_forward 100 -> 0" in line for line in said), said
    assert len(padded.losses) == 2  # LoRA dropout draws its masks by shape: packed and padded differ there


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(packing=True, compile=True), r"^packing: --compile is not supported with --packing"),
        (
            dict(packing=True, parallel="fsdp", max_tokens_per_forward=512),
            r"^max_tokens_per_forward: under --parallel fsdp every forward is collective",
        ),
        (dict(max_tokens_per_forward=-1), r"^max_tokens_per_forward: expected an integer >= 0"),
    ],
)
def test_options_that_cannot_run_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(output="/unused", **options)
