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
    row = {"query": "how to keep guacamole green", "positive": "Press plastic wrap onto its surface and add lime.",
           "negatives": [{"text": f"negative text number {level}", "level": level} for level in (1, 2, 3, 4)]}
    row.update(changes)
    return row


def test_a_good_example_passes_and_comes_back_sorted():
    shuffled = example(negatives=list(reversed(example()["negatives"])))
    row = check_example(shuffled)
    assert [n["level"] for n in row["negatives"]] == [1, 2, 3, 4]
    assert check_example(example(negatives=[{"text": f"n {i}", "level": str(i)} for i in (1, 2, 3, 4)]))


@pytest.mark.parametrize("bad,reason", [
    ({"query": ""}, "field 'query' missing or empty"),
    ({"positive": None}, "field 'positive' missing or empty"),
    ({"negatives": "none"}, "field 'negatives' missing or not a list"),
    ({"negatives": [{"text": "a", "level": 1}] * 3}, "expected 4 negatives, got 3"),
    ({"negatives": [{"text": f"t{i}", "level": 1} for i in range(4)]}, "levels must be 1, 2, 3 and 4 once each"),
    ({"negatives": [{"text": f"t{i}", "level": i} for i in (0, 1, 2, 3)]}, "level 0, expected 1-4"),
    ({"negatives": ["a", "b", "c", "d"]}, "negative 0 is not an object"),
    ({"positive": "  HOW to keep   guacamole green "}, "the positive equals the query"),
    ({"negatives": [{"text": "How to keep guacamole GREEN", "level": 4}] + [{"text": f"t{i}", "level": i}
                                                                           for i in (1, 2, 3)]},
     "the level-4 negative equals the query"),
    ({"negatives": [{"text": "same", "level": 1}, {"text": "SAME", "level": 2}, {"text": "x", "level": 3},
                    {"text": "y", "level": 4}]}, "the level-2 negative equals the level-1 negative"),
])
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
    assert parse_and_check("noise {\"a\": [1, 2} " + json.dumps(row))["query"] == row["query"]
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
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(total)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
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
    resumed = subprocess.run([sys.executable, "-c", CHILD, str(path), str(total)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    queries = [json.loads(line)["query"] for line in path.read_text().splitlines()]
    assert sorted(queries) == sorted(f"query {i}" for i in range(total))
    assert int(resumed.stdout.split()[0]) == on_disk  # the resumed run starts right after the last row


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------

from mgh_train.synth import prompts  # noqa: E402


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
    item = prompts.EXAMPLE_SCHEMA["properties"]["negatives"]["items"]
    assert set(item["required"]) == {"text", "level"}
    assert check_example(row)


def test_prompt_arguments_are_checked():
    with pytest.raises(ValueError, match="task_type: expected one of"):
        prompts.brainstorm_messages("medium-medium")
    with pytest.raises(ValueError, match="count: expected a positive"):
        prompts.brainstorm_messages("symmetric", count=0)
    with pytest.raises(ValueError, match="task: expected a non-empty"):
        prompts.example_messages(" ", "symmetric", prompts.Knobs("a", "b", "c", "d"))
