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
    needs_of,
    negatives_for,
    parse_row,
    read_examples,
    read_sts_pairs,
    stage_at,
    stages_used,
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


def negatives(*levels):
    return [{"text": f"negative {i} at level {level}", "level": level} for i, level in enumerate(levels)]


@pytest.mark.parametrize(
    "row, schedule, steps, reason",
    [
        (
            {**MGH_ROW, "negatives": negatives(1, 2, 3)},
            "curriculum",
            8,
            "no level-4 negative, but schedule 'curriculum' trains with levels 1, 2, 3, 4; the row has levels 1, 2, 3",
        ),
        ({**MGH_ROW, "negatives": negatives(2, 3, 4)}, "all", 8, "no level-1 negative, but schedule 'all'"),
        ({**MGH_ROW, "negatives": negatives(1, 2, 3)}, "reverse", 8, "no level-4 negative, but schedule 'reverse'"),
        (
            {**MGH_ROW, "negatives": negatives(1, 3)},
            "level:2",
            8,
            "no level-2 negative, but schedule 'level:2' trains with level 2; the row has levels 1, 3",
        ),
        (
            {**MGH_ROW, "negatives": negatives(1, 1, 2, 3)},
            "random",
            8,
            "negatives[1].level 1 repeats negatives[0].level",
        ),
        ({**MGH_ROW, "negatives": negatives(1, 2, 3, 4, 4)}, "curriculum", 8, "must hold at most 4 negatives"),
        (
            {**MGH_ROW, "negatives": negatives(1, 2.0, 3, 4)},
            "curriculum",
            8,
            "negatives[1].level must be one of 1, 2, 3, 4, got 2.0",
        ),
    ],
)
def test_rows_are_checked_against_what_the_schedule_trains_with(tmp_path, row, schedule, steps, reason):
    path = write(tmp_path, [MGH_ROW, row, MGH_ROW])
    with pytest.raises(DataError) as info:
        read_examples(path, needs=needs_of(schedule, steps))
    assert str(info.value).startswith(f"{path}:2: ") and reason in str(info.value), str(info.value)
    report = read_examples(path, skip_bad_rows=True, needs=needs_of(schedule, steps))
    assert len(report.examples) == 2 and [line for line, _ in report.skipped] == [2]


def test_rows_with_the_levels_a_schedule_uses_are_enough(tmp_path):
    three = {**MGH_ROW, "negatives": negatives(1, 2, 3)}
    for schedule, steps, stage_steps in [
        ("curriculum", 3, None),
        ("level:2", 8, None),
        ("random", 8, None),
        ("reverse", 8, [0, 4, 4, 0]),
        ("curriculum", 8, [2, 2, 4, 0]),
    ]:
        report = read_examples(write(tmp_path, [three]), needs=needs_of(schedule, steps, stage_steps))
        assert len(report.examples) == 1, (schedule, steps, stage_steps)
    public = write(tmp_path, [{"anchor": "a", "positive": "p", "negative": "n"}])
    assert len(read_examples(public, needs=needs_of("all", 8)).examples) == 1
    # pairs (no hard negative) train with in-batch negatives under every schedule
    pairs = write(
        tmp_path,
        [{**MGH_ROW, "negatives": []}, {"anchor": "a", "positive": "p"}, {"query": "q", "pos": ["p"], "neg": []}],
    )
    for schedule in ("random", "curriculum", "level:1", "all"):
        assert [e.negatives for e in read_examples(pairs, needs=needs_of(schedule, 8)).examples] == [()] * 3


def test_stages_and_levels_a_run_uses():
    assert stages_used(8) == [1, 2, 3, 4] and stages_used(2) == [1, 2] and stages_used(6, [0, 0, 3, 1]) == [3, 4]
    assert stages_used(9, [2, 2, 2, 0]) == [1, 2, 3, 4]  # the last stage runs on after the given steps
    assert needs_of("reverse", 2).levels == {4, 3} and needs_of("level:3", 8).levels == {3}
    assert needs_of("random", 8).levels == set() and needs_of("all", 1).levels == {1, 2, 3, 4}


def test_a_line_that_is_not_utf8_is_named_and_skippable(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(MGH_ROW).encode()
    bad = json.dumps({**MGH_ROW, "query": "cafe"}).encode().replace(b"cafe", b"caf\xe9")
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + good + b"\n")  # a byte-order mark first
    column = bad.index(b"\xe9") + 1
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value) == f"{path}:2: not UTF-8: byte 0xe9 at byte {column} of the line (save the file as UTF-8)"
    report = read_examples(path, skip_bad_rows=True)
    assert len(report.examples) == 2 and [line for line, _ in report.skipped] == [2]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "expected sentence1,sentence2,score rows, found none"),
        ("a,b,1.0\nc,d,nan\n", ":2: score 'nan' is not a finite number"),
        ("a,b,inf\n", ":1: score 'inf' is not a finite number"),
        ("a,b,1.0\nc,d\n", ":2: expected sentence1, sentence2, score; got 2 fields"),
    ],
)
def test_sts_files_need_finite_scores_and_rows(tmp_path, content, reason):
    path = tmp_path / "sts-test.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        read_sts_pairs(path)
    assert str(info.value).startswith(str(path)) and reason in str(info.value), str(info.value)


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
