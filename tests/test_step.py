"""The training step's machinery: length buckets, the joint encoder forward (equal to encoding queries
and documents apart), no host syncs from our code between logging steps, the profile, and --compile
(checkpoints interchangeable with the eager run's)."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from mgh_train import step as step_module
from mgh_train import trainer
from mgh_train.batches import Collate, MicroBatchPlanner, instruction_of, length_buckets
from mgh_train.config import TrainConfig
from mgh_train.data import NoDuplicatesBatcher, load_training_data
from mgh_train.model import Embedder, EmbedderConfig
from sync_counter import SyncCounter
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def tiny_embedder(padding_side="right", **options):
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    torch.manual_seed(0)
    return Embedder.build(
        EmbedderConfig(base_model=None, **options),
        model=tiny_decoder("llama", seed=0),
        tokenizer=tiny_tokenizer(padding_side=padding_side),
    )


def config(tmp_path, name="run", **options):
    base = dict(
        steps=4,
        batch_size=4,
        lr=5e-3,
        warmup=0.0,
        output=str(tmp_path / name),
        progress=False,
        max_length=64,
        schedule="level:4",
    )
    return TrainConfig(**{**base, **options})


# --------------------------------------------------------------------------------------------
# length buckets
# --------------------------------------------------------------------------------------------


def padded(lengths, buckets, multiple=8):
    return sum(len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple for b in buckets)


def test_similar_lengths_are_one_forward_and_mixed_ones_are_bucketed():
    assert length_buckets([30, 31, 29, 32]) == [[3, 1, 0, 2]]  # one forward, longest first
    short_and_long = [12] * 16 + [120] * 16 + [60] * 16
    buckets = length_buckets(short_and_long)
    assert len(buckets) == 3 and padded(short_and_long, buckets) <= 1.2 * sum(short_and_long)
    assert sorted(i for b in buckets for i in b) == list(range(48))
    assert length_buckets(short_and_long, max_buckets=1) == [sorted(range(48), key=lambda i: -short_and_long[i])]


@pytest.mark.parametrize("seed", range(5))
def test_buckets_cover_every_text_once_and_pad_least(seed):
    """Against brute force over every way of cutting the sorted lengths into at most 3 groups."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 130) for _ in range(rng.randint(1, 14))]
    buckets = length_buckets(lengths, max_buckets=3, slack=0.0)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    assert all(lengths[b[j]] >= lengths[b[j + 1]] for b in buckets for j in range(len(b) - 1))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = min(
        padded(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))]) for k in range(3) for cuts in _cuts(n, k)
    )
    assert padded(lengths, buckets) == best


def _cuts(n, k):
    import itertools

    return itertools.combinations(range(1, n), k)


# --------------------------------------------------------------------------------------------
# the joint forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "last_token", "first_token", "ata"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
def test_bucketed_micro_batch_equals_encoding_queries_and_documents_apart(pooling, side, bidirectional):
    """One micro-batch, its texts in length buckets (queries and documents mixed, padded to a
    multiple of 8), gives the embeddings of encoding the queries and the documents apart."""
    embedder = tiny_embedder(
        side, pooling=pooling, bidirectional=bidirectional, exclude_instruction=True, max_length=256
    )
    examples = load_training_data(config(Path("/unused")), lambda _: None)[0][:6]
    batcher = NoDuplicatesBatcher(examples, 6, seed=0)
    plan = next(
        iter(
            MicroBatchPlanner(
                examples, batcher, random.Random(0), schedule="all", steps=1, stage_steps=None, grad_accum=1
            )
        )
    )
    batch = Collate(embedder.tokenizer, embedder.config, max_buckets=3, slack=0.0)(plan)
    assert len(batch.buckets) > 1 and batch.k == 4
    assert all(f["input_ids"].shape[1] % 8 == 0 for f in batch.buckets)
    with torch.no_grad():
        got = step_module.embed(embedder.eval(), batch)
        queries = embedder(
            embedder.tokenize([e.query for e in plan.examples], instruction=[instruction_of(e) for e in plan.examples])
        )
        docs = embedder(embedder.tokenize([e.positive for e in plan.examples] + [t for n in plan.negatives for t in n]))
    torch.testing.assert_close(got, torch.cat([queries, docs]), rtol=1e-4, atol=1e-5)
    assert batch.tokens == sum(int(f["attention_mask"].sum()) for f in batch.buckets)


# --------------------------------------------------------------------------------------------
# no host syncs between logging steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "ata"])
def test_no_sync_from_our_code_in_a_step(tmp_path, monkeypatch, pooling):
    """Every step of a run whose logging steps are elsewhere reads nothing from the device in our
    code (mgh_train, mgh_kernels); transformers' own reads are counted and reported."""
    counters = []
    real = step_module.TrainStep.__call__

    padded = []

    def counted(self, batches):
        padded.extend(p for b in batches for p in b.padded)
        with SyncCounter() as syncs:
            outcome = real(self, batches)
        counters.append(syncs)
        return outcome

    monkeypatch.setattr(step_module.TrainStep, "__call__", counted)
    trainer.train(
        config(tmp_path, steps=3, log_every=3),
        embedder=tiny_embedder(pooling=pooling),
        log=lambda _: None,
        report_accuracy=False,
    )
    assert len(counters) == 3 and any(padded)
    for syncs in counters:
        assert syncs.ours == [], syncs.report()
        # transformers reads the padding mask twice per forward unless handed the 4D mask itself
        assert syncs.others == [], syncs.report()
    print(f"transformers' own syncs per step ({pooling}):", counters[0].report())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir"])
@pytest.mark.parametrize("pooling", ["mean", "ata"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_forward_told_its_padding_gives_the_same_embeddings(pooling, bidirectional, side):
    """``padded`` (known on the host) replaces transformers' reads of the mask: the 4D mask the
    embedder builds, and no mask for an unpadded batch, give transformers' own embeddings."""
    embedder = tiny_embedder(padding_side=side, pooling=pooling, bidirectional=bidirectional)
    mixed = embedder.tokenize(["a short one", "a much longer text with many more words in it"])
    same = embedder.tokenize(["four words in here", "four words in there"])
    assert not mixed["attention_mask"].all() and same["attention_mask"].all()
    with torch.no_grad():
        for features, padded in ((mixed, True), (same, False)):
            told = embedder(features, padded=padded)
            torch.testing.assert_close(told, embedder(features), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# optimizer, profile, compile
# --------------------------------------------------------------------------------------------


def test_adamw_is_fused_where_the_device_has_it():
    param = torch.nn.Parameter(torch.zeros(3))
    assert step_module.make_optimizer([param], lr=1e-3, weight_decay=0.0).defaults["fused"]


def test_profile_writes_a_trace_and_a_summary(tmp_path):
    lines = []
    trainer.train(
        config(tmp_path, steps=5, profile=2), embedder=tiny_embedder(), log=lines.append, report_accuracy=False
    )
    trace = tmp_path / "run" / "profile" / "trace.json"
    assert json.loads(trace.read_text())["traceEvents"]
    text = "\n".join(lines)
    assert "profile: 2 step(s) after 3 warm-up" in text and "Self CPU" in text
    assert "ms per step on the host; no device kernels (a CPU run)" in text


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile with dynamo and AOT autograd but the aot_eager backend: inductor's code generation
    takes minutes on 2 cores; the GPU round runs it."""
    real = torch.compile

    def traced_only(*args, **kwargs):
        kwargs.update(backend="aot_eager", mode=None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", traced_only)


@pytest.mark.slow  # compiles the step for two runs (~25 s); test_compile keeps compiled steps in the default run
@pytest.mark.usefixtures("traced_compile")
def test_compiled_run_resumes_an_eager_checkpoint_and_back(tmp_path):
    """--compile trains with the eager run's losses (same arithmetic, compiled), and its checkpoints
    and the eager run's are interchangeable (the compiled encoder keeps its parameter names)."""
    options = dict(steps=3, save_every=1, keep_checkpoints=0, schedule="random", log_every=1)
    eager = trainer.train(
        config(tmp_path, "eager", **options), embedder=tiny_embedder(), log=lambda _: None, report_accuracy=False
    )
    compiled = trainer.train(
        config(
            tmp_path,
            "compiled",
            compile=True,
            resume=str(tmp_path / "eager" / "checkpoints" / "step-0000001"),
            **options,
        ),
        embedder=tiny_embedder(),
        log=lambda _: None,
        report_accuracy=False,
    )
    assert compiled.losses == pytest.approx(eager.losses[1:], rel=1e-4)
    back = trainer.train(
        config(tmp_path, "eager-again", resume=str(tmp_path / "compiled" / "checkpoints" / "step-0000002"), **options),
        embedder=tiny_embedder(),
        log=lambda _: None,
        report_accuracy=False,
    )
    assert back.losses == pytest.approx(eager.losses[2:], rel=1e-4)
    assert all(math.isfinite(x) for x in eager.losses)
