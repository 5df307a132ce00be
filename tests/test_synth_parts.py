"""The synthesizer's parts that need no server: response validation and JSON recovery, and the
append-only writer (fsync per row, torn last line dropped, resume after a real SIGKILL without
losing or duplicating a row)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mgh_train.synth.validate import LengthBounds, Rejected, check_example, extract_json, parse_and_check
from mgh_train.synth.writer import RowWriter, normalize_text

ROOT = Path(__file__).resolve().parents[1]


def example(**changes):
    row = {
        "query": "how to keep guacamole green",
        "positive": "Press plastic wrap onto its surface and add lime.",
        "negatives": [{"text": f"negative text number {level}", "level": level} for level in (1, 2, 3, 4)],
    }
    row.update(changes)
    return row


def test_a_good_example_passes_and_comes_back_sorted():
    shuffled = example(negatives=list(reversed(example()["negatives"])))
    row = check_example(shuffled)
    assert [n["level"] for n in row["negatives"]] == [1, 2, 3, 4]
    assert check_example(example(negatives=[{"text": f"n {i}", "level": str(i)} for i in (1, 2, 3, 4)]))


@pytest.mark.parametrize(
    "bad,reason",
    [
        ({"query": ""}, "field 'query' missing or empty"),
        ({"positive": None}, "field 'positive' missing or empty"),
        ({"negatives": "none"}, "field 'negatives' missing or not a list"),
        ({"negatives": [{"text": "a", "level": 1}] * 3}, "expected 4 negatives, got 3"),
        ({"negatives": [{"text": f"t{i}", "level": 1} for i in range(4)]}, "levels must be 1, 2, 3 and 4 once each"),
        ({"negatives": [{"text": f"t{i}", "level": i} for i in (0, 1, 2, 3)]}, "level 0, expected 1-4"),
        ({"negatives": ["a", "b", "c", "d"]}, "negative 0 is not an object"),
        ({"positive": "  HOW to keep   guacamole green "}, "the positive equals the query"),
        (
            {
                "negatives": [{"text": "How to keep guacamole GREEN", "level": 4}]
                + [{"text": f"t{i}", "level": i} for i in (1, 2, 3)]
            },
            "the level-4 negative equals the query",
        ),
        (
            {
                "negatives": [
                    {"text": "same", "level": 1},
                    {"text": "SAME", "level": 2},
                    {"text": "x", "level": 3},
                    {"text": "y", "level": 4},
                ]
            },
            "the level-2 negative equals the level-1 negative",
        ),
    ],
)
def test_bad_examples_are_rejected_with_the_reason(bad, reason):
    with pytest.raises(Rejected, match=reason):
        check_example(example(**bad))


def test_length_bounds():
    with pytest.raises(Rejected, match=r"the query has 5 words, expected 1-3"):
        check_example(example(), bounds=LengthBounds(query=(1, 3)))
    with pytest.raises(Rejected, match=r"the level-1 negative has 4 words, expected 5-50"):
        check_example(example(), bounds=LengthBounds(negative=(5, 50)))


def test_json_is_recovered_from_plain_text_and_garbage_is_rejected():
    row = example()
    assert extract_json(json.dumps(row)) == row
    assert extract_json("Sure! Here it is:\n```json\n" + json.dumps(row) + "\n```\nHope it helps {not json}") == row
    assert parse_and_check('noise {"a": [1, 2} ' + json.dumps(row))["query"] == row["query"]
    for text in ("", "   ", "no braces at all", '{"truncated": "bo', "[1, 2, 3]", None):
        with pytest.raises(Rejected):
            parse_and_check(text)


def test_normalize_text():
    assert normalize_text("  Hello\tWORLD\n ") == normalize_text("hello world") == "hello world"


def test_writer_drops_a_torn_last_line_and_keeps_the_rest(tmp_path):
    path = tmp_path / "out.jsonl"
    with RowWriter(path) as writer:
        assert writer.write(example(query="q1")) and writer.write(example(query="q2"))
        assert not writer.write(example(query="  Q1 "))  # a duplicate after normalising
    with open(path, "a") as handle:
        handle.write('{"query": "q3", "posi')  # the run died mid-write
    with RowWriter(path) as writer:
        assert writer.rows == 2 and writer.dropped_torn_line.startswith('{"query": "q3"')
        assert example(query="q2") in writer
        writer.write(example(query="q3"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["query"] for r in rows] == ["q1", "q2", "q3"]


def test_writer_refuses_a_broken_line_that_a_kill_cannot_explain(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(example(query="q1")) + "\nnot json\n" + json.dumps(example(query="q2")) + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl:2: not a JSON object row"):
        RowWriter(path)


CHILD = """
import sys, time
from mgh_train.synth.writer import RowWriter
writer = RowWriter(sys.argv[1])
for i in range(int(sys.argv[2])):
    row = {"query": f"query {i}", "positive": f"positive {i}", "pad": "x" * 20000}
    if row not in writer:
        writer.write(row)
        print(i, flush=True)
"""


def test_sigkill_then_resume_loses_and_repeats_nothing(tmp_path):
    path, total = tmp_path / "out.jsonl", 400
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(total)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    acknowledged = []
    for line in child.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 40:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with RowWriter(path) as writer:
        on_disk = writer.rows
    assert on_disk >= len(acknowledged)  # every row the child reported is on disk
    assert on_disk < total, "the child finished before the kill; the test proved nothing"
    resumed = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(total)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    queries = [json.loads(line)["query"] for line in path.read_text().splitlines()]
    assert sorted(queries) == sorted(f"query {i}" for i in range(total))
    assert int(resumed.stdout.split()[0]) == on_disk  # the resumed run starts right after the last row


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

from mgh_train.synth import prompts


@pytest.mark.parametrize("task_type", prompts.TASK_TYPES)
def test_prompts_render_for_every_task_type(task_type):
    import random

    stage1 = prompts.brainstorm_messages(task_type, count=7)
    assert stage1[-1]["role"] == "user" and "7" in stage1[-1]["content"] and '"tasks"' in stage1[-1]["content"]
    rng = random.Random(0)
    knobs = prompts.draw_knobs(task_type, rng)
    assert prompts.draw_knobs(task_type, random.Random(0)) == knobs  # one seed, one draw
    text = prompts.example_messages("Given a claim, retrieve evidence", task_type, knobs)[-1]["content"]
    for value in prompts.knobs_record(knobs).values():
        assert value in text
    for level in (1, 2, 3, 4):
        assert f"level {level}:" in text
    bounds = prompts.length_bounds(task_type)
    query_side = "long" if task_type.startswith("long") else "short"
    assert bounds.query == prompts._BOUNDS[query_side]


def test_the_example_schema_describes_what_the_validator_accepts():
    row = example()
    assert set(prompts.EXAMPLE_SCHEMA["required"]) == set(row)
    items = prompts.EXAMPLE_SCHEMA["properties"]["negatives"]["prefixItems"]
    assert [item["properties"]["level"]["const"] for item in items] == [1, 2, 3, 4]
    assert all(set(item["required"]) == {"text", "level"} for item in items)
    assert check_example(row)


def test_prompt_arguments_are_checked():
    with pytest.raises(ValueError, match="task_type: expected one of"):
        prompts.brainstorm_messages("medium-medium")
    with pytest.raises(ValueError, match="count: expected a positive"):
        prompts.brainstorm_messages("symmetric", count=0)
    with pytest.raises(ValueError, match="task: expected a non-empty"):
        prompts.example_messages(" ", "symmetric", prompts.Knobs("a", "b", "c", "d"))


# --------------------------------------------------------------------------------------------
# client helpers, run options, dry run (no server needed; the real-server tests are in
# tests/test_synth_server.py)
# --------------------------------------------------------------------------------------------

from mgh_train.synth import client as synth_client
from mgh_train.synth.run import Synthesizer, SynthOptions, _reason_class, unit_seed


def test_retry_after_is_read_in_every_form():
    import email.utils
    import time

    read = synth_client.retry_after_seconds
    assert read({"retry-after": "3"}) == 3.0
    assert read({"retry-after": "0.25"}) == 0.25
    assert read({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= read({"retry-after": in_ten}) <= 10.5
    assert read({"retry-after": "soon"}) is None and read({}) is None and read(None) is None


def test_backoff_grows_is_capped_and_honours_the_server():
    import random

    policy = synth_client.RetryPolicy(base=1.0, cap=8.0, max_server_wait=60.0, rng=random.Random(0))
    delays = [policy.delay(attempt, None) for attempt in range(8)]
    for attempt, delay in enumerate(delays):
        assert 0.5 * min(8.0, 2**attempt) <= delay <= min(8.0, 2**attempt)
    assert policy.delay(0, 7.0) == 7.0 and policy.delay(3, 3600.0) == 60.0


def test_response_formats_in_fallback_order():
    schema = {"type": "object"}
    assert synth_client.RESPONSE_FORMATS == ("json_schema", "json_object_schema", "json_object", "text")
    assert synth_client.response_format_for("json_schema", schema, "x") == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": schema, "strict": False},
    }
    assert synth_client.response_format_for("json_object_schema", schema, "x") == {
        "type": "json_object",
        "schema": schema,
    }
    assert synth_client.response_format_for("json_object", schema, "x") == {"type": "json_object"}
    assert synth_client.response_format_for("text", schema, "x") is None
    with pytest.raises(ValueError, match="response_format: expected auto or one of"):
        synth_client.response_format_for("yaml", schema, "x")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"task_types": ()}, "task_types: expected at least one"),
        ({"task_types": ("short-short", "medium")}, "task_type: expected one of"),
        ({"task_types": ("symmetric", "symmetric")}, "task_types: listed twice"),
        ({"tasks_per_type": 0}, "tasks_per_type: expected a positive integer"),
        ({"concurrency": -1}, "concurrency: expected a positive integer"),
        ({"token_budget": -5}, "token_budget: expected a non-negative integer"),
        ({"timeout": 0}, "timeout: expected a positive number"),
        ({"response_format": "xml"}, "response_format: expected auto or one of"),
        ({"temperature": 3.0}, "temperature: expected 0 to 2"),
        ({"top_p": 0.0}, "top_p: expected more than 0"),
        ({"model": " "}, r"model: expected the name of the model .*--model"),
        ({"rejects": "OUT"}, "rejects/tasks: must be files other than the output"),
        ({"tasks": "OUT-RESOLVED"}, "rejects/tasks: must be files other than the output"),
    ],
)
def test_synth_options_are_checked(tmp_path, change, message):
    values = {"output": str(tmp_path / "d.jsonl"), "model": "m", **change}
    if values.get("rejects") == "OUT":
        values["rejects"] = values["output"]
    if values.get("tasks") == "OUT-RESOLVED":  # the same file, spelled another way
        values["tasks"] = str(tmp_path / "sub" / ".." / "d.jsonl")
    with pytest.raises(ValueError, match=message):
        SynthOptions(**values)


def test_side_files_sit_beside_the_output(tmp_path):
    options = SynthOptions(output=str(tmp_path / "data.jsonl"), model="m")
    assert options.rejects_path == tmp_path / "data.rejects.jsonl"
    assert options.tasks_path == tmp_path / "data.tasks.jsonl"
    assert options.rounds_limit == 3 * 1 + 2
    with pytest.raises(ValueError, match="output: .* is a folder"):
        SynthOptions(output=str(tmp_path), model="m")


def test_dry_run_prints_every_prompt_and_writes_nothing(tmp_path, capsys):
    from mgh_train.__main__ import main

    out = tmp_path / "sub" / "d.jsonl"
    assert main(["synth", "--output", str(out), "--dry-run", "--tasks-per-type", "3", "--brainstorm-size", "5"]) == 0
    text = capsys.readouterr().out
    for task_type in prompts.TASK_TYPES:
        assert f"## stage 1 - {task_type}: 1 brainstorm request(s)" in text
        assert f"## stage 2 - {task_type}: 3 example request(s); unit {task_type}/0/0" in text
    assert text.count("Brainstorm a list of 5 potentially useful") == len(prompts.TASK_TYPES)
    assert not (tmp_path / "sub").exists()


def test_the_same_unit_draws_the_same_request(tmp_path):
    assert unit_seed(0, "short-short/3/0") == unit_seed(0, "short-short/3/0") != unit_seed(1, "short-short/3/0")
    assert 0 <= unit_seed(7, "x") < 2**31
    assert _reason_class("the query has 3 words, expected 1-40") == "the query has N words"
    assert _reason_class("HTTP 500: boom; gave up after 3 attempts") == "HTTP N: boom"


def test_synth_and_verify_document_every_option():
    import argparse

    from mgh_train.__main__ import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("synth", "verify"):
        for action in commands.choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings} has no help"
    synth_flags = {a.dest for a in commands.choices["synth"]._actions}
    from mgh_train.synth.run import option_names

    assert set(option_names()) <= synth_flags


def test_raw_newlines_inside_strings_are_accepted():
    assert extract_json('{"tasks": ["one\nline", "tab\there"]}') == {"tasks": ["one\nline", "tab\there"]}
    assert extract_json('prose {"a": "b\nc"} more')["a"] == "b\nc"


def test_verify_names_the_file_and_line_of_a_bad_row(tmp_path):
    from mgh_train.data import DataError
    from mgh_train.synth.verify import verify

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(example()) + "\n" + json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: expected four negatives with levels 1-4"):
        verify([str(path)])
    path.write_text(json.dumps(example()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: "):
        verify([str(path)])
    path.write_bytes(
        json.dumps(example()).encode() + b"\n" + json.dumps(example()).encode().replace(b"guac", b"\xe9") + b"\n"
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8: byte 0xe9 at byte \d+ of the line"):
        verify([str(path)])
    with pytest.raises(ValueError, match=r"data: cannot read .*missing.jsonl"):
        verify([str(tmp_path / "missing.jsonl")])
    path.write_text(json.dumps(example()) + "\n")
    with pytest.raises(ValueError, match="filter: .* is an input file"):
        verify([str(path)], filter_to=str(path))


def test_deeply_nested_replies_are_rejected_not_raised():
    with pytest.raises(Rejected, match="nests too deep"):
        extract_json('{"tasks": ' + "[" * 100_000)
    with pytest.raises(Rejected):
        extract_json("[" * 100_000)


def _api_error(status, message, body=None, param=None):
    from types import SimpleNamespace

    return SimpleNamespace(status_code=status, message=message, body=body, param=param)


@pytest.mark.parametrize(
    "error,refuses",
    [
        (
            _api_error(
                500,
                "1 validation error: {'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be "
                "'text' or 'json_object'\"}",
            ),
            True,
        ),  # llama-cpp-python 0.3.36, seen for real
        (
            _api_error(
                400,
                "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                param="response_format",
            ),
            True,
        ),
        (_api_error(404, "No endpoints found that support the requested parameters: response_format"), True),
        (_api_error(400, "Error code: 400", body=None), True),  # a bare 400: worth one step down
        (
            _api_error(
                400, "Could not parse the JSON body of your request", body={"error": "Could not parse the JSON body"}
            ),
            False,
        ),
        (
            _api_error(400, "This model's maximum context length is 2048 tokens", body={"error": "context length"}),
            False,
        ),
        (_api_error(500, "internal error", body={"error": "boom"}), False),
    ],
)
def test_which_errors_lower_the_response_format(error, refuses):
    assert synth_client._refuses_format(error) is refuses


def test_the_key_is_checked_without_showing_it_and_cut_from_server_text(monkeypatch):
    secret = "sk-mgh-unit-test-9876543210"
    client = synth_client.ChatClient(base_url="http://127.0.0.1:9/v1", model="m", api_key=secret)
    cleaned = client._clean(f"invalid key {secret}; also saw sk-someoneelse-123456789 and Bearer {secret}")
    assert secret not in cleaned and "someoneelse" not in cleaned and cleaned.count("[key]") == 3
    monkeypatch.setenv("OPENAI_API_KEY", "sk-clé-with-accent")
    with pytest.raises(ValueError, match=r"api key: OPENAI_API_KEY must be printable ASCII") as error:
        synth_client.ChatClient(base_url="http://127.0.0.1:9/v1", model="m")
    assert "clé" not in str(error.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nothing_listening_stops_at_the_first_request_and_a_rerun_asks_again(tmp_path, capsys):
    """Nothing listens on the port (a real connection refusal): one request, one line, nothing marked done."""
    from mgh_train.__main__ import main
    from mgh_train.synth.client import ServerRefused

    url = f"http://127.0.0.1:{_closed_port()}/v1"
    out = tmp_path / "d.jsonl"
    argv = [
        "synth",
        "--base-url",
        url,
        "--model",
        "m",
        "--output",
        str(out),
        "--task-types",
        "symmetric",
        "--tasks-per-type",
        "2",
        "--max-retries",
        "2",
        "--max-failures-in-a-row",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot connect to {url} (") and "start the server, or check --base-url" in err
    assert not out.read_text() and not (tmp_path / "d.rejects.jsonl").read_text()
    options = SynthOptions(
        output=str(out),
        model="m",
        base_url=url,
        task_types=("symmetric",),
        tasks_per_type=2,
        max_retries=2,
        max_failures_in_a_row=3,
        concurrency=1,
        progress=False,
    )
    synthesizer = Synthesizer(options, log=lambda message: None)
    with pytest.raises(ServerRefused, match="cannot connect to"):
        synthesizer.run()  # the rerun asks again, and stops as fast
    assert synthesizer.client.usage.requests == 1 and synthesizer.client.usage.retries == 0


def test_openai_without_a_key_stops_before_sending_or_writing(tmp_path, monkeypatch, capsys):
    from mgh_train.__main__ import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv = [
        "synth",
        "--model",
        "gpt-4o-mini",
        "--output",
        str(tmp_path / "d.jsonl"),
        "--max-retries",
        "0",
        "--max-failures-in-a-row",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "error: api key: OPENAI_API_KEY is not set, and OpenAI's API needs it; "
        "export OPENAI_API_KEY=..., or pass --base-url for a server that needs no key\n"
    )
    assert list(tmp_path.iterdir()) == []


class _DownClient:
    """A stand-in for a server that answered once and then went down: every request fails after its retries."""

    def __init__(self):
        self.usage, self.response_format = synth_client.Usage(), "text"

    async def complete(self, messages, *, schema, name, seed=None):
        self.usage.requests += 1
        raise synth_client.RequestFailed("connection failed (ConnectError); gave up after 1 attempts", transient=True)


def test_an_outage_stops_the_run_and_the_summary_counts_agree(tmp_path):
    options = SynthOptions(
        output=str(tmp_path / "d.jsonl"),
        model="m",
        task_types=("symmetric",),
        tasks_per_type=2,
        max_failures_in_a_row=3,
        concurrency=1,
        progress=False,
    )
    summary = Synthesizer(options, client=_DownClient(), log=lambda message: None).run()
    assert summary.outage and summary.failed == 3
    lines = summary.lines()
    assert "; 3 requests failed after their retries" in lines[0], lines
    assert lines[-1].startswith("stopped early: 3 requests failed in a row (last: connection failed"), lines
    rejects = [json.loads(line) for line in (tmp_path / "d.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 3 and all(r["final"] is False and r["stage"] == "brainstorm" for r in rejects)
    assert len({r["unit"] for r in rejects}) == 3  # each attempt got its own round id


class _FakeClient:
    """A stand-in client whose stage-2 call hits a bug (KeyError): the run must stop and raise it."""

    def __init__(self):
        self.usage, self.response_format, self.calls = synth_client.Usage(), "text", 0

    async def complete(self, messages, *, schema, name, seed=None):
        self.calls += 1
        self.usage.requests += 1
        if name == "tasks":
            return synth_client.Reply(
                '{"tasks": ["Given a question, retrieve its answer", "Given a title, retrieve the abstract"]}',
                "text",
                "stop",
                5,
            )
        raise KeyError("a bug in a unit")


def test_an_unexpected_error_in_a_unit_stops_the_run_instead_of_vanishing(tmp_path):
    options = SynthOptions(
        output=str(tmp_path / "d.jsonl"),
        model="m",
        task_types=("short-short",),
        tasks_per_type=2,
        concurrency=1,
        progress=False,
    )
    client = _FakeClient()
    with pytest.raises(KeyError, match="a bug in a unit"):
        Synthesizer(options, client=client, log=lambda message: None).run()
    assert client.calls == 2  # the brainstorm and the first unit; no unit after the failing one started
    assert not (tmp_path / "d.jsonl").read_text() and not (tmp_path / "d.rejects.jsonl").read_text()
    assert len((tmp_path / "d.tasks.jsonl").read_text().splitlines()) == 2
