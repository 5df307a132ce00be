"""The usage examples at the top of mgh_train's modules run as written (with tiny models bound to
the names they assume), so they cannot drift from the signatures they show."""

import math
import random
import textwrap

import pytest
import torch

pytest.importorskip("peft")
from mgh_kernels import infonce_loss
from mgh_train import batches, step
from mgh_train.data import read_examples, seed_files
from mgh_train.model import Embedder, EmbedderConfig
from mgh_train.precision import resolve
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def usage(module) -> str:
    """The module docstring's first indented block (its usage example), dedented."""
    lines = module.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    end = next(
        (i for i in range(start, len(lines)) if lines[i].strip() and not lines[i].startswith("    ")), len(lines)
    )
    return textwrap.dedent("\n".join(lines[start:end]))


def run_usage(module, **names) -> dict:
    namespace = {**vars(module), **names}
    exec(compile(usage(module), f"<{module.__name__} usage>", "exec"), namespace)
    return namespace


def tiny_embedder():
    torch.manual_seed(0)
    return Embedder.build(
        EmbedderConfig(base_model=None, lora_r=4, lora_alpha=8, max_length=64),
        model=tiny_decoder("llama", seed=0),
        tokenizer=tiny_tokenizer(),
    )


def seed_examples():
    return [e for path in seed_files() for e in read_examples(path).examples]


def test_the_batches_usage_runs():
    done = run_usage(batches, examples=seed_examples(), embedder=tiny_embedder(), random=random, torch=torch)
    assert isinstance(done["batch"], batches.MicroBatch) and done["batch"].queries == 8
    assert done["batch"].plan.step == 9  # the loop went through every micro-batch of the 10 steps


def test_the_step_usage_runs():
    embedder = tiny_embedder()
    examples = seed_examples()
    planner = batches.MicroBatchPlanner(
        examples,
        batches.NoDuplicatesBatcher(examples, 4),
        random.Random(0),
        schedule="level:4",
        steps=1,
        stage_steps=None,
        grad_accum=2,
    )
    collate = batches.Collate(embedder.tokenizer, embedder.config)
    done = run_usage(
        step,
        embedder=embedder.train(),
        precision=resolve(torch.device("cpu")),
        device=torch.device("cpu"),
        micro_batches=[collate(plan) for plan in planner],
        infonce_loss=infonce_loss,
    )
    assert math.isfinite(done["loss"]) and done["finite"]
    assert done["outcome"].examples == 8
