"""Training past one process, on the CPU with gloo and two processes, each an equality with the
one-process run: two ranks of batch b gathering each other's candidates train as one process of
batch 2b (replicate and FSDP2, with and without GradCache and grad-accum), with one gradient sync
per optimizer step; a run killed after a checkpoint resumes to the losses of an uninterrupted run
(replicate, FSDP2, GradCache), and a world-2 checkpoint resumes in one process; mismatched shapes
raise on every rank and a NaN on one rank stops both; and ``torchrun`` writes the losses of the
one-process command line.

The ranks are subprocesses (tests/distributed_worker.py) under the variables torchrun sets; one
launch of two processes runs several scenarios of several trainer runs each (the equalities and
the failures share one; the checkpoints, kept for ``pytest -m slow``, another). Float rule: both sides do
the same float32 arithmetic in other groupings (each rank's micro-batch padded and bucketed on its
own, sums over ranks added in another order), so they agree to float32 rounding: losses to 1e-5
relative, each step's gradients (before clipping) to 1e-5 relative over all LoRA weights. AdamW
divides each gradient element by its own magnitude, so an element whose gradient is at rounding
level can move by a fraction of the learning rate: the weights agree to 2e-5 (lr 5e-3)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from dist_cases import CASES, B, GradientTap, config, tiny_embedder
from mgh_train import trainer
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env() -> dict:
    """A user's environment: the kernels' CPU path (no Triton interpreter), this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def launch(scenarios: str, folder: Path, world: int = 2, timeout: int = 600) -> list:
    """Run ``scenarios`` (comma-separated, in order) on ``world`` ranks (RANK, WORLD_SIZE, ... as
    torchrun sets them); each rank's ``{scenario: result}``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **user_env(),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenarios, str(folder)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank}:\n{output[-6000:]}"
    return [torch.load(folder / f"rank-{rank}.pt", weights_only=False) for rank in range(world)]


def relative_error(got: list, want: list) -> float:
    error = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want)) ** 0.5
    return error / sum(float((w**2).sum()) for w in want) ** 0.5


def quiet(_):
    pass


# --------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------


def test_one_process_with_several_gpus_in_view_says_how_to_use_them(monkeypatch):
    from mgh_train import checks, distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(checks, "check_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    lines = []
    ranks = distributed.setup(None, lines.append)
    assert (ranks.rank, ranks.world, ranks.owned) == (0, 1, False)
    assert len(lines) == 1 and "4 GPUs are visible but this is one process" in lines[0]
    assert "torchrun --nproc-per-node 4 -m mgh_train train" in lines[0]


def test_a_launch_without_its_rendezvous_is_one_clear_error(monkeypatch):
    from mgh_train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match=r"^WORLD_SIZE: 2 processes asked for, but MASTER_ADDR, MASTER_PORT unset"):
        distributed.setup("cpu", quiet)


# --------------------------------------------------------------------------------------------
# two ranks of batch b = one process of batch 2b
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One launch of two ranks: the equalities, then the failures."""
    folder = tmp_path_factory.mktemp("ranks")
    return folder, launch("equalities,failures", folder)


@pytest.fixture
def equalities_run(default_run):
    folder, ranks = default_run
    return folder, [result["equalities"] for result in ranks]


@pytest.fixture
def equalities(equalities_run):
    return equalities_run[1]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_the_doubled_batch(equalities, case, tmp_path):
    """Two optimizer steps: the mean of the ranks' losses at each step, each step's gradients and the
    weights after them equal the one-process run with batch 2b (its plain step: one forward per
    length bucket, no GradCache), which draws the same global batches and negatives."""
    spec = CASES[case]
    embedder = tiny_embedder(**spec["model"])
    with GradientTap() as tap:
        one = trainer.train(
            config(tmp_path / "one", batch_size=2 * B, **spec["train"]),
            embedder=embedder,
            log=quiet,
            report_accuracy=False,
        )
    weights = {n: p.detach() for n, p in embedder.named_parameters() if p.requires_grad}
    for rank, result in enumerate(equalities):
        got = result[case]
        assert got["losses"] == pytest.approx(one.losses, rel=1e-5), (rank, got["losses"], one.losses)
        assert len(got["grads"]) == len(tap.grads) == 2
        for step, (grads, want) in enumerate(zip(got["grads"], tap.grads)):
            assert relative_error(grads, want) <= 1e-5, (rank, step, relative_error(grads, want))
        assert set(got["weights"]) == set(weights)
        for name, value in weights.items():
            torch.testing.assert_close(got["weights"][name], value, rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert equalities[0][case]["losses"] == equalities[1][case]["losses"]  # every rank logs the job's mean


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["world"].get("parallel") == "fsdp"])
def test_fsdp_exports_the_whole_model(equalities_run, case):
    """Rank 0's ``model/`` of an FSDP2 run holds the whole weights (gathered from the shards): it
    loads in one process with the trained adapter and the base the run started from."""
    from mgh_train.model import Embedder

    folder, ranks = equalities_run
    loaded = Embedder.load(folder / case / "model")
    weights = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    trained = ranks[0][case]["weights"]
    assert len(weights) == len(trained)
    for name, value in trained.items():
        assert torch.equal(weights[name], value), name
    base = tiny_embedder(**CASES[case]["model"])
    frozen = {n: p for n, p in base.named_parameters() if not p.requires_grad}
    for name, p in loaded.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_one_gradient_sync_per_optimizer_step(equalities):
    """Whatever the micro-batches (grad-accum 2) and GradCache chunks (several backward passes per
    micro-batch): replicate all-reduces the flat trainable gradients once per step (beside the
    step's float64 reduction of loss, finite flag and tokens); FSDP2 reduce-scatters each group
    holding LoRA weights once per step (two decoder layers; the root's embeddings and norm are
    frozen) and all-reduces no gradient."""
    trainable = sum(p.numel() for p in tiny_embedder().parameters() if p.requires_grad)
    for result in equalities:
        for case, spec in CASES.items():
            steps = result[case]["syncs"]
            assert len(steps) == 2
            for syncs in steps:
                # besides: the step's float64 statistics, and the host-side int64 stop flag that
                # tells every rank of a SIGINT/SIGTERM on any of them (mgh_train/interrupts.py)
                gradients = [
                    call for call in syncs["all_reduce"] if call not in ((3, "torch.float64"), (1, "torch.int64"))
                ]
                assert syncs["all_reduce"].count((3, "torch.float64")) == 1, (case, syncs)
                assert syncs["all_reduce"].count((1, "torch.int64")) == 1, (case, syncs)
                if spec["world"].get("parallel") == "fsdp":
                    assert gradients == [] and syncs["reduce_scatter"] == 2, (case, syncs)
                else:
                    assert gradients == [(trainable, "torch.float32")] and syncs["reduce_scatter"] == 0, (case, syncs)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return folder, [result["checkpoints"] for result in launch("checkpoints", folder)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["replicate", "fsdp", "gradcache"])
def test_a_killed_run_resumes_to_the_same_losses(checkpoints, engine):
    """Two ranks, 4 steps, random negative levels: a run stopped right after its step-2 checkpoint and
    resumed with ``--resume latest`` (its adapter initialised otherwise: everything comes from the
    checkpoint) logs the losses of the uninterrupted run, on every rank, and metrics.jsonl one row
    per step."""
    folder, ranks = checkpoints
    for result in ranks:
        got = result[engine]
        assert got["start"] == 2
        assert got["resumed"] == got["whole"][2:]
    rows = ranks[0][engine]["rows"]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == ranks[0][engine]["whole"]
    step = folder / f"{engine}-killed" / "checkpoints" / "step-0000002"
    assert (step / ("sharded" if engine == "fsdp" else "trainable.pt")).exists() and (step / "rng-1.pt").is_file()
    assert json.loads((step / "run.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["replicate", "fsdp"])
def test_a_world_two_checkpoint_resumes_in_one_process(checkpoints, engine, tmp_path):
    """The step-2 checkpoint of two ranks of batch b, resumed by one process of batch 2b (for FSDP2's
    sharded checkpoint through torch.distributed.checkpoint without a process group): the losses of
    the two-rank run, and the run says that the world size changed."""
    folder, ranks = checkpoints
    checkpoint = tmp_path / "step-0000002"
    shutil.copytree(folder / f"{engine}-killed" / "checkpoints" / "step-0000002", checkpoint)
    lines = []
    options = dict(steps=4, save_every=2, keep_checkpoints=0, schedule="random")
    resumed = trainer.train(
        config(tmp_path / "one", batch_size=2 * B, resume=str(checkpoint), **options),
        embedder=tiny_embedder(lora_seed=3),
        log=lines.append,
        report_accuracy=False,
    )
    assert resumed.losses == pytest.approx(ranks[0][engine]["whole"][2:], rel=1e-5)
    said = "\n".join(lines)
    assert "written by 2 process(es) of batch 3, this run is 1 of batch 6: the global batch (6) is unchanged" in said
    wrong = config(tmp_path / "wrong", batch_size=B, resume=str(checkpoint), **options)
    with pytest.raises(ValueError, match=r"global batch \(batch_size x processes\) 3 x 2 = 6 -> 3 x 1 = 3"):
        trainer.train(wrong, embedder=tiny_embedder(), log=quiet, report_accuracy=False)


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def failures(default_run):
    return [result["failures"] for result in default_run[1]]


def test_mismatched_shapes_raise_on_every_rank(failures):
    """Rank 1 with a wider model (D 48 against 32), or with four hard negatives per query against
    one (K: another --schedule): the same ValueError on both ranks, before any collective that
    would hang on the shapes."""
    assert failures[0]["width"] == failures[1]["width"]
    assert "the embedding dimension D (rank 0: 32, rank 1: 48)" in failures[0]["width"]
    assert failures[0]["negatives"] == failures[1]["negatives"]
    assert "option schedule (rank 0: 'level:1', rank 1: 'all')" in failures[0]["negatives"]


@pytest.mark.parametrize("engine", ["replicate", "fsdp"])
def test_a_nan_on_one_rank_stops_both(failures, engine):
    """Rank 1's loss is NaN at step 2: both ranks skip that update (their weights are those before
    it) and stop at it with the same NonFiniteTraining message."""
    first, second = failures[0][engine], failures[1][engine]
    assert first["error"] is not None and first["error"] == second["error"]
    assert first["step"] == second["step"] == 2 and first["steps_run"] == second["steps_run"] == 2
    assert first["unchanged"] and second["unchanged"]
    assert first["error"].startswith("step 2: the loss is not finite")


# --------------------------------------------------------------------------------------------
# torchrun end to end
# --------------------------------------------------------------------------------------------


def public_rows(count: int) -> list:
    """FlagEmbedding rows with two hard negatives (the MGH rows have four)."""
    topics = ["rivers", "compilers", "bread", "comets", "tax law", "violins", "glaciers", "chess"]
    return [
        {
            "query": f"what do we know about {topics[i % 8]} number {i}?",
            "pos": [f"A short note on {topics[i % 8]}, item {i}, with a fact or two."],
            "neg": [
                f"Unrelated remark {i} about {topics[(i + 3) % 8]}.",
                f"Another aside {i} on {topics[(i + 5) % 8]}.",
            ],
        }
        for i in range(count)
    ]


def test_torchrun_writes_the_losses_of_one_process_with_the_global_batch(tmp_path):
    """``torchrun --nproc-per-node 2 -m mgh_train train --batch-size 4`` and one process with
    ``--batch-size 8``: the same losses in metrics.jsonl, on the seed data with public rows of
    fewer hard negatives mixed in (under --schedule all a micro-batch holding one trains every
    query with two, on every rank alike: K is the global batch's). No LoRA dropout: two ranks draw
    other dropout masks than one process does."""
    base = tmp_path / "tiny-llama"
    tiny_decoder("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps(row) + "\n" for row in public_rows(80)))
    common = [
        "--model",
        str(base),
        "--max-length",
        "32",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--steps",
        "3",
        "--log-every",
        "1",
        "--schedule",
        "all",
        "--public-data",
        str(public),
        "--public-ratio",
        "0.3",
        "--lr",
        "5e-3",
        "--no-progress",
        "--report-to",
        "none",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "mgh_train", "train", "--output", str(tmp_path / "one"), "--batch-size", "8", *common],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=user_env(),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "mgh_train",
            "train",
            "--output",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=user_env(),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    assert [r["loss"] for r in rows["two"]] == pytest.approx([r["loss"] for r in rows["one"]], rel=1e-5)
    assert "world: 2 processes, --parallel replicate, global batch 8 (4 per process)" in two.stdout
    assert two.stdout.count("model saved to") == 1  # rank 0 alone logs and saves
    assert (tmp_path / "two" / "model" / "mgh_config.json").is_file()
    # the run did mix rows of both kinds into its global batches (the same planner, in this process)
    from mgh_train.batches import MicroBatchPlanner
    from mgh_train.config import TrainConfig
    from mgh_train.data import NoDuplicatesBatcher, load_training_data

    cfg = TrainConfig(output=str(tmp_path / "x"), public_data=[str(public)], public_ratio=0.3, schedule="all", steps=3)
    examples = load_training_data(cfg, quiet)[0]
    import random

    ks = [
        plan.k
        for plan in MicroBatchPlanner(
            examples,
            NoDuplicatesBatcher(examples, 8, seed=0),
            random.Random(0),
            schedule="all",
            steps=3,
            stage_steps=None,
            grad_accum=1,
        )
    ]
    assert 2 in ks, ks
