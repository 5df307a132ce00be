"""Faults a user meets around a training run, reproduced as they meet them: ``python -m mgh_train
train`` in real subprocesses on a tiny random Llama. Two runs started into one folder (the second
refused naming the first's pid and host; a killed run's lock does not block), Ctrl-C and SIGTERM
sent to a running job (a checkpoint of the step it was in, a line saying how to resume, exit 130 or
143, and a resume that continues), and a full disk (a real small tmpfs in a private mount
namespace: one line, no partial checkpoint, resume from the last good one). Each test checks the
exit status, the lines printed and what is on disk."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")
from tiny_models import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU path
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def command(*args) -> list:
    return [sys.executable, "-m", "mgh_train", *map(str, args)]


def cli(*args, timeout=300):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=user_env())


def start(*args, **kwargs) -> subprocess.Popen:
    """A CLI process in its own session (a terminal's job: Ctrl-C reaches its whole process group)."""
    return subprocess.Popen(
        command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=user_env(),
        start_new_session=True,
        **kwargs,
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
        "--report-to",
        "none",
        *extra,
    )


def lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def metric_steps(output: Path) -> list:
    return [
        json.loads(line)["step"]
        for line in (output / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def checkpoints(output: Path) -> list:
    folder = output / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_written(output: Path) -> int:
    path = output / "metrics.jsonl"
    try:
        return len(lines(path.read_text()))
    except OSError:
        return 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# --------------------------------------------------------------------------------------------
# two runs, one folder
# --------------------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(base, tmp_path):
    output = tmp_path / "run"
    first = start(*train_args(base, output, "--steps", "40", "--log-every", "1", "--save-every", "20"))
    wait_for(
        lambda: (output / ".lock").is_file() and (output / ".lock").read_text().strip(),
        first,
        what="the first run's lock",
    )
    # held still while the second starts (a fresh interpreter takes seconds on a busy machine), then
    # let go to finish: the refusal must not disturb it
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = cli(*train_args(base, output, "--steps", "8", "--log-every", "1", "--save-every", "4"))
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = lines(second.stderr)
    assert line.startswith(
        f"error: output: {output} is in use by another run (pid {first.pid} on host {socket.gethostname()}, started "
    ), line
    assert metric_steps(output) == list(range(1, 41))  # the first run's rows, once
    assert checkpoints(output) == ["step-0000020", "step-0000040"]
    assert not (output / ".lock").exists()  # released and removed when the run ended


def test_a_killed_runs_lock_does_not_block_the_next(base, tmp_path):
    output = tmp_path / "run"
    first = start(*train_args(base, output, "--steps", "500", "--log-every", "1"))
    wait_for(lambda: steps_written(output) >= 1, first, what="the first step")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert (output / ".lock").is_file()  # left behind, naming the dead process
    result = cli(*train_args(base, output, "--steps", "2", "--overwrite"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_steps(output) == [1, 2]


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signum, status, whole_group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)], ids=["ctrl-c", "sigterm"]
)
def test_a_signal_saves_the_step_says_how_to_resume_and_resume_continues(base, tmp_path, signum, status, whole_group):
    """Ctrl-C reaches the job's whole process group (DataLoader workers included); a scheduler's
    SIGTERM the main process. Either way: the step finishes, its checkpoint is written, one line says
    where and how to resume, and the exit status is the shell's 128 + signal."""
    output = tmp_path / "run"
    proc = start(*train_args(base, output, "--steps", "500", "--log-every", "1", "--workers", "1"))
    wait_for(lambda: steps_written(output) >= 2, proc, what="two steps")
    (os.killpg if whole_group else os.kill)(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    name = signal.Signals(signum).name
    done = metric_steps(output)
    assert done == list(range(1, len(done) + 1)) and len(done) >= 2
    step = done[-1]
    assert checkpoints(output) == [f"step-{step:07d}"]
    printed = lines(err)
    assert printed[-1] == (
        f"stopped: interrupted by {name} after step {step}: checkpoint saved to "
        f"{output / 'checkpoints' / f'step-{step:07d}'}; resume with the same command and "
        f"--resume latest (in {output})"
    ), err[-3000:]
    assert any(line.startswith(f"{name} received: finishing the current step") for line in printed)
    assert not (output / ".lock").exists()

    resumed = cli(*train_args(base, output, "--steps", step + 2, "--log-every", "1", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: continuing after step {step}" in resumed.stdout
    assert metric_steps(output) == list(range(1, step + 3))


def test_ctrl_c_before_training_begins_is_one_line(base, tmp_path):
    """A signal while the data and the model load stops at once: nothing to save, one line, 130."""
    output = tmp_path / "run"
    proc = start(*train_args(base, output, "--steps", "2"))
    wait_for(lambda: (output / ".lock").is_file(), proc, what="the run's start")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the two steps finished before the signal arrived")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines(err)[-1].startswith("stopped: interrupted by SIGINT"), err[-3000:]


# --------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount(), reason="needs unshare and a tmpfs mount in a user namespace")


def on_small_disk(tmp_path: Path, size_kib: int, steps: list) -> list:
    """Run each of ``steps`` (shell-quoted argument lists of ``python -m mgh_train``) in one private
    mount namespace, on a tmpfs of ``size_kib`` mounted at ``tmp_path/disk`` (a step may be the
    string ``grow``: the tmpfs is remounted 64 times bigger). Each step's (status, stdout, stderr)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    script = [f"mount -t tmpfs -o size={size_kib}k tmpfs {disk} || exit 99"]
    for i, step in enumerate(steps):
        if step == "grow":
            script.append(f"mount -o remount,size={64 * size_kib}k {disk}")
            continue
        quoted = " ".join(f"'{a}'" for a in command(*step))
        script.append(f"{quoted} >{logs}/{i}.out 2>{logs}/{i}.err; echo $? >{logs}/{i}.rc")
    script.append(f"cp -a {disk}/. {tmp_path}/after/ 2>/dev/null || mkdir -p {tmp_path}/after")
    (tmp_path / "after").mkdir()
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=user_env(),
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 99, done.stderr
    results = []
    for i, step in enumerate(steps):
        if step != "grow":
            results.append(
                (int((logs / f"{i}.rc").read_text()), (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            )
    return results


@needs_tmpfs
def test_a_full_disk_stops_before_writing_and_resume_takes_the_last_good_checkpoint(base, tmp_path):
    """Room for the step-2 checkpoint (about 100 KiB) but not for step 4's as well: the save of step
    4 is refused before anything is written; with more room, --resume latest continues from step 2."""
    output = tmp_path / "disk" / "run"
    args = train_args(base, output, "--steps", "4", "--save-every", "2", "--log-every", "1")
    (full, resumed) = on_small_disk(tmp_path, 160, [args, "grow", (*args, "--resume", "latest")])
    status, _, err = full
    assert status == 1, err[-3000:]
    (line,) = [x for x in lines(err) if "Traceback" in x or x.startswith(("stopped:", "error:"))]
    assert line.startswith(
        f"stopped: no space left on device while saving step 4; the last good checkpoint is "
        f"step 2 ({output / 'checkpoints' / 'step-0000002'}); free some space and resume with "
        "--resume latest ("
    ), line
    status, out, err = resumed
    assert status == 0, err[-3000:]
    assert "resume: continuing after step 2" in out
    after = tmp_path / "after" / "run"
    assert checkpoints(after) == ["step-0000002", "step-0000004"]
    assert metric_steps(after) == [1, 2, 3, 4]


@needs_tmpfs
def test_a_write_that_fails_for_want_of_space_leaves_no_partial_checkpoint(base, tmp_path):
    """The first checkpoint's size is guessed from the trainable weights (about 48 KiB here), but it
    takes about 100 KiB: on a 64 KiB disk the check passes and torch.save fails mid-file. One line,
    no ``step-2.tmp`` left, the metrics kept, status 1."""
    output = tmp_path / "disk" / "run"
    (full,) = on_small_disk(tmp_path, 64, [train_args(base, output, "--steps", "2", "--log-every", "1")])
    status, _, err = full
    assert status == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines(err)[-1].startswith(
        "stopped: no space left on device while saving step 2; no checkpoint was written before it; free some space ("
    ), err[-3000:]
    after = tmp_path / "after" / "run"
    assert checkpoints(after) == []  # no step-0000002.tmp
    assert metric_steps(after) == [1, 2]


# --------------------------------------------------------------------------------------------
# a datasets folder whose only split is test
# --------------------------------------------------------------------------------------------


def test_a_datasets_folder_holding_only_a_test_split_is_refused_and_its_folder_taken(base, tmp_path):
    """The README says the train split is read: a DatasetDict of ``test`` alone is refused naming the
    splits found (not trained on without a word); passing the split's folder takes it explicitly."""
    datasets = pytest.importorskip("datasets")
    rows = [{"anchor": f"query {i}", "positive": f"passage {i}", "negative_1": f"other {i}"} for i in range(8)]
    folder = tmp_path / "only-test"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    refused = cli(*train_args(base, tmp_path / "run", "--steps", "1", "--data", folder, "--schedule", "all"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = lines(refused.stderr)
    assert line == (
        f"error: {folder}: a DatasetDict without a 'train' split (splits found: test); to train on "
        f"another split pass its folder, e.g. --data {folder / 'test'}"
    ), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    taken = cli(*train_args(base, tmp_path / "run", "--steps", "1", "--data", folder / "test", "--schedule", "all"))
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "data: 8 training examples" in taken.stdout


# --------------------------------------------------------------------------------------------
# an evaluation that scores NaN
# --------------------------------------------------------------------------------------------


def test_eval_of_a_model_with_constant_embeddings_fails_naming_the_task_and_writes_valid_json(base, tmp_path):
    """A sentence-transformers model whose last layer maps everything to one vector: STS's Spearman is
    NaN. The command fails with one line naming the task and why, and the result JSON parses under a
    strict reader (no NaN literal)."""
    pytest.importorskip("mteb")
    import torch
    from sentence_transformers import SentenceTransformer, models

    encoder = models.Transformer(str(base), max_seq_length=32)
    dense = models.Dense(encoder.get_embedding_dimension(), 8, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.zero_()
        dense.linear.bias.fill_(1.0)
    folder = tmp_path / "constant"
    SentenceTransformer(modules=[encoder, models.Pooling(encoder.get_embedding_dimension()), dense]).save(str(folder))
    (tmp_path / "data" / "stsb").mkdir(parents=True)
    (tmp_path / "data" / "stsb" / "stsb-en-test.csv").write_text(
        "a cat sits,a dog runs,2.5\nrain falls,snow falls,3.0\nthe sun,the moon,1.0\nbread,butter,4.0\n"
    )
    results = tmp_path / "results"
    result = cli(
        "eval",
        "--model",
        folder,
        "--tasks",
        "STSBenchmark",
        "--data-dir",
        tmp_path / "data",
        "--output",
        results,
        "--no-progress",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in lines(result.stderr) if x.startswith(("error:", "stopped:", "Traceback"))]
    assert line.startswith(
        "error: eval: STSBenchmark scored nan on cosine_spearman: the model's similarity scores have no spread"
    ), line
    written = list(results.rglob("STSBenchmark.json"))
    assert written
    for path in written:
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


# --------------------------------------------------------------------------------------------
# smaller slips
# --------------------------------------------------------------------------------------------


def test_verify_on_a_parquet_file_names_the_formats_it_reads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"query": "q", "positive": "p"}]), path)
    result = cli("verify", path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = lines(result.stderr)
    assert line.startswith(
        f"error: data: {path} is a Parquet file; verify reads MGH rows from JSON Lines files "
        "(.jsonl, UTF-8, one row per line) only"
    ), line


def test_export_of_a_folder_missing_its_adapter_names_model(base, tmp_path):
    from mgh_train.model import Embedder, EmbedderConfig

    folder = tmp_path / "model"
    Embedder.build(EmbedderConfig(base_model=str(base), lora_r=4, max_length=32, pooling="mean")).save(folder)
    shutil.rmtree(folder / "adapter")
    result = cli("export", "--model", folder, "--output", tmp_path / "out")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = lines(result.stderr)
    assert line.startswith(f"error: model: {folder / 'adapter'} is missing or incomplete"), line
    assert not (tmp_path / "out").exists()


def test_resume_with_other_data_refuses_without_first_saying_applied(base, tmp_path):
    output = tmp_path / "run"
    first = cli(*train_args(base, output, "--steps", "2", "--save-every", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    data = tmp_path / "other.jsonl"
    data.write_text(
        "".join(json.dumps({"anchor": f"q {i}", "positive": f"p {i}", "negative": f"n {i}"}) + "\n" for i in range(8))
    )
    result = cli(
        *train_args(base, output, "--steps", "4", "--resume", "latest", "--data", data, "--schedule", "curriculum")
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = lines(result.stderr)
    assert line.startswith(f"error: resume: {output / 'checkpoints' / 'step-0000002'} was trained on other examples"), (
        line
    )
    assert "applied" not in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------
# a lost, stopped or missing rank (gloo, launched by environment variables as SLURM or a script does)
# --------------------------------------------------------------------------------------------


def start_ranks(base, output, ranks, world=2, timeout=15):
    """``ranks`` of a ``world``-process run started as a hand-written launcher does: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment, no torchrun."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in ranks:
        env = {
            **user_env(),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                command(
                    *train_args(
                        base, output, "--steps", "500", "--log-every", "1", "--workers", "0", "--dist-timeout", timeout
                    )
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        )
    return procs


def last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return [x for x in lines(err) if x.startswith(("stopped:", "error:"))][-1]


def finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_rank_is_named_by_the_survivor(base, tmp_path):
    output = tmp_path / "run"
    rank0, rank1 = start_ranks(base, output, [0, 1])
    wait_for(lambda: steps_written(output) >= 2, rank0, what="two steps")
    os.killpg(rank1.pid, signal.SIGKILL)
    began = time.monotonic()
    out, err = finish(rank0)
    finish(rank1)
    assert rank0.returncode == 1, err[-3000:]
    assert time.monotonic() - began < 15  # a dead peer is found at once, not after the timeout
    line = last_line(err)
    assert line.startswith(f"stopped: world: rank 1 (pid {rank1.pid}) died"), line
    assert line.endswith("Stop every process of the run, then start them all again with --resume latest"), line


@pytest.mark.slow
def test_a_stopped_rank_is_named_after_the_timeout(base, tmp_path):
    output = tmp_path / "run"
    rank0, rank1 = start_ranks(base, output, [0, 1], timeout=10)
    wait_for(lambda: steps_written(output) >= 2, rank0, what="two steps")
    os.killpg(rank1.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        out, err = finish(rank0, timeout=90)
        waited = time.monotonic() - began
    finally:
        os.killpg(rank1.pid, signal.SIGKILL)
        finish(rank1)
    assert rank0.returncode == 1, err[-3000:]
    assert waited < 60, waited
    line = last_line(err)
    assert line.startswith(f"stopped: world: rank 1 (pid {rank1.pid}) is stopped"), line


@pytest.mark.slow
def test_a_rank_that_never_starts_ends_the_others_after_the_timeout(base, tmp_path):
    (rank0,) = start_ranks(base, tmp_path / "run", [0], timeout=8)
    began = time.monotonic()
    out, err = finish(rank0, timeout=90)
    assert rank0.returncode == 1, err[-3000:]
    assert time.monotonic() - began < 60
    line = last_line(err)
    assert line.startswith("stopped: world: not every process joined the run within --dist-timeout"), line
