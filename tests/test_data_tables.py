"""--data from Parquet files and Hugging Face datasets folders: the JSON Lines formats' columns, the
same examples as from JSON Lines, bad rows named by file and row, and a training run on each."""

import json
import sys

import pytest

from mgh_train.data import DataError, read_examples

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

MGH = [
    {
        "query": f"how do vaccines work {i}",
        "positive": f"Vaccines train the immune system {i}.",
        "negatives": [{"text": f"negative {i} level {level}", "level": level} for level in (1, 2, 3, 4)],
        "task": "answer health questions",
        "task_type": "short-long",
        "instruction": None if i % 2 else "Retrieve a passage that answers the question",
    }
    for i in range(8)
]
FORMATS = {
    "mgh": MGH,
    "sentence-transformers": [
        {"anchor": f"a{i}", "positive": f"p{i}", "negative_1": f"n{i}", "negative_2": None if i == 1 else f"m{i}"}
        for i in range(8)
    ],
    "flag-embedding": [
        {"query": f"q{i}", "pos": [f"p{i}", "extra"], "neg": [f"n{i}"], "prompt": "Represent this"} for i in range(8)
    ],
    "tevatron": [
        {
            "query": f"q{i}",
            "positive_passages": [{"title": "T", "text": f"p{i}"}],
            "negative_passages": [{"title": None, "text": f"n{i}"}],
        }
        for i in range(8)
    ],
}


def jsonl(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    return path


def parquet(tmp_path, rows, name="rows.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def dataset_folder(tmp_path, rows, name="rows"):
    path = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tables_read_like_json_lines(tmp_path, fmt):
    rows = FORMATS[fmt]
    want = read_examples(jsonl(tmp_path, rows)).examples
    assert len(want) == 8
    assert read_examples(parquet(tmp_path, rows)).examples == want
    assert read_examples(dataset_folder(tmp_path, rows)).examples == want
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert read_examples(tmp_path / "dict").examples == want  # a DatasetDict gives its train split


def test_a_bad_row_names_the_file_and_the_row(tmp_path):
    rows = [dict(r) for r in FORMATS["sentence-transformers"]]
    rows[5]["positive"] = "  "
    for path in (parquet(tmp_path, rows), dataset_folder(tmp_path, rows)):
        with pytest.raises(DataError) as info:
            read_examples(path)
        assert str(info.value) == f"{path}:row 5: field 'positive' must be a non-empty string, got '  '"
        report = read_examples(path, skip_bad_rows=True)
        assert len(report.examples) == 7 and [index for index, _ in report.skipped] == [5]


def test_unreadable_tables_and_missing_packages_say_so(tmp_path, monkeypatch):
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        read_examples(broken)
    splits = datasets.DatasetDict({"a": datasets.Dataset.from_list(MGH), "b": datasets.Dataset.from_list(MGH)})
    splits.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="without a 'train' split"):
        read_examples(tmp_path / "two")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a folder, but not a datasets folder"):
        read_examples(tmp_path / "plain")
    folder = dataset_folder(tmp_path, MGH)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(DataError, match=r"needs the datasets package \(pip install mgh\[data\]\)"):
        read_examples(folder)


def test_training_reads_a_parquet_file(tmp_path):
    pytest.importorskip("peft")
    from mgh_train import trainer
    from mgh_train.config import TrainConfig
    from mgh_train.model import Embedder, EmbedderConfig
    from tiny_models import tiny_decoder, tiny_tokenizer

    embedder = Embedder.build(
        EmbedderConfig(base_model=None, lora_r=4, max_length=32, pooling="mean"),
        model=tiny_decoder("llama"),
        tokenizer=tiny_tokenizer(),
    )
    cfg = TrainConfig(
        data=[str(parquet(tmp_path, MGH))],
        steps=2,
        batch_size=4,
        output=str(tmp_path / "run"),
        progress=False,
        max_length=32,
        report_to=["none"],
    )
    result = trainer.train(cfg, embedder=embedder, log=lambda _: None)
    assert len(result.losses) == 2
