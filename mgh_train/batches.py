"""Micro-batches: which examples and negatives each one trains with, its texts tokenized into length
buckets, and the DataLoader that prepares them off the training loop's critical path.

    planner = MicroBatchPlanner(examples, NoDuplicatesBatcher(examples, batch_size=8), random.Random(0),
                                schedule="curriculum", steps=10, stage_steps=None, grad_accum=1)
    loader = micro_batch_loader(planner, Collate(embedder.tokenizer, embedder.config), workers=2,
                                pin_memory=torch.cuda.is_available())
    for batch in loader:                   # MicroBatch, in the planner's order: batch.to(device)
        ...

The planner runs in the main process and is cheap: the no-duplicates sampler, the curriculum stage
and the negatives' RNG (whose state every plan carries, so a checkpoint taken after any micro-batch
resumes exactly). With W processes it plans the global micro-batch of W x ``batch_size`` examples,
identically on every rank (the same sampler, seed and RNG), and :class:`RankPlans` hands each rank
its slice: rank r takes rows r b ... r b + b - 1 with their negatives, so the gathered candidates
are in the order one process holding the whole batch has them. The collate runs in DataLoader
workers: it tokenizes the plan's queries (with their instruction prefix) and documents in one
batched tokenizer call and splits them, sorted by length, into as few padded buckets as keep the
padding small (:func:`length_buckets`): each bucket is one encoder forward. Queries and documents
share the buckets, so a micro-batch of similar lengths is one forward, and a batch of short queries
beside long documents does not pad every query to the longest document. Under GradCache
(``chunk_size``, ``chunk_tokens``) the texts, sorted by length, are cut into chunks of at most that
many texts and padded tokens instead, each padded to its own longest text: the chunks are
GradCache's encoder forwards. Where every forward is a collective (FSDP2, ``one_forward``), a plain
micro-batch is one padded forward: every rank then runs as many forwards as the others, and FSDP2,
which reduce-scatters a layer's gradients once per forward it back-propagates, syncs once per step
(GradCache's chunks, counted in texts only, are as many on every rank and each one forward per
backward).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .data import Example, NoDuplicatesBatcher, negatives_for, stage_at
from .interrupts import quiet_worker
from .model.options import DEFAULT_INSTRUCTION
from .model.tokens import pad, token_ids

PAD_MULTIPLE = 8  # a bucket's length rounds up to this
COMPILE_PAD_MULTIPLE = 64  # under --compile: fewer distinct lengths, fewer recompiles
PADDING_SLACK = 0.2  # the fewest buckets whose padding is at most this share of the real tokens win


def instruction_of(example: Example) -> str:
    """The instruction a training query is prefixed with: its row's, else its task, else the default."""
    return example.instruction or example.task or DEFAULT_INSTRUCTION


# --------------------------------------------------------------------------------------------
# plans (main process)
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """One micro-batch as decided in the main process.

    Attributes:
        step: the optimizer step (0-based) it belongs to.
        stage: its curriculum stage (1..4).
        examples: the examples, in batch order.
        negatives: per example the negative texts it trains with, ``k`` each (the fewest any has).
        state: the sampler's and the negatives RNG's state after this micro-batch (a checkpoint
            taken after it resumes with the next one).
        whole: the examples of the global micro-batch this one is a rank's slice of (None: it is
            the whole one).
    """

    step: int
    stage: int
    examples: list
    negatives: list
    state: dict
    whole: list | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return len(self.negatives[0]) if self.negatives else 0

    @property
    def all_examples(self) -> list:
        """Every example of the global micro-batch (on every rank the same)."""
        return self.whole if self.whole is not None else self.examples

    def part(self, rank: int, world: int) -> Plan:
        """Rank ``rank``'s slice of ``world`` equal ones: its examples with their negatives (K is the
        global micro-batch's)."""
        if world == 1:
            return self
        b, rest = divmod(len(self.examples), world)
        if rest:
            raise ValueError(
                f"batch_size: a global micro-batch of {len(self.examples)} does not split over {world} ranks"
            )
        rows = slice(rank * b, (rank + 1) * b)
        return Plan(self.step, self.stage, self.examples[rows], self.negatives[rows], self.state, self.examples)


class MicroBatchPlanner:
    """The micro-batches of a run, in order, from ``start_step`` to its last step: ``grad_accum`` per
    step, each a no-duplicates batch of examples with the negatives its curriculum stage trains with."""

    def __init__(
        self,
        examples: Sequence[Example],
        batcher: NoDuplicatesBatcher,
        rng: random.Random,
        *,
        schedule: str,
        steps: int,
        stage_steps: Sequence[int] | None,
        grad_accum: int,
        start_step: int = 0,
    ):
        self.examples, self.batcher, self.rng = examples, batcher, rng
        self.schedule, self.steps, self.stage_steps = schedule, steps, stage_steps
        self.grad_accum, self.start_step = grad_accum, start_step

    def __iter__(self) -> Iterator[Plan]:
        batches = iter(self.batcher)
        for micro in range(self.start_step * self.grad_accum, self.steps * self.grad_accum):
            step = micro // self.grad_accum
            stage = stage_at(step, self.steps, self.stage_steps)
            chosen = [self.examples[i] for i in next(batches)]
            negatives = [negatives_for(e, self.schedule, stage, self.rng) for e in chosen]
            k = min(len(n) for n in negatives)  # public rows may carry fewer; every query keeps k
            state = {"sampler": self.batcher.state_dict(), "negatives_rng": self.rng.getstate()}
            yield Plan(step, stage, chosen, [n[:k] for n in negatives], state)


class RankPlans:
    """The planner's global micro-batches, each cut to rank ``rank``'s slice of ``world`` (the
    DataLoader's sampler on that rank)."""

    def __init__(self, planner: MicroBatchPlanner, rank: int, world: int):
        self.planner, self.rank, self.world = planner, rank, world

    def __iter__(self) -> Iterator[Plan]:
        for plan in self.planner:
            yield plan.part(self.rank, self.world)


# --------------------------------------------------------------------------------------------
# length buckets
# --------------------------------------------------------------------------------------------


def round_up(length: int, multiple: int) -> int:
    """The padded length of a text of ``length`` tokens (at least 1): rounded up to ``multiple``."""
    return -(-max(1, length) // multiple) * multiple


def length_buckets(
    lengths: Sequence[int], *, multiple: int = PAD_MULTIPLE, max_buckets: int = 4, slack: float = PADDING_SLACK
) -> list[list[int]]:
    """Split texts of these token ``lengths`` into padded buckets, one encoder forward each.

    The texts are sorted longest first and cut into contiguous groups, each padded to its longest
    text rounded up to ``multiple``; the cuts minimise the padded tokens. The fewest groups (at most
    ``max_buckets``) whose padded tokens exceed the real ones by at most ``slack`` win, or else the
    cheapest: one forward for texts of similar length, more where short queries would otherwise
    be padded to the longest document.

    Returns the indices of each bucket, longest bucket first, each longest text first.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rounded = [round_up(lengths[i], multiple) for i in order]
    # runs of equal rounded length: cuts only fall between runs
    runs = [(value, len(list(group))) for value, group in itertools.groupby(rounded)]
    starts = [0] + list(itertools.accumulate(count for _, count in runs))
    real = sum(lengths)
    best: dict = {}  # (first run, groups) -> (padded tokens, cut run indices)

    def cheapest(first: int, groups: int):
        key = (first, groups)
        if key not in best:
            rest = len(runs) - first
            if groups == 1 or rest == 1:
                best[key] = ((starts[-1] - starts[first]) * runs[first][0], [])
            else:
                options = []
                for cut in range(first + 1, len(runs)):
                    tail, cuts = cheapest(cut, groups - 1)
                    options.append(((starts[cut] - starts[first]) * runs[first][0] + tail, [cut] + cuts))
                best[key] = min(options)
        return best[key]

    chosen = None
    for groups in range(1, max(1, max_buckets) + 1):
        padded, cuts = cheapest(0, groups)
        if chosen is None or padded < chosen[0]:
            chosen = (padded, cuts)
        if padded <= (1 + slack) * real:
            break
    bounds = [0] + [starts[c] for c in chosen[1]] + [len(order)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def check_chunk_tokens(chunk_tokens: int, *, collective: bool) -> None:
    """Refuse a token budget on GradCache's chunks (``chunk_tokens``) where every forward is a
    collective (FSDP2): every rank must then run as many forwards, which a budget in tokens, cut
    from each rank's own texts, does not promise (a budget in texts, ``chunk_size``, does)."""
    if collective and chunk_tokens:
        raise ValueError(
            "chunk_tokens: under --parallel fsdp every forward is collective, so every process must run "
            "as many: bound GradCache's chunks by --chunk-size only"
        )


def chunks(lengths: Sequence[int], *, size: int = 0, tokens: int = 0, multiple: int = 8) -> list[list[int]]:
    """GradCache's chunks: the texts sorted longest first, cut into runs of at most ``size`` texts
    (0: no cap) whose padded tokens (texts x the run's first length rounded up to ``multiple``)
    stay within ``tokens`` (0: no budget; a text longer than it is a chunk of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, start = [], 0
    while start < len(order):
        n = len(order) - start
        if size:
            n = min(n, size)
        if tokens:
            longest = round_up(lengths[order[start]], multiple)
            n = min(n, max(1, tokens // longest))
        out.append(order[start : start + n])
        start += n
    return out


# --------------------------------------------------------------------------------------------
# the collate (DataLoader workers)
# --------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """A tokenized micro-batch: B queries, then B positives, then B * k negatives (query i's at
    rows 2B + i k ... 2B + i k + k - 1), in length buckets.

    Attributes:
        buckets: per encoder forward, ``input_ids``, ``attention_mask``, ``pool_mask`` [n, L] int64.
        inverse: [N] int64: text t's embedding is row ``inverse[t]`` of the buckets' outputs,
            concatenated in order.
        queries, k: B and the negatives per query.
        tokens: real (non-padding) tokens, counted on the host.
        plan: the :class:`Plan` it was made from.
        padded: per bucket, whether its attention mask pads anything (known on the host; None:
            unknown), so the encoder need not read the mask to find out.
    """

    buckets: list
    inverse: torch.Tensor
    queries: int
    k: int
    tokens: int
    plan: Plan | None = field(default=None, repr=False)
    padded: list | None = None

    def pin_memory(self) -> MicroBatch:
        """Page-locked copies, so that :meth:`to` copies to a GPU asynchronously (DataLoader's hook)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> MicroBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> MicroBatch:
        # a packed row's max_seqlen is a host int (mgh_train/packing.py): left as it is
        buckets = [
            {name: fn(t) if isinstance(t, torch.Tensor) else t for name, t in bucket.items()} for bucket in self.buckets
        ]
        return MicroBatch(buckets, fn(self.inverse), self.queries, self.k, self.tokens, self.plan, self.padded)


class Collate:
    """Tokenizes a :class:`Plan` into a :class:`MicroBatch` (picklable: it runs in DataLoader workers).

    Args:
        tokenizer, config: the embedder's tokenizer and :class:`~mgh_train.model.EmbedderConfig`.
        multiple: bucket lengths are rounded up to it (8; 64 bounds the shapes a compiled encoder
            sees).
        max_buckets, slack: see :func:`length_buckets`.
        chunk_size, chunk_tokens: GradCache's chunks instead of buckets (see :func:`chunks`; 0 and 0:
            no GradCache).
        one_forward: a plain micro-batch is one bucket (FSDP2, whose forwards are collective).
    """

    def __init__(
        self,
        tokenizer,
        config,
        *,
        multiple: int = PAD_MULTIPLE,
        max_buckets: int = 4,
        slack: float = PADDING_SLACK,
        chunk_size: int = 0,
        chunk_tokens: int = 0,
        one_forward: bool = False,
    ):
        self.tokenizer, self.config = tokenizer, config
        self.multiple, self.max_buckets, self.slack = multiple, 1 if one_forward else max_buckets, slack
        self.chunk_size, self.chunk_tokens = chunk_size, chunk_tokens
        check_chunk_tokens(chunk_tokens, collective=one_forward)

    def __call__(self, plan: Plan) -> MicroBatch:
        queries = [e.query for e in plan.examples]
        docs = [e.positive for e in plan.examples] + [t for n in plan.negatives for t in n]
        heads = [self.config.query_template.format(instruction=instruction_of(e)) for e in plan.examples]
        rows, flags = token_ids(self.tokenizer, self.config, queries + docs, heads + [""] * len(docs))
        return self.assemble(rows, flags, queries=len(queries), k=plan.k, plan=plan)

    def assemble(
        self,
        rows: Sequence[Sequence[int]],
        flags: Sequence[Sequence[bool]],
        *,
        queries: int,
        k: int,
        plan: Plan | None = None,
    ) -> MicroBatch:
        """The :class:`MicroBatch` of tokenized texts (B queries, B positives, B * k negatives; ids and
        pooled flags as :func:`mgh_train.model.token_ids` gives them), in length buckets."""
        lengths = [len(r) for r in rows]
        if self.chunk_size or self.chunk_tokens:
            buckets = chunks(lengths, size=self.chunk_size, tokens=self.chunk_tokens, multiple=self.multiple)
        else:
            buckets = length_buckets(lengths, multiple=self.multiple, max_buckets=self.max_buckets, slack=self.slack)
        features, position, offset = [], [0] * len(rows), 0
        for bucket in buckets:
            for i, text in enumerate(bucket):
                position[text] = offset + i
            offset += len(bucket)
            features.append(
                pad(
                    self.tokenizer,
                    [rows[i] for i in bucket],
                    [flags[i] for i in bucket],
                    pad_to_multiple_of=self.multiple,
                )
            )
        padded = [not bool(f["attention_mask"].all()) for f in features]  # host tensors: no sync
        return MicroBatch(features, torch.tensor(position), queries, k, sum(lengths), plan, padded)


class _Planned(torch.utils.data.Dataset):
    """A dataset indexed by plans: ``dataset[plan]`` is the collated micro-batch (the DataLoader's
    sampler hands out plans)."""

    def __init__(self, collate: Collate):
        self.collate = collate

    def __getitem__(self, plan: Plan) -> MicroBatch:
        return self.collate(plan)


def micro_batch_loader(
    planner: MicroBatchPlanner, collate: Collate, *, workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`MicroBatch` in the planner's order, collated in ``workers`` processes
    (0: in the loop itself) and page-locked with ``pin_memory``."""
    return torch.utils.data.DataLoader(
        _Planned(collate),
        sampler=planner,
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator(),  # its workers' seeds must not draw on the global RNG (dropout's)
        worker_init_fn=quiet_worker if workers else None,  # Ctrl-C: the main process stops them
    )


def _identity(batch):
    return batch


__all__ = [
    "Collate",
    "MicroBatch",
    "MicroBatchPlanner",
    "Plan",
    "RankPlans",
    "check_chunk_tokens",
    "chunks",
    "instruction_of",
    "length_buckets",
    "micro_batch_loader",
    "round_up",
]
