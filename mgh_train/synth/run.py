"""The ``synth`` run: stage 1 brainstorms tasks, stage 2 writes one checked MGH example per unit.

Files (all append-only JSON Lines, one fsync per row, see :mod:`.writer`):

* ``--output`` (``data.jsonl``): accepted examples, in the MGH format the trainer reads, plus
  ``task``, ``task_type``, ``instruction`` (the task), ``model``, ``prompt_version``, ``knobs``,
  ``unit``, ``response_format`` and ``tokens``.
* the rejects file (``data.rejects.jsonl``): one row per unit that produced no example, with the
  ``reason`` (a failed check, a duplicate, a request the server refuses) and the reply; and one
  row with ``"final": false`` per request that failed on retryable errors after its retries (the
  server down or overloaded): those units are not done, and a rerun asks them again.
* the tasks file (``data.tasks.jsonl``): the stage-1 tasks, in the order they arrived.

A *unit* is one stage-2 request, ``"<task type>/<task index>/<example index>"``. Every unit ends
as exactly one row of the output or one final row of the rejects file, so a restarted run skips
the units found there, and its knobs and request seed are drawn from ``(seed, unit)``: the same command
asks the same questions again. Tokens of earlier runs count against ``--token-budget`` (each row
stores its own). A brainstorm round is a unit too (``"brainstorm/<task type>/<round>"``).

``max_failures_in_a_row`` requests failing one after another (an outage, a quota) stop the run
instead of marking every remaining unit failed; an unexpected error stops it too, after the rows
written so far are closed, and is raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import prompts
from .client import RESPONSE_FORMATS, ChatClient, Reply, RequestFailed, RetryPolicy
from .validate import Rejected, check_example, extract_json
from .writer import RowWriter, beside, normalize_text

TASK_WORDS = (3, 80)  # word-count bounds of a brainstormed task description
REPLY_KEPT = 4000  # characters of a rejected reply kept in the rejects file


@dataclass
class SynthOptions:
    """Everything one ``synth`` run needs; see ``python -m mgh_train synth --help``."""

    output: str
    model: str = ""
    base_url: str | None = None
    task_types: tuple[str, ...] = prompts.TASK_TYPES
    tasks_per_type: int = 20
    examples_per_task: int = 1
    brainstorm_size: int = 20
    max_brainstorm_rounds: int = 0  # 0: 3 x the rounds the tasks need, plus 2
    concurrency: int = 8
    token_budget: int = 0  # 0: no budget
    timeout: float = 120.0
    max_retries: int = 6
    max_failures_in_a_row: int = 20
    response_format: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int = 0
    rejects: str | None = None
    tasks: str | None = None
    dry_run: bool = False
    progress: bool | None = None  # None: when standard error is a terminal

    def __post_init__(self):
        self.task_types = tuple(self.task_types)
        self._check_task_types()
        self._check_numbers()
        if not self.dry_run and not self.model.strip():
            raise ValueError("model: expected the name of the model the server serves (--model)")
        self._check_paths()

    def _check_task_types(self) -> None:
        if not self.task_types:
            raise ValueError("task_types: expected at least one of " + ", ".join(prompts.TASK_TYPES))
        for task_type in self.task_types:
            prompts.check_task_type(task_type)
        if len(set(self.task_types)) != len(self.task_types):
            raise ValueError(f"task_types: listed twice in {', '.join(self.task_types)}")

    def _check_numbers(self) -> None:
        for name in (
            "tasks_per_type",
            "examples_per_task",
            "brainstorm_size",
            "concurrency",
            "max_tokens",
            "max_failures_in_a_row",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("max_brainstorm_rounds", "token_budget", "max_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {self.timeout}")
        if self.response_format != "auto" and self.response_format not in RESPONSE_FORMATS:
            raise ValueError(
                f"response_format: expected auto or one of {', '.join(RESPONSE_FORMATS)}, got {self.response_format!r}"
            )
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature: expected 0 to 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected more than 0 and at most 1, got {self.top_p}")

    def _check_paths(self) -> None:
        out = Path(self.output)
        if out.is_dir():
            raise ValueError(f"output: {out} is a folder; expected a .jsonl file path")
        paths = {"output": out, "rejects": self.rejects_path, "tasks": self.tasks_path}
        if len({p.resolve() for p in paths.values()}) != len(paths):
            raise ValueError("rejects/tasks: must be files other than the output and each other")

    @property
    def rejects_path(self) -> Path:
        return Path(self.rejects) if self.rejects else beside(Path(self.output), "rejects.jsonl")

    @property
    def tasks_path(self) -> Path:
        return Path(self.tasks) if self.tasks else beside(Path(self.output), "tasks.jsonl")

    @property
    def rounds_limit(self) -> int:
        if self.max_brainstorm_rounds:
            return self.max_brainstorm_rounds
        return 3 * math.ceil(self.tasks_per_type / self.brainstorm_size) + 2


@dataclass
class SynthSummary:
    """What a run did. ``accepted``/``rejected`` count this run's stage-2 units; ``*_before`` earlier runs'."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0  # requests (both stages) that failed on retryable errors: not done, a rerun retries them
    accepted_before: int = 0
    rejected_before: int = 0
    tasks: dict = field(default_factory=dict)  # task type -> tasks available for stage 2
    brainstorm_rounds: int = 0
    brainstorm_rejected: int = 0
    requests: int = 0
    retries: int = 0
    tokens: int = 0  # this run
    tokens_before: int = 0
    response_format: str = ""
    stopped: str | None = None  # why the run ended before every unit was done, or None
    outage: bool = False  # stopped because requests kept failing
    dropped_torn_lines: list = field(default_factory=list)
    seconds: float = 0.0
    reject_reasons: dict = field(default_factory=dict)  # reason (first words) -> count, this run

    def lines(self) -> list[str]:
        total = self.tokens + self.tokens_before
        out = [
            f"accepted {self.accepted} and rejected {self.rejected} examples in this run "
            f"({self.accepted_before} and {self.rejected_before} before it); {self.failed} requests failed "
            "after their retries",
            "tasks per type: " + ", ".join(f"{k} {v}" for k, v in self.tasks.items()),
            f"brainstorm rounds {self.brainstorm_rounds} ({self.brainstorm_rejected} without a new task)",
            f"requests {self.requests} ({self.retries} retries), tokens {self.tokens} this run, {total} in all, "
            f"response_format {self.response_format}, {self.seconds:.1f} s",
        ]
        for reason, count in sorted(self.reject_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"  rejected {count:>5d} x {reason}")
        for line in self.dropped_torn_lines:
            out.append(f"dropped a torn last line (the previous run was killed mid-write): {line}")
        if self.stopped:
            out.append(f"stopped early: {self.stopped}")
        elif self.failed:
            out.append(
                f"{self.failed} requests failed (see the rejects file); rerun the same command to ask them again"
            )
        else:
            out.append("done: every unit has a row")
        return out


def unit_seed(seed: int, unit: str) -> int:
    """A 31-bit request seed drawn from the run seed and the unit (the same on a resumed run)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{unit}".encode()).digest()[:4], "big") >> 1


def _reason_class(reason: str) -> str:
    """A reason without its numbers, for counting (``the query has 3 words, ...`` -> ``the query has N words``)."""
    head = reason.split(";")[0].split(",")[0].split("(")[0]
    return re.sub(r"\d+", "N", " ".join(head.split()))


class _Progress:
    """A tqdm bar over stage-2 units with requests/s, tokens, accepted and rejected (or nothing)."""

    def __init__(self, enabled: bool | None, total: int, initial: int):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="ex", desc="synth", dynamic_ncols=True)
        self.started = time.monotonic()

    def update(self, summary: SynthSummary, client: ChatClient, advance: int = 1) -> None:
        if self.bar is None:
            return
        rate = client.usage.requests / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(
            f"req/s {rate:.2f} tok {client.usage.total_tokens} ok {summary.accepted} rej {summary.rejected}",
            refresh=False,
        )
        self.bar.update(advance)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Synthesizer:
    """One run of :class:`SynthOptions` (see the module docstring); :meth:`run` does it."""

    def __init__(
        self,
        options: SynthOptions,
        *,
        client: ChatClient | None = None,
        log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    ):
        self.options, self.log = options, log
        self.client = client
        self.summary = SynthSummary()
        self.done_units: set[str] = set()
        self.next_round: dict[str, int] = {t: 0 for t in prompts.TASK_TYPES}  # ids are never reused
        self.rounds_done: dict[str, int] = {t: 0 for t in prompts.TASK_TYPES}  # rounds that got an answer
        self.failures_in_a_row = 0
        self._running: set = set()
        self.tasks: dict[str, list[str]] = {t: [] for t in prompts.TASK_TYPES}
        self.task_keys: set[str] = set()
        self._fatal: BaseException | None = None

    # -- state from earlier runs ---------------------------------------------------------------
    def _seen_output(self, row: dict) -> None:
        self.done_units.add(str(row.get("unit")))
        self.summary.accepted_before += 1
        self.summary.tokens_before += int(row.get("tokens") or 0)

    def _seen_reject(self, row: dict) -> None:
        unit, final = str(row.get("unit")), row.get("final", True)
        if unit.startswith("brainstorm/"):
            self._seen_round(row.get("task_type"), unit, done=final)
        elif final:
            self.done_units.add(unit)
            self.summary.rejected_before += 1
        self.summary.tokens_before += int(row.get("tokens") or 0)

    def _seen_round(self, task_type, unit: str, *, done: bool) -> None:
        """A brainstorm round on file: its id is taken; ``done`` if it got an answer (counts to the limit)."""
        number = unit.rsplit("/", 1)[-1]
        if task_type in self.next_round and number.isdigit():
            self.next_round[task_type] = max(self.next_round[task_type], int(number) + 1)
            self.rounds_done[task_type] += bool(done)

    def _seen_task(self, row: dict) -> None:
        task_type, task = row.get("task_type"), row.get("task")
        if task_type in self.tasks and isinstance(task, str):
            self.tasks[task_type].append(task)
            self.task_keys.add(_task_key(task_type, task))
        self._seen_round(task_type, str(row.get("round")), done=bool(row.get("first_of_round")))
        self.summary.tokens_before += int(row.get("tokens") or 0)

    # -- budget ----------------------------------------------------------------------------------
    def _tokens_spent(self) -> int:
        """Tokens of this output so far: earlier runs' (from their rows) and this run's."""
        return self.summary.tokens_before + self.client.usage.total_tokens

    def _budget_left(self) -> bool:
        budget = self.options.token_budget
        return not budget or self._tokens_spent() < budget

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> SynthSummary:
        """Run both stages (or print the prompts with ``dry_run``); the summary."""
        if self.options.dry_run:
            self.dry_run()
            return self.summary
        return asyncio.run(self._run())

    async def _run(self) -> SynthSummary:
        o = self.options
        started = time.monotonic()
        own_client = self.client is None
        if own_client:
            self.client = ChatClient(
                base_url=o.base_url,
                model=o.model,
                timeout=o.timeout,
                retry=RetryPolicy(max_retries=o.max_retries),
                response_format=o.response_format,
                temperature=o.temperature,
                top_p=o.top_p,
                max_tokens=o.max_tokens,
                log=self.log,
            )
        task_writer = RowWriter(
            o.tasks_path, key=lambda r: _task_key(r.get("task_type"), r.get("task")), on_row=self._seen_task
        )
        reject_writer = RowWriter(o.rejects_path, key=_reject_key, on_row=self._seen_reject)
        writer = RowWriter(o.output, on_row=self._seen_output)
        for w in (task_writer, reject_writer, writer):
            if w.dropped_torn_line is not None:
                self.summary.dropped_torn_lines.append(f"{w.path}: {w.dropped_torn_line[:120]!r}")
                self.log(f"synth: {w.path}: dropped a torn last line left by a killed run")
        self._semaphore = asyncio.Semaphore(o.concurrency)
        try:
            await self._stage1(task_writer, reject_writer)
            if self._fatal is None:
                await self._stage2(writer, reject_writer)
        finally:
            for w in (task_writer, reject_writer, writer):
                w.close()
            self.summary.requests = self.client.usage.requests
            self.summary.retries = self.client.usage.retries
            self.summary.tokens = self.client.usage.total_tokens
            self.summary.response_format = self.client.response_format
            self.summary.seconds = time.monotonic() - started
            if own_client:
                await self.client.close()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    async def _bounded(self, jobs: Iterator[Callable[[], asyncio.Future]]) -> None:
        """Run the coroutines ``jobs`` yields, at most ``concurrency`` at once, until they end or the run stops."""
        running = self._running
        try:
            for job in jobs:
                await self._semaphore.acquire()
                if self._fatal is not None or self.summary.stopped is not None:
                    self._semaphore.release()
                    break
                if not self._budget_left():
                    self._semaphore.release()
                    self._stop(
                        f"token budget of {self.options.token_budget} reached "
                        f"({self._tokens_spent()} tokens spent); "
                        "rerun the same command with a larger budget to go on"
                    )
                    break
                task = asyncio.ensure_future(self._guard(job()))
                running.add(task)
                task.add_done_callback(self._finished)
            while running:
                await asyncio.wait(set(running))
        finally:
            for task in list(running):
                task.cancel()

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._semaphore.release()

    def _stop(self, reason: str, *, outage: bool = False) -> None:
        """Start no more requests; those in flight finish and are written."""
        if self.summary.stopped is None:
            self.summary.stopped, self.summary.outage = reason, outage
            self.log(f"synth: {reason}; stopping")

    async def _guard(self, coroutine) -> None:
        """Await one unit; an exception out of it (ServerRefused, or a bug) stops the whole run."""
        try:
            await coroutine
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every unit's failure must reach the run, not the event loop
            if self._fatal is None:
                self._fatal = error
                for task in list(self._running):  # rows are written synchronously: cancelling loses none
                    if task is not asyncio.current_task():
                        task.cancel()

    def _request_failed(self, error: RequestFailed) -> None:
        """Count a transient failure; too many in a row stop the run (the server is down, or out of quota)."""
        self.summary.failed += 1
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.options.max_failures_in_a_row:
            self._stop(
                f"{self.failures_in_a_row} requests failed in a row (last: {error}); check the server, "
                "then rerun the same command",
                outage=True,
            )

    # -- stage 1 ---------------------------------------------------------------------------------
    async def _stage1(self, task_writer: RowWriter, reject_writer: RowWriter) -> None:
        o = self.options
        while self._fatal is None and self.summary.stopped is None:
            jobs = []
            for task_type in o.task_types:
                missing = o.tasks_per_type - len(self.tasks[task_type])
                rounds_left = o.rounds_limit - self.rounds_done[task_type]
                for _ in range(min(math.ceil(max(missing, 0) / o.brainstorm_size), max(rounds_left, 0))):
                    unit = f"brainstorm/{task_type}/{self.next_round[task_type]}"
                    self.next_round[task_type] += 1
                    jobs.append(lambda t=task_type, u=unit: self._brainstorm(t, u, task_writer, reject_writer))
            if not jobs:
                break
            await self._bounded(iter(jobs))
        for task_type in o.task_types:
            have = min(len(self.tasks[task_type]), o.tasks_per_type)
            self.summary.tasks[task_type] = have
            if have < o.tasks_per_type and self.summary.stopped is None and self._fatal is None:
                self.log(
                    f"synth: only {have} of {o.tasks_per_type} {task_type} tasks after "
                    f"{self.rounds_done[task_type]} brainstorm rounds; going on with those"
                )

    async def _brainstorm(self, task_type: str, unit: str, task_writer: RowWriter, reject_writer: RowWriter) -> None:
        o = self.options
        messages = prompts.brainstorm_messages(task_type, o.brainstorm_size)
        self.summary.brainstorm_rounds += 1
        reply: Reply | None = None
        try:
            reply = await self.client.complete(
                messages, schema=prompts.BRAINSTORM_SCHEMA, name="tasks", seed=unit_seed(o.seed, unit)
            )
            self.failures_in_a_row = 0
            found = extract_json(reply.text).get("tasks")
            if not isinstance(found, list):
                raise Rejected("field 'tasks' missing or not a list")
            new = []
            for task in found:
                if not isinstance(task, str) or not TASK_WORDS[0] <= len(task.split()) <= TASK_WORDS[1]:
                    continue
                key = _task_key(task_type, task)
                if key not in self.task_keys:
                    self.task_keys.add(key)
                    new.append(" ".join(task.split()))
            if not new:
                raise Rejected(f"no new task of {TASK_WORDS[0]}-{TASK_WORDS[1]} words in the reply")
        except (Rejected, RequestFailed) as error:
            final = not getattr(error, "transient", False)
            self.summary.brainstorm_rejected += 1
            self.rounds_done[task_type] += final
            reject_writer.write(self._reject_row(unit, "brainstorm", task_type, None, str(error), reply, final))
            if not final:
                self._request_failed(error)
            return
        self.rounds_done[task_type] += 1
        for i, task in enumerate(new):
            task_writer.write(
                {
                    "task_type": task_type,
                    "task": task,
                    "round": unit,
                    "first_of_round": i == 0,
                    "tokens": reply.tokens if i == 0 else 0,
                    "model": o.model,
                    "prompt_version": prompts.PROMPT_VERSION,
                }
            )
            self.tasks[task_type].append(task)

    # -- stage 2 ---------------------------------------------------------------------------------
    def units(self) -> Iterator[tuple[str, str, str]]:
        """``(unit, task type, task)`` of every stage-2 unit, in order, done or not."""
        o = self.options
        for task_type in o.task_types:
            for index, task in enumerate(self.tasks[task_type][: o.tasks_per_type]):
                for k in range(o.examples_per_task):
                    yield f"{task_type}/{index}/{k}", task_type, task

    async def _stage2(self, writer: RowWriter, reject_writer: RowWriter) -> None:
        units = list(self.units())
        done = sum(unit in self.done_units for unit, _, _ in units)
        progress = _Progress(self.options.progress, len(units), done)
        try:
            jobs = (
                lambda u=u, t=t, task=task: self._example(u, t, task, writer, reject_writer, progress)
                for u, t, task in units
                if u not in self.done_units
            )
            await self._bounded(jobs)
        finally:
            progress.close()

    async def _example(
        self, unit: str, task_type: str, task: str, writer: RowWriter, reject_writer: RowWriter, progress: _Progress
    ) -> None:
        o = self.options
        knobs = self._knobs(task_type, unit)
        messages = prompts.example_messages(task, task_type, knobs)
        reply: Reply | None = None
        try:
            reply = await self.client.complete(
                messages, schema=prompts.EXAMPLE_SCHEMA, name="mgh_example", seed=unit_seed(o.seed, unit)
            )
            self.failures_in_a_row = 0
            try:
                example = check_example(extract_json(reply.text), bounds=prompts.length_bounds(task_type))
            except Rejected as error:
                if reply.finish_reason == "length":
                    raise Rejected(f"{error} (the reply was cut at max_tokens={o.max_tokens})") from None
                raise
            row = {
                **example,
                "task": task,
                "task_type": task_type,
                "instruction": task,
                "model": o.model,
                "prompt_version": prompts.PROMPT_VERSION,
                "knobs": prompts.knobs_record(knobs),
                "unit": unit,
                "response_format": reply.response_format,
                "tokens": reply.tokens,
                "source": "mgh-synth",
            }
            if row in writer:
                raise Rejected("duplicate of an earlier row (same query and positive)")
            writer.write(row)
            self.summary.accepted += 1
        except (Rejected, RequestFailed) as error:
            final = not getattr(error, "transient", False)
            reject_writer.write(self._reject_row(unit, "example", task_type, task, str(error), reply, final))
            if final:
                self.summary.rejected += 1
                reason = _reason_class(str(error))
                self.summary.reject_reasons[reason] = self.summary.reject_reasons.get(reason, 0) + 1
            else:
                self._request_failed(error)
        progress.update(self.summary, self.client)

    def _knobs(self, task_type: str, unit: str) -> prompts.Knobs:
        """The unit's knobs, drawn from (seed, unit): the same in a rerun and in the dry run."""
        return prompts.draw_knobs(task_type, random.Random(f"{self.options.seed}/{unit}"))

    def _reject_row(
        self, unit: str, stage: str, task_type: str, task: str | None, reason: str, reply: Reply | None, final: bool
    ) -> dict:
        row = {
            "unit": unit,
            "stage": stage,
            "task_type": task_type,
            "task": task,
            "reason": reason,
            "reply": reply.text[:REPLY_KEPT] if reply is not None else None,
            "tokens": reply.tokens if reply is not None else 0,
            "model": self.options.model,
            "prompt_version": prompts.PROMPT_VERSION,
        }
        if not final:  # a failed request: the unit is not done; the id keeps each failure's row apart
            row.update(final=False, id=uuid.uuid4().hex)
        return row

    # -- dry run ---------------------------------------------------------------------------------
    def dry_run(self, out=None) -> None:
        """Print the requests the run would send first (nothing is sent or written)."""
        out = out or sys.stdout
        o = self.options
        if o.tasks_path.exists():
            for row in _read_rows(o.tasks_path):
                self._seen_task(row)
        print(
            f"# dry run: nothing is sent or written. model {o.model or '(none given)'} at "
            f"{o.base_url or 'the OpenAI API'}; response_format {o.response_format}, temperature "
            f"{o.temperature}, top_p {o.top_p}, max_tokens {o.max_tokens}; output {o.output}",
            file=out,
        )
        for task_type in o.task_types:
            have = len(self.tasks[task_type])
            rounds = math.ceil(max(o.tasks_per_type - have, 0) / o.brainstorm_size)
            print(
                f"\n## stage 1 - {task_type}: {rounds} brainstorm request(s) like this one "
                f"({have} tasks already in {o.tasks_path})",
                file=out,
            )
            _print_messages(prompts.brainstorm_messages(task_type, o.brainstorm_size), out)
            task = self.tasks[task_type][0] if have else "<a task from stage 1>"
            unit = f"{task_type}/0/0"
            knobs = self._knobs(task_type, unit)
            print(
                f"\n## stage 2 - {task_type}: {o.tasks_per_type * o.examples_per_task} example request(s); "
                f"unit {unit}, knobs {prompts.knobs_record(knobs)}",
                file=out,
            )
            _print_messages(prompts.example_messages(task, task_type, knobs), out)


def _print_messages(messages: list[dict], out) -> None:
    for message in messages:
        print(f"[{message['role']}]\n{message['content']}", file=out)


def _read_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def _reject_key(row: dict) -> str:
    """One final reject per unit; every failed request keeps its own row."""
    return str(row.get("unit")) if row.get("final", True) else f"{row.get('unit')}#{row.get('id')}"


def _task_key(task_type, task) -> str:
    return f"{task_type}\x1f{normalize_text(str(task))}"


def option_names() -> list[str]:
    """The field names of :class:`SynthOptions` (the CLI maps one flag to each)."""
    return [f.name for f in fields(SynthOptions)]


__all__ = ["SynthOptions", "SynthSummary", "Synthesizer", "option_names", "unit_seed"]
