"""mgh_train.data: the four row formats, bad rows with file and line, curriculum order, batches."""

import json
import random

import pytest

from mgh_train.data import (
    DataError,
    Example,
    Negative,
    NoDuplicatesBatcher,
    check_schedule,
    mix,
    negatives_for,
    parse_row,
    read_examples,
    stage_at,
)

MGH_ROW = {
    "query": "how do vaccines work",
    "positive": "Vaccines train the immune system with a harmless antigen.",
    "negatives": [
        {"text": "The history of the smallpox hospital.", "level": 1},
        {"text": "Antibiotics kill bacteria.", "level": 2},
        {"text": "Vaccine schedules differ by country.", "level": 3},
        {"text": "How vaccines are stored: between 2 and 8 degrees.", "level": 4},
    ],
    "task": "answer health questions",
    "task_type": "short-long",
    "instruction": "Retrieve a passage that answers the question",
}


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_every_format(tmp_path):
    rows = [
        MGH_ROW,
        {"anchor": "a", "positive": "p", "negative_2": "n2", "negative_1": "n1"},
        {"anchor": "a2", "positive": "p2", "negative": "n"},
        {"query": "q", "pos": ["p", "p-extra"], "neg": ["n1", "n2"], "prompt": "Represent this"},
        {"query": "q", "positive_passages": [{"title": "T", "text": "p"}], "negative_passages": [{"text": "n"}]},
    ]
    report = read_examples(write(tmp_path, rows + [""]))
    mgh, st, st1, flag, tev = report.examples
    assert report.skipped == []
    assert [n.level for n in mgh.negatives] == [1, 2, 3, 4]
    assert mgh.instruction == MGH_ROW["instruction"] and mgh.task_type == "short-long"
    assert [n.text for n in st.negatives] == ["n1", "n2"] and st.negatives[0].level is None
    assert [n.text for n in st1.negatives] == ["n"]
    assert flag.positive == "p" and flag.instruction == "Represent this" and len(flag.negatives) == 2
    assert tev.positive == "T p" and tev.negatives == (Negative("n"),)


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"query": "q"}, "unknown row format"),
    ({**MGH_ROW, "positive": "  "}, "'positive' must be a non-empty string"),
    ({**MGH_ROW, "negatives": [{"text": "n", "level": 5}]}, "negatives[0].level must be one of 1, 2, 3, 4"),
    ({**MGH_ROW, "negatives": ["n"]}, "negatives[0] must be an object"),
    ({"query": "q", "pos": [], "neg": []}, "'pos' must hold at least one passage"),
    ({"anchor": "a", "positive": 3}, "'positive' must be a non-empty string"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_bad_row_names_file_line_and_problem(tmp_path, row, reason):
    path = write(tmp_path, [MGH_ROW, "", row, MGH_ROW])
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value).startswith(f"{path}:3: ") and reason in str(info.value), str(info.value)
    report = read_examples(path, skip_bad_rows=True)
    assert len(report.examples) == 2
    assert [line for line, _ in report.skipped] == [3] and reason in report.skipped[0][1]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_examples(tmp_path / "absent.jsonl")


def test_curriculum_stages_split_evenly_or_as_given():
    assert [stage_at(s, 10) for s in range(10)] == [1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert [stage_at(s, 6, [1, 0, 2, 1]) for s in range(6)] == [1, 3, 3, 4, 4, 4]
    with pytest.raises(ValueError, match="^stage_steps:"):
        stage_at(0, 4, [1, 2])


def test_schedules_pick_levels_in_order():
    example = parse_row(MGH_ROW)
    rng = random.Random(0)
    by_level = {n.level: n.text for n in example.negatives}
    assert [negatives_for(example, "curriculum", s, rng) for s in (1, 2, 3, 4)] == [[by_level[s]] for s in (1, 2, 3, 4)]
    assert [negatives_for(example, "reverse", s, rng) for s in (1, 2, 3, 4)] == [[by_level[s]] for s in (4, 3, 2, 1)]
    assert negatives_for(example, "level:3", 1, rng) == [by_level[3]]
    assert negatives_for(example, "all", 2, rng) == [by_level[s] for s in (1, 2, 3, 4)]
    picked = {negatives_for(example, "random", 1, rng)[0] for _ in range(200)}
    assert picked == set(by_level.values())
    public = Example("q", "p", (Negative("a"), Negative("b")))
    assert negatives_for(public, "curriculum", 4, rng)[0] in {"a", "b"}
    for bad in ("hard", "level:5", "level:"):
        with pytest.raises(ValueError, match="^schedule:"):
            check_schedule(bad)


def test_mix_public_data_at_a_ratio():
    levelled = [Example(f"q{i}", f"p{i}") for i in range(30)]
    public = [Example(f"x{i}", f"y{i}") for i in range(100)]
    mixed = mix(levelled, public, 0.25, seed=1)
    assert len(mixed) == 40 and sum(e.query.startswith("x") for e in mixed) == 10
    with pytest.raises(ValueError, match="^ratio:"):
        mix(levelled, public, 1.0, seed=1)


def test_batches_never_repeat_a_text_and_resume_exactly():
    rng = random.Random(0)
    pool = [f"text {i}" for i in range(25)]  # few texts: many collisions
    examples = [Example(*rng.sample(pool, 2), (Negative(rng.choice(pool)),)) for _ in range(60)]
    batcher = NoDuplicatesBatcher(examples, batch_size=4, seed=7)
    stream = iter(batcher)
    first = [next(stream) for _ in range(30)]  # crosses epoch boundaries
    for batch in first:
        texts = [t for i in batch for t in set(examples[i].texts())]
        assert len(batch) == 4 and len(texts) == len(set(texts))
    saved = batcher.state_dict()
    rest = [next(stream) for _ in range(10)]
    resumed = NoDuplicatesBatcher(examples, batch_size=4, seed=0)
    resumed.load_state_dict(saved)
    again = iter(resumed)
    assert [next(again) for _ in range(10)] == rest


def test_batch_size_that_cannot_be_filled():
    same = [Example("q", "p") for _ in range(5)]
    with pytest.raises(ValueError, match="^batch_size:"):
        next(iter(NoDuplicatesBatcher(same, batch_size=2)))
