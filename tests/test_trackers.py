"""--report-to: a tiny run's metric rows reach TensorBoard, Weights & Biases (offline) and MLflow (a
local store in the run folder), each tested where it is installed; the saved model's card holds
the run's options."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
from mgh_train import trackers, trainer
from mgh_train.config import TrainConfig
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # kernels: see conftest.cpu_kernels


def run(tmp_path, report_to, steps=3):
    embedder = Embedder.build(
        EmbedderConfig(base_model=None, lora_r=4, max_length=32, pooling="mean"),
        model=tiny_decoder("llama"),
        tokenizer=tiny_tokenizer(),
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=4,
        lr=5e-3,
        output=str(tmp_path / "run"),
        progress=False,
        max_length=32,
        schedule="level:1",
        report_to=report_to,
    )
    return cfg, trainer.train(cfg, embedder=embedder, log=lambda _: None)


def need(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def test_tensorboard_gets_every_row(tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = run(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(Path(cfg.output) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(result.losses, rel=1e-6)
    card = (Path(cfg.output) / "model" / "README.md").read_text()
    assert "report_to:" in card and "steps: 3" in card  # the run's options are in the model card


def test_wandb_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    need("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(key, raising=False)
    cfg, result = run(tmp_path, ["wandb"])
    (log,) = (Path(cfg.output) / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert [row.get("_step") for row in history] == [1, 2, 3], history
    assert [row["loss"] for row in history] == pytest.approx(result.losses, rel=1e-6)
    assert config["schedule"] == "level:1" and config["steps"] == 3


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte file header,
    then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, position, records, pending = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B", data[:8]
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_mlflow_local_store_in_the_run_folder(tmp_path, monkeypatch):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, result = run(tmp_path, ["mlflow"])
    client = MlflowClient(trackers.mlflow_uri(cfg.output))
    (experiment,) = [e for e in client.search_experiments() if e.name == "mgh"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(result.losses, rel=1e-6)
    assert mlflow_run.data.params["schedule"] == "level:1"


def test_report_to_none_and_bad_names(tmp_path, monkeypatch):
    cfg, _ = run(tmp_path, ["none"], steps=1)
    assert not (Path(cfg.output) / "tensorboard").exists()
    with pytest.raises(ValueError, match="^report_to: expected one or more of tensorboard, wandb, mlflow"):
        TrainConfig(report_to=["comet"])
    with pytest.raises(ValueError, match="^report_to: expected"):
        TrainConfig(report_to=["none", "wandb"])
    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    assert trackers.resolve(None) == []  # the default skips a missing TensorBoard quietly
    with pytest.raises(ValueError, match=r"^report_to: wandb is not installed \(pip install mgh\[wandb\]\)"):
        trackers.resolve(["wandb"])
