"""Nothing lost, nothing silently wrong, as a user meets it: ``python -m mgh_train`` in a
subprocess on a tiny random Llama saved to a folder. A run folder holds one run (a second run is
refused, ``--overwrite`` replaces it), ``--resume`` checks what it resumes (changed options, other
data, a damaged checkpoint), and common mistakes are one ``error:`` line with exit status 2,
found before the model loads. Each test checks the exit status, the line and what is on disk."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
from tiny_models import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU path
    return subprocess.run(
        [sys.executable, "-m", "mgh_train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def train_args(base, output, *extra):
    return (
        "train",
        "--model",
        base,
        "--output",
        output,
        "--max-length",
        "32",
        "--batch-size",
        "2",
        "--lora-r",
        "4",
        "--no-progress",
        *extra,
    )


def error_line(result) -> str:
    """The one line a failed command printed (no traceback, nothing else)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def checkpoints(output: Path) -> list:
    return sorted(p.name for p in (output / "checkpoints").iterdir())


def metric_steps(output: Path) -> list:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def finished_run(base, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    output = tmp_path_factory.mktemp("finished") / "run"
    result = cli(*train_args(base, output, "--steps", "4", "--save-every", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints(output) == ["step-0000002", "step-0000004"] and metric_steps(output) == [1, 2, 3, 4]
    return output


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_a_new_run_into_a_run_folder_is_refused_and_overwrite_replaces_it(base, finished_run, tmp_path):
    output = copy_of(finished_run, tmp_path)
    before = snapshot(output)
    again = cli(*train_args(base, output, "--steps", "2", "--save-every", "1"))
    assert again.returncode == 2
    line = error_line(again)
    board = ", tensorboard/" if (output / "tensorboard").is_dir() else ""  # written where tensorboard is installed
    state = f"checkpoints/ (step-0000002, step-0000004), metrics.jsonl (4 rows), model/{board}"
    assert line.startswith(
        f"error: output: {output} holds another run ({state}); pass --resume latest to continue it, or --overwrite"
    ), line
    assert snapshot(output) == before  # nothing mixed, nothing deleted
    replaced = cli(*train_args(base, output, "--steps", "2", "--save-every", "1", "--overwrite"))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert f"overwrite: deleted {state} from {output}" in replaced.stdout
    assert checkpoints(output) == ["step-0000001", "step-0000002"] and metric_steps(output) == [1, 2]
    assert json.loads((output / "checkpoints" / "step-0000002" / "config.json").read_text())["steps"] == 2
    assert (output / "model" / "mgh_config.json").is_file()


def test_resume_refuses_changes_to_the_model_or_data_and_applies_the_rest(base, finished_run, tmp_path):
    output = copy_of(finished_run, tmp_path)
    before = snapshot(output)
    changed = cli(
        *train_args(
            base,
            output,
            "--steps",
            "4",
            "--resume",
            "latest",
            "--pooling",
            "mean",
            "--lora-r",
            "8",
            "--batch-size",
            "4",
        )
    )
    assert changed.returncode == 2
    line = error_line(changed)
    assert f"error: resume: {output / 'checkpoints' / 'step-0000004'} was trained with other options" in line, line
    assert "pooling 'ata' -> 'mean'" in line and "lora_r 4 -> 8" in line and "batch_size 2 -> 4" in line
    rows = tmp_path / "fewer.jsonl"  # the seed set without its first row: another data order
    seed = sorted((ROOT / "mgh_train" / "seed").glob("*.jsonl"))
    rows.write_text("".join(f.read_text() for f in seed).split("\n", 1)[1])
    other_data = cli(*train_args(base, output, "--steps", "4", "--resume", "latest", "--data", rows))
    assert other_data.returncode == 2 and "was trained on other examples" in error_line(other_data)
    assert snapshot(output) == before
    # --steps and --lr may change: applied, said, and the schedule continues at the new rate.
    longer = cli(*train_args(base, output, "--steps", "6", "--resume", "latest", "--lr", "2e-4"))
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert (
        "resume: options changed since step-0000004, applied from step 5: steps 4 -> 6; lr 0.0001 -> 0.0002"
        in longer.stdout
    ), longer.stdout
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["lr"] == pytest.approx(2e-4 * (6 - 5) / (6 - 1))  # warmup 1 step, linear decay to step 6


def test_a_damaged_checkpoint_is_named_and_latest_falls_back(base, finished_run, tmp_path):
    output = copy_of(finished_run, tmp_path)
    newest = output / "checkpoints" / "step-0000004"
    weights = (newest / "trainable.pt").read_bytes()
    (newest / "trainable.pt").write_bytes(weights[: len(weights) // 2])  # a copy cut short
    named = cli(*train_args(base, output, "--steps", "4", "--resume", newest))
    assert named.returncode == 2
    assert error_line(named).startswith(
        f"error: resume: checkpoint {newest} is damaged: trainable.pt has "
        f"{len(weights) // 2} bytes, {len(weights)} were written"
    )
    latest = cli(*train_args(base, output, "--steps", "4", "--resume", "latest"))
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert f"checkpoint {newest} is damaged" in latest.stdout
    assert f"falling back to {output / 'checkpoints' / 'step-0000002'}" in latest.stdout
    assert "continuing after step 2" in latest.stdout
    assert checkpoints(output) == ["step-0000002", "step-0000004", "step-0000004.damaged"]
    assert metric_steps(output) == [1, 2, 3, 4]


def test_a_bad_row_is_found_before_the_model_loads(base, tmp_path):
    row = {"query": "q", "positive": "p", "negatives": [{"text": f"n{level}", "level": level} for level in (1, 2, 3)]}
    data = tmp_path / "three.jsonl"
    data.write_text(
        json.dumps({**row, "negatives": row["negatives"] + [{"text": "n4", "level": 4}]})
        + "\n"
        + json.dumps(row)
        + "\n"
    )
    result = cli(*train_args(base, tmp_path / "run", "--steps", "4", "--data", data))
    assert result.returncode == 2
    assert error_line(result) == (
        f"error: {data}:2: no level-4 negative, but schedule 'curriculum' trains with "
        "levels 1, 2, 3, 4; the row has levels 1, 2, 3"
    )
    assert "model: loading" not in result.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _mistakes(base: Path, tmp_path: Path):
    """(command-line arguments, expected start of the error line) of each mistake."""
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text('{"query": "q", "positive": "p", "negatives": []}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((base / "config.json").read_text())
    return {
        "output is a file": (train_args(base, a_file), f"error: output: {a_file} is a file; expected a run folder"),
        "output cannot be written": (
            train_args(base, a_file / "run"),
            f"error: output: cannot write to {a_file / 'run'}",
        ),
        "no such model": (
            train_args(tmp_path / "nope", tmp_path / "r1"),
            f"error: model: {tmp_path / 'nope'} does not exist",
        ),
        "model is a data file": (
            train_args(data_file, tmp_path / "r2"),
            f"error: model: {data_file} is a file but not a .gguf model",
        ),
        "model without tokenizer": (
            train_args(no_tokenizer, tmp_path / "r3"),
            f"error: model: {no_tokenizer} has no tokenizer file",
        ),
        "no CUDA": (
            train_args(base, tmp_path / "r4", "--device", "cuda"),
            "error: device: 'cuda' needs CUDA, which this torch does not see here",
        ),
        "no such device": (
            train_args(base, tmp_path / "r5", "--device", "gpu"),
            "error: device: expected cpu, cuda, cuda:N or another torch device, got 'gpu'",
        ),
    }


@pytest.mark.parametrize(
    "mistake",
    [
        "output is a file",
        "output cannot be written",
        "no such model",
        "model is a data file",
        "model without tokenizer",
        "no CUDA",
        "no such device",
    ],
)
def test_common_mistakes_are_one_line_before_the_model_loads(base, tmp_path, mistake):
    import torch

    if mistake == "no CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    args, expected = _mistakes(base, tmp_path)[mistake]
    result = cli(*args, "--steps", "2")
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(expected), line
    assert "model: loading" not in result.stdout and "data:" not in result.stdout
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.fixture(scope="module")
def saved_model(base, tmp_path_factory):
    from mgh_train.model import Embedder, EmbedderConfig

    folder = tmp_path_factory.mktemp("saved") / "model"
    Embedder.build(EmbedderConfig(base_model=str(base), lora_r=4, max_length=32, pooling="mean")).save(folder)
    return folder


@pytest.mark.parametrize(
    "remove,expected",
    [
        ("adapter", "is missing or incomplete (no adapter_config.json)"),
        ("tokenizer.json", "has no tokenizer file"),
    ],
)
def test_a_model_folder_missing_a_part_is_named(saved_model, tmp_path, remove, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = cli("eval", "--model", folder, "--tasks", "STSBenchmark", "--data-dir", tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: model: ") and expected in line, line


def test_eval_refuses_a_nan_gold_score_with_its_line(saved_model, tmp_path):
    pytest.importorskip("mteb")
    (tmp_path / "stsb").mkdir()
    (tmp_path / "stsb" / "stsb-en-test.csv").write_text("a cat,a dog,2.5\nrain,snow,nan\n")
    result = cli("eval", "--model", saved_model, "--tasks", "STSBenchmark", "--data-dir", tmp_path, "--no-progress")
    assert result.returncode == 2
    assert error_line(result) == (
        f"error: {tmp_path / 'stsb' / 'stsb-en-test.csv'}:2: score 'nan' is not a finite number"
    )
