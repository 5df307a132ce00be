"""Training rows from tables: Parquet files and Hugging Face ``datasets`` folders (``save_to_disk``).

Both carry the column conventions of the JSON Lines formats (:mod:`mgh_train.data`): MGH
(``query, positive, negatives`` with ``{text, level}`` structs), sentence-transformers n-tuples
(``anchor, positive, negative_1..n``), FlagEmbedding (``query, pos, neg``) and tevatron. A table
has every column in every row, so a null cell counts as a missing field (an n-tuple row with a
null ``negative_3`` has two negatives). Rows are numbered from 0, as ``dataset[i]`` counts them.

Reading needs ``pyarrow`` (Parquet) or ``datasets`` (folders): ``pip install mgh[data]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

PARQUET_SUFFIXES = (".parquet", ".pq")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_table(path) -> bool:
    """Whether ``path`` is a Parquet file or a ``save_to_disk`` folder (else: JSON Lines)."""
    path = Path(path)
    if path.is_dir():
        return any((path / marker).is_file() for marker in _DATASET_MARKERS)
    return path.suffix.lower() in PARQUET_SUFFIXES


def _need(module: str, what: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"{path}: reading {what} needs the {module.split('.')[0]} package (pip install mgh[data])"
        ) from None


def _clean(row: dict) -> dict:
    return {key: value for key, value in row.items() if value is not None}


def _parquet_rows(path: Path) -> Iterator[dict]:
    parquet = _need("pyarrow.parquet", "Parquet", path)
    try:
        table = parquet.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own ArrowInvalid / OSError kinds
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    for batch in table.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _dataset(path: Path):
    datasets = _need("datasets", "a Hugging Face datasets folder", path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - datasets raises several kinds for a folder it cannot read
        raise ValueError(f"{path}: not a readable datasets folder ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        # no silent fallback to another split (a lone 'test' split would be trained on): name it
        first = next(iter(loaded), None)
        raise ValueError(
            f"{path}: a DatasetDict without a 'train' split (splits found: "
            f"{', '.join(loaded) or 'none'}); to train on another split pass its folder"
            + (f", e.g. --data {path / first}" if first is not None else "")
        )
    return loaded


def _dataset_rows(path: Path) -> Iterator[dict]:
    dataset = _dataset(path)
    for start in range(0, len(dataset), 1024):
        batch = dataset[start : start + 1024]  # columns -> lists
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def table_rows(path) -> Iterator[dict]:
    """The rows of a table as dicts, in order, null cells dropped; ValueError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such data file or folder")
    rows = _dataset_rows(path) if path.is_dir() else _parquet_rows(path)
    for row in rows:
        yield _clean(row)


__all__ = ["PARQUET_SUFFIXES", "is_table", "table_rows"]
