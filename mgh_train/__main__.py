"""Command line: ``python -m mgh_train [SUBCOMMAND]``; with no subcommand it runs ``demo``.

Subcommands:
    demo         train SmolLM2-135M on the seed set on the CPU, report held-out accuracy (default)
    train        train an embedder (``--config run.yaml`` and/or flags; ``train --help``)
    export       re-save a trained model folder, merging the LoRA adapter with ``--merge``
    eval         MTEB tasks on a model folder or a sentence-transformers model, offline with --data-dir
    compare      MTEB result folders side by side (and a PNG bar chart with --plot)
    synth        write MGH training data through an OpenAI-compatible endpoint (``synth --help``)
    verify       check MGH data with a real encoder: are the negatives graded as their levels say?
    mine         graded hard negatives (levels 4..1) mined from a corpus with an embedder (``mine --help``)
    kernel-demo  ATA pooling and InfoNCE on a toy batch, in about a second
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import config as train_config
from . import demo, kernel_demo
from .mining import cli as mine_cli
from .synth import cli as synth_cli

SUBCOMMANDS = ("demo", "train", "export", "eval", "compare", "synth", "verify", "mine", "kernel-demo")
DEFAULT_SUBCOMMAND = "demo"


def build_parser() -> argparse.ArgumentParser:
    # Over 60 lines on purpose: the subcommands' argparse declarations, read as a table, with no logic.
    parser = argparse.ArgumentParser(
        prog="python -m mgh_train",
        description="mgh: LLM text embedders with hard negatives and anchor-token-aware pooling.",
    )
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    demo.add_arguments(
        commands.add_parser(
            "demo",
            help="train SmolLM2-135M on the seed set on the CPU (default)",
            description=demo.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    train_config.add_arguments(
        commands.add_parser(
            "train",
            help="train an embedder",
            description=train_config.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    export = commands.add_parser(
        "export",
        help="re-save a model folder: merged, or as stock sentence-transformers",
        description=_export_doc(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--model", required=True, help="a model folder written by training (run/model)")
    export.add_argument("--output", required=True, help="the folder to write")
    export.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base weights (--format mgh; sentence-transformers exports are always merged)",
    )
    export.add_argument(
        "--format",
        default="mgh",
        choices=("mgh", "sentence-transformers"),
        help="mgh: our folder (needs mgh to load); sentence-transformers: stock modules, merged "
        "weights, loads without mgh (except ATA pooling) (default: %(default)s)",
    )
    export.add_argument(
        "--eval",
        metavar="RESULTS",
        help="an mteb result folder (eval --output): its scores go into the model card as model-index",
    )
    evaluation = commands.add_parser(
        "eval", help="run MTEB tasks", description=_evaluate_doc(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    evaluation.add_argument("--model", required=True, help="an mgh model folder, or a sentence-transformers name/path")
    evaluation.add_argument("--tasks", required=True, help="comma-separated MTEB task names, e.g. STSBenchmark,SciFact")
    evaluation.add_argument("--data-dir", help="read the tasks from local files here (offline)")
    evaluation.add_argument("--output", help="write mteb result JSON here (results/<model>/<revision>/<Task>.json)")
    evaluation.add_argument("--instructions", help="JSON file mapping task name -> query instruction")
    evaluation.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bars")
    comparison = commands.add_parser("compare", help="result folders side by side")
    comparison.add_argument("runs", nargs="+", help="folders holding mteb result JSON (eval --output)")
    comparison.add_argument("--plot", help="also write a PNG bar chart here")
    synth_cli.add_synth_arguments(
        commands.add_parser(
            "synth",
            help="write MGH training data through an OpenAI-compatible endpoint",
            description=synth_cli.SYNTH_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    synth_cli.add_verify_arguments(
        commands.add_parser(
            "verify",
            help="check MGH data with a real encoder",
            description=_verify_doc(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    mine_cli.add_arguments(
        commands.add_parser(
            "mine",
            help="graded hard negatives mined with an embedder",
            description=mine_cli.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    kernel_demo.add_arguments(
        commands.add_parser(
            "kernel-demo", help="ATA pooling and InfoNCE on a toy batch", description=kernel_demo.__doc__
        )
    )
    return parser


def _verify_doc() -> str:
    from .synth import verify

    return verify.__doc__ + synth_cli.VERIFY_DESCRIPTION_TAIL


def _export_doc() -> str:
    from . import export

    return export.__doc__


def _evaluate_doc() -> str:
    from . import evaluate

    return evaluate.__doc__


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from . import evaluate
    from .checks import check_encoder_model

    check_encoder_model(args.model)  # a path that is not there, or a folder missing its adapter: before mteb loads
    instructions = None
    if args.instructions:
        try:
            instructions = json.loads(open(args.instructions, encoding="utf-8").read())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"instructions: {args.instructions}: {error}") from None
        if not isinstance(instructions, dict) or not all(isinstance(v, str) for v in instructions.values()):
            raise ValueError(f"instructions: {args.instructions} must map task names to instruction strings")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("tasks: expected at least one MTEB task name")
    summary = evaluate.evaluate(
        args.model,
        tasks,
        data_dir=args.data_dir,
        output=args.output,
        instructions=instructions,
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
    )
    rows = {task: (s["metric"], [s["score"]]) for task, s in summary.items()}
    print(evaluate.format_table(rows, [args.model]))
    if args.output:
        print(f"results written under {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import evaluate

    print(evaluate.compare(args.runs, plot=args.plot))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.model, args.output, format=args.format, merge=args.merge, eval_results=args.eval)
    what = "sentence-transformers model" if args.format != "mgh" else "merged model" if args.merge else "model"
    print(f"{what} written to {result.path}")
    for note in result.notes:
        print(f"note: {note}")
    if args.format != "mgh":
        how = (
            "SentenceTransformer(path, trust_remote_code=True) where mgh is installed"
            if result.needs_mgh
            else "SentenceTransformer(path), no mgh needed"
        )
        print(f"load with {how}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .trainer import train

    train(train_config.config_from_args(args))  # every option checked here, before data or model loads
    return 0


RUNNERS = {
    "demo": demo.run,
    "train": _train,
    "export": _export,
    "eval": _evaluate,
    "compare": _compare,
    "synth": synth_cli.run_synth,
    "verify": synth_cli.run_verify,
    "mine": mine_cli.run,
    "kernel-demo": kernel_demo.run,
}
"""The function each subcommand runs on its parsed arguments; it returns the exit status."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_SUBCOMMAND, *argv]
    args = train_config.parse(parser, argv)
    try:
        return RUNNERS[args.command](args)
    except ValueError as error:  # bad options or data: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from .disk_space import DiskFull
        from .peers import PeerLost
        from .trainer import TrainingStopped

        if isinstance(error, (TrainingStopped, DiskFull, PeerLost)):
            print(f"stopped: {error}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM: one line, 128 + the signal (130, 143)
        from .interrupts import Interrupted

        if isinstance(error, Interrupted):
            print(f"stopped: {error}", file=sys.stderr)
            return error.exit_status
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except OSError as error:
        import errno

        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk anywhere else: one line
            print(f"error: no space left on device writing {error.filename or 'a file'}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
