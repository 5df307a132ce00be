"""mgh_train.trainer: a tiny random Llama trains (loss falls), checkpoints resume exactly, the
curriculum runs in order, a NaN stops the run clearly, options come from YAML and flags, and the
STS-B evaluation hook runs on the real dev set."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from mgh_train import batches, trainer
from mgh_train.config import TrainConfig, read_yaml
from mgh_train.evaluate import spearman
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # kernels: see conftest.cpu_kernels

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]


def tiny_embedder(lora_seed=0, **options):
    """The same tiny base every time; ``lora_seed`` changes only the adapter's initialisation."""
    options = {"lora_r": 8, "lora_alpha": 16, "max_length": 64, **options}
    config = EmbedderConfig(base_model=None, **options)
    base = tiny_decoder("llama", seed=0)
    torch.manual_seed(lora_seed)
    return Embedder.build(config, model=base, tokenizer=tiny_tokenizer())


def config(tmp_path, name="run", **options):
    base = dict(steps=8, batch_size=6, lr=5e-3, warmup=0.0, output=str(tmp_path / name), progress=False, max_length=64)
    return TrainConfig(**{**base, **options})


def quiet(_):
    pass


def test_tiny_llama_trains_and_the_loss_falls(tmp_path):
    cfg = config(tmp_path, steps=24, schedule="level:1", holdout=0.1)
    result = trainer.train(cfg, embedder=tiny_embedder(), log=quiet)
    assert len(result.losses) == 24 and all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.1, result.losses
    rows = [json.loads(r) for r in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {"loss", "lr", "stage", "examples_per_s", "tokens_per_s"} <= rows[0].keys()
    assert result.accuracy_before["n"] == result.accuracy_after["n"] > 0
    assert (Path(cfg.output) / "model" / "mgh_config.json").is_file()
    assert (Path(cfg.output) / "checkpoints" / "step-0000024").is_dir()


def test_resume_continues_with_the_same_losses(tmp_path):
    # Random levels and LoRA dropout, so the negatives' RNG and torch's RNG both have to be restored.
    # Resumed inside the warm-up (4 of 6 steps): the schedule's position is restored too.
    options = dict(steps=6, save_every=3, schedule="random", keep_checkpoints=5, warmup=0.66)  # ceil(3.96)
    full = trainer.train(config(tmp_path, "full", **options), embedder=tiny_embedder(lora_dropout=0.2), log=quiet)
    rates = [json.loads(r)["lr"] for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # transformers' get_linear_schedule_with_warmup (the row's lr is the next step's, after scheduler.step())
    assert rates == pytest.approx([5e-3 * (s / 4 if s < 4 else (6 - s) / 2) for s in range(1, 7)])
    checkpoint = tmp_path / "full" / "checkpoints" / "step-0000003"
    assert checkpoint.is_dir()
    resumed = trainer.train(
        config(tmp_path, "resumed", resume=str(checkpoint), **options),
        embedder=tiny_embedder(lora_seed=5, lora_dropout=0.2),
        log=quiet,
    )
    assert resumed.start_step == 3
    assert resumed.losses == full.losses[3:]
    # "latest" picks the newest checkpoint of the run folder; the metrics keep one row per step.
    again = trainer.train(
        config(tmp_path, "full", resume="latest", **{**options, "steps": 7}),
        embedder=tiny_embedder(lora_dropout=0.2),
        log=quiet,
    )
    assert again.start_step == 6 and len(again.losses) == 1
    steps = [json.loads(r)["step"] for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_resuming_an_older_checkpoint_needs_overwrite_and_then_repeats_the_run(tmp_path):
    options = dict(steps=4, save_every=1, keep_checkpoints=0, schedule="level:1")
    full = trainer.train(config(tmp_path, "run", **options), embedder=tiny_embedder(), log=quiet, report_accuracy=False)
    older = tmp_path / "run" / "checkpoints" / "step-0000002"
    with pytest.raises(
        ValueError,
        match=r"^resume: .*checkpoints holds checkpoints after step 2 \(step-0000003, "
        r"step-0000004\); resuming from step-0000002 would mix the two",
    ):
        trainer.train(config(tmp_path, "run", resume=str(older), **options), embedder=tiny_embedder(), log=quiet)
    trainer.train(config(tmp_path, "other", steps=1), embedder=tiny_embedder(), log=quiet, report_accuracy=False)
    with pytest.raises(ValueError, match=r"^output: .*other holds another run .* than the checkpoint"):
        trainer.train(config(tmp_path, "other", resume=str(older), **options), embedder=tiny_embedder(), log=quiet)
    said = []
    again = trainer.train(
        config(tmp_path, "run", resume=str(older), overwrite=True, **options),
        embedder=tiny_embedder(),
        log=said.append,
        report_accuracy=False,
    )
    assert again.losses == full.losses[2:]
    assert any(line.startswith("overwrite: deleted step-0000003/, step-0000004/ from") for line in said), said
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_the_curriculum_trains_easy_to_hard(tmp_path, monkeypatch):
    chosen = []
    real = batches.negatives_for

    def spy(example, schedule, stage, rng):
        texts = real(example, schedule, stage, rng)
        levels = {n.text: n.level for n in example.negatives}
        chosen.append((stage, [levels[t] for t in texts]))
        return texts

    monkeypatch.setattr(batches, "negatives_for", spy)  # the planner picks them, in the main process
    cfg = config(tmp_path, steps=8, batch_size=4)
    trainer.train(cfg, embedder=tiny_embedder(), log=quiet, report_accuracy=False)
    stages = [json.loads(r)["stage"] for r in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert stages == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(levels == [stage] for stage, levels in chosen)
    chosen.clear()
    trainer.train(
        config(tmp_path, "reverse", steps=4, batch_size=4, schedule="reverse"),
        embedder=tiny_embedder(),
        log=quiet,
        report_accuracy=False,
    )
    assert [levels[0] for _, levels in chosen[::4]] == [4, 3, 2, 1]
    chosen.clear()
    trainer.train(
        config(tmp_path, "all", steps=1, batch_size=4, schedule="all"),
        embedder=tiny_embedder(),
        log=quiet,
        report_accuracy=False,
    )
    assert all(sorted(levels) == [1, 2, 3, 4] for _, levels in chosen)


def test_fused_and_eager_losses_agree(tmp_path):
    fused = trainer.train(
        config(tmp_path, "fused", steps=3), embedder=tiny_embedder(), log=quiet, report_accuracy=False
    )
    eager = trainer.train(
        config(tmp_path, "eager", steps=3, loss="eager"), embedder=tiny_embedder(), log=quiet, report_accuracy=False
    )
    assert fused.losses == pytest.approx(eager.losses, rel=1e-4)


@pytest.mark.parametrize(
    "pooling,message",
    [
        (
            "mean",
            r"step 1: the loss is not finite: the trainable parameter \S+lora_A\S+ is not finite; "
            r".*before its update reached the weights",
        ),
        (
            "ata",
            r"step 1: the model's activations are not finite .*the trainable parameter \S+lora_A\S+ is not "
            r"finite; .*before its update reached the weights",
        ),
    ],
)
def test_a_nan_stops_the_run_with_a_clear_message(tmp_path, pooling, message):
    embedder = tiny_embedder(pooling=pooling)
    with torch.no_grad():
        name, weight = next((n, p) for n, p in embedder.named_parameters() if "lora_A" in n)
        weight.fill_(float("nan"))
    with pytest.raises(trainer.NonFiniteTraining, match=message) as info:
        trainer.train(config(tmp_path, steps=3), embedder=embedder, log=quiet, report_accuracy=False)
    assert info.value.step == 1 and info.value.where == f"the trainable parameter {name} is not finite"
    assert isinstance(info.value, trainer.TrainingStopped)


def test_a_nan_between_logging_steps_never_reaches_the_weights(tmp_path):
    """The loss is read at logging steps only: a step whose loss is NaN has its update skipped on the
    device, and the run stops at the next logging step naming it; the steps around it train."""
    embedder = tiny_embedder(pooling="mean")
    calls = []

    def poison_second_step(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output  # one forward per step here

    embedder.model.get_base_model().norm.register_forward_hook(poison_second_step)
    before = {n: p.detach().clone() for n, p in embedder.named_parameters() if p.requires_grad}
    cfg = config(tmp_path, steps=4, log_every=4, max_buckets=1)
    with pytest.raises(trainer.NonFiniteTraining, match=r"^step 2: the loss is not finite") as info:
        trainer.train(cfg, embedder=embedder, log=quiet, report_accuracy=False)
    assert info.value.step == 2 and len(calls) >= 4  # steps 3 and 4 ran before the logging step
    after = {n: p.detach() for n, p in embedder.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after)  # steps 1, 3 and 4 did update
    rows = [json.loads(r) for r in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the logging step wrote what happened
    assert [math.isfinite(r["loss"]) for r in rows] == [True, False, True, True]


def test_a_nan_from_a_layer_is_named_by_that_layer(tmp_path):
    """Finite weights, a layer whose output overflows: the stop names the first module that went non-finite."""
    embedder = tiny_embedder(pooling="mean")
    mlp = next(m for n, m in embedder.named_modules() if n.endswith("layers.1.mlp"))
    mlp.register_forward_hook(lambda module, args, output: output * float("inf"))
    with pytest.raises(trainer.NonFiniteTraining) as info:
        trainer.train(config(tmp_path, steps=2), embedder=embedder, log=quiet, report_accuracy=False)
    assert info.value.where == "the output of base_model.model.layers.1.mlp is the first that is not finite"


def test_retention_keeps_the_newest_and_zero_keeps_every_checkpoint(tmp_path):
    trainer.train(
        config(tmp_path, "all", steps=3, save_every=1, keep_checkpoints=0),
        embedder=tiny_embedder(),
        log=quiet,
        report_accuracy=False,
    )
    assert sorted(p.name for p in (tmp_path / "all" / "checkpoints").iterdir()) == [
        "step-0000001",
        "step-0000002",
        "step-0000003",
    ]
    trainer.train(
        config(tmp_path, "one", steps=3, save_every=1, keep_checkpoints=1),
        embedder=tiny_embedder(),
        log=quiet,
        report_accuracy=False,
    )
    assert [p.name for p in (tmp_path / "one" / "checkpoints").iterdir()] == ["step-0000003"]
    from mgh_train.checkpoints import apply_retention

    folder = tmp_path / "by-hand"
    for step in (1, 2, 3, 5, 9):
        (folder / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    apply_retention(folder, 5, keep=2)  # step 5 was just written: it and the one before stay; 9 is not older
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "step-0000003",
        "step-0000005",
        "step-0000009",
    ]


def test_gradient_accumulation_and_public_data_mix(tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text(
        "".join(
            json.dumps(
                {"anchor": f"public question {i}", "positive": f"public answer {i}", "negative": f"off topic {i}"}
            )
            + "\n"
            for i in range(40)
        )
    )
    cfg = config(tmp_path, steps=2, grad_accum=2, public_data=[str(public)], public_ratio=0.2, schedule="level:2")
    result = trainer.train(cfg, embedder=tiny_embedder(), log=quiet, report_accuracy=False)
    assert len(result.losses) == 2


def test_sts_dev_evaluation_hook(tmp_path):
    if not (DATA_DIR / "stsb" / "stsb-en-dev.csv").is_file():
        pytest.skip(f"no STS-B data at {DATA_DIR}")
    cfg = config(tmp_path, steps=2, eval_data_dir=str(DATA_DIR), eval_every=1, eval_limit=40)
    result = trainer.train(cfg, embedder=tiny_embedder(), log=quiet, report_accuracy=False)
    assert -100 <= result.sts_spearman <= 100
    rows = [json.loads(r) for r in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    assert sum("stsb_dev_spearman" in r for r in rows) == 2
    assert rows[-1]["final_stsb_dev_spearman"] == result.sts_spearman


def test_spearman_matches_scipy(gen):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.randint(0, 6, (200,), generator=gen).double()  # ties
    y = x + torch.randn(200, generator=gen, dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_bad_options_and_bad_data(tmp_path):
    with pytest.raises(ValueError, match="lr: expected a positive"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        TrainConfig(schedule="hardest-first")
    with pytest.raises(ValueError, match="loss: expected fused or eager"):
        TrainConfig(loss="fast")
    bad = tmp_path / "bad.jsonl"
    negatives = [{"text": f"n{level}", "level": level} for level in (1, 2, 3, 4)]
    bad.write_text(json.dumps({"query": "q", "positive": "p", "negatives": negatives}) + '\n{"query": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: "):
        trainer.train(config(tmp_path, data=[str(bad)]), embedder=tiny_embedder(), log=quiet)
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        trainer.train(config(tmp_path, "fresh", resume="latest"), embedder=tiny_embedder(), log=quiet)


# --------------------------------------------------------------------------------------------
# command line: YAML + flags, --help, a whole run through python -m mgh_train train
# --------------------------------------------------------------------------------------------


def run_cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU path
    return subprocess.run(
        [sys.executable, "-m", "mgh_train", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_help_lists_every_option_with_its_default():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in (
        "--config",
        "--lr",
        "--lora-r",
        "--schedule",
        "--stage-steps",
        "--resume",
        "--grad-accum",
        "--skip-bad-rows",
        "--public-ratio",
        "--loss",
        "--pooling",
        "--bidirectional",
        "--save-every",
    ):
        assert flag in result.stdout, flag
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: 0.0001)" in text and "(default: curriculum)" in text and "(default: 16)" in text


def test_yaml_config_and_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.002\nsteps: 3\nlora-r: 4\nstage_steps: [1, 1, 1, 0]\n")
    assert read_yaml(yaml_file) == {"lr": 0.002, "steps": 3, "lora_r": 4, "stage_steps": [1, 1, 1, 0]}
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        read_yaml(tmp_path / "typo.yaml")
    (tmp_path / "wrong.yaml").write_text("steps: many\n")
    with pytest.raises(ValueError, match="option 'steps' expects int"):
        read_yaml(tmp_path / "wrong.yaml")

    from mgh_train.__main__ import build_parser
    from mgh_train.config import config_from_args, parse

    args = parse(build_parser(), ["train", "--config", str(yaml_file), "--lr", "1e-4"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.steps, cfg.lora_r, cfg.stage_steps) == (1e-4, 3, 4, [1, 1, 1, 0])


def test_train_command_end_to_end(tmp_path):
    base = tmp_path / "tiny-llama"
    tiny_decoder("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    result = run_cli(
        "train",
        "--model",
        str(base),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--output",
        str(tmp_path / "run"),
        "--lora-r",
        "4",
        "--no-progress",
        "--max-length",
        "64",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model saved to" in result.stdout
    assert Embedder.load(tmp_path / "run" / "model").encode(["hello"]).shape == (1, 32)
    bad = run_cli("train", "--model", str(base), "--lr", "-1", "--output", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "lr: expected a positive learning rate" in bad.stderr
    missing = run_cli(
        "train", "--data", str(tmp_path / "none.jsonl"), "--model", str(base), "--output", str(tmp_path / "missing")
    )
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
