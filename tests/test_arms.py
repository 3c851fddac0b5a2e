"""The arms race (docs/PROTOCOL.md §10): the two-sided typicality detector TYP, the typical-set
term, and the stage arms_race.py on the tiny synthetic run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_detectors
import torch
from conftest import moved_aside
from test_hfc import ATTACK, pipeline  # noqa: F401 - the tiny run with its base attack, detectors and M = 2 mixtures

import aesets
import arms_race
import detectors
import evaluation
import features
import gmm
import gmm_attack
import hfc
import report
import typical_set
from features import FeatureSet
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]

CHANNELS = (3, 4)


# --------------------------------------------------------------------------- TYP
def test_typ_follows_the_estimator_contract(tmp_path, monkeypatch):
    """The parametrised contract of every detector (tests/test_detectors.py), for TYP."""
    test_detectors.test_detector_follows_the_estimator_contract("TYP", tmp_path, monkeypatch)


DIM = 32


def _gaussian_set(rng, n: int, shift: float = 0.0, labels=None) -> FeatureSet:
    """Two classes of DIM-dimensional Gaussian features (means 0 and 3), one layer; predicted = true."""
    labels = rng.integers(0, 2, n) if labels is None else np.asarray(labels)
    pooled = rng.normal(size=(n, DIM)) + 3.0 * labels[:, None] + shift
    logits = np.stack([1 - labels, labels], 1).astype(np.float32)
    return FeatureSet(images=torch.zeros(n, 3, 2, 2), logits=logits, pooled=[pooled.astype(np.float32)],
                      labels=labels.astype(np.int64))


@pytest.fixture(scope="module")
def typ_sets():
    rng = np.random.default_rng(0)
    train = _gaussian_set(rng, 600)
    benign, base_adv = _gaussian_set(rng, 200), _gaussian_set(rng, 100, shift=1.5)  # base AEs: atypical
    return train, benign, base_adv, _gaussian_set(rng, 400)


def test_typ_flags_both_tails(typ_sets, monkeypatch):
    """Fitted on benign vs atypical (base) AEs only, TYP still scores a feature at a mixture's mode
    (over-typical, HFC's hiding place) as more suspicious than a typical clean one, as well as a
    far out-of-distribution feature; the per-layer score is the signed atypicality."""
    monkeypatch.setattr(detectors, "LOGISTIC_CS", (0.1, 1.0, 10.0))
    train, benign, base_adv, clean = typ_sets
    typ = detectors.TYP(layers="all", num_components=1, kind="em", seed=0).fit(None, train, benign, base_adv)
    fit_rows, held_rows = typ.halves(train.labels)
    assert not set(fit_rows) & set(held_rows) and len(fit_rows) + len(held_rows) == len(train)
    assert typ.mixtures_[(0, 0)].n_samples == int((train.labels[fit_rows] == 0).sum())  # fitted on one half only

    clean_scores = typ.score(None, clean)
    typical = float(np.quantile(clean_scores, 0.9))
    labels = np.array([0, 1])
    modes = np.stack([typ.mixtures_[(0, c)].means[0] for c in labels])
    over_typical = FeatureSet(torch.zeros(2, 3, 2, 2), np.eye(2, dtype=np.float32)[labels],
                              [modes.astype(np.float32)], labels)
    far = _gaussian_set(np.random.default_rng(1), 2, shift=8.0, labels=labels)
    assert (typ.score(None, over_typical) > typical).all()
    assert (typ.score(None, far) > typical).all()
    # per layer: atypicality (m − ℓ)/s, about 0 on clean images, very negative at the mode, high far out
    atypical = typ.layer_scores(None, clean)[:, 0]
    assert abs(np.median(atypical)) < 0.5
    assert (typ.layer_scores(None, over_typical)[:, 0] < -3).all() and (typ.layer_scores(None, far)[:, 0] > 3).all()
    # Without the mirrored AEs the regression, which only sees the lower tail, learns a one-sided
    # score: the mode is then no more suspicious than a typical clean feature.
    one_sided = detectors.TYP(layers="all", num_components=1, kind="em", mirror=False).fit(None, train, benign,
                                                                                           base_adv)
    assert (one_sided.score(None, over_typical) < np.quantile(one_sided.score(None, clean), 0.9)).all()


def test_typ_refuses_a_training_set_too_small_to_split():
    rng = np.random.default_rng(0)
    train = _gaussian_set(rng, 5, labels=[0, 0, 0, 1, 1])
    with pytest.raises(detectors.UserError, match="at least 2"):
        detectors.TYP(layers="all", num_components=1).fit(None, train, _gaussian_set(rng, 4), _gaussian_set(rng, 4))


# --------------------------------------------------------------------------- the typical-set term
@pytest.fixture(scope="module")
def mixtures():
    rng = np.random.default_rng(3)
    labels = np.arange(80) % 2
    pooled = [rng.normal(size=(80, c)) + 2.0 * labels[:, None] for c in CHANNELS]
    return gmm.fit_mixtures(pooled, labels, [0, 1], 2, kind="em", seed=0, n_jobs=1, progress=False)


def _held_out(n=20, seed=4):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return [rng.normal(size=(n, c)) + 2.0 * labels[:, None] for c in CHANNELS], labels


def _points(seed=5, n=3):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(size=(n, c)) + 1.0, dtype=torch.float64, requires_grad=True) for c in CHANNELS]


def test_typical_set_log_likelihood_is_the_mixtures(mixtures):
    term = typical_set.TypicalSetTerm(mixtures, dtype=torch.float64)
    points = [p.detach() for p in _points(n=6)]
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    values = term.log_likelihoods(points, targets).numpy()
    for j, layer in enumerate(mixtures.layers):
        for c in (0, 1):
            rows = targets.numpy() == c
            np.testing.assert_allclose(values[rows, j], mixtures.log_likelihood(layer, c, points[layer].numpy()[rows]),
                                       rtol=1e-10)


@pytest.mark.parametrize("form", ["paper", "normalised", "normalised+hfc"])
def test_typical_set_gradient_matches_finite_differences(mixtures, form):
    hfc_term = hfc.HFCTerm(mixtures, dtype=torch.float64) if form.endswith("hfc") else None
    term = typical_set.TypicalSetTerm(mixtures, normalise=form != "paper", hfc_term=hfc_term, dtype=torch.float64)
    assert term.layers == [0, 1] and term.reduce == ("sum" if form == "paper" else "mean")
    term.fit_targets(*_held_out())
    targets = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda *f: term(None, list(f), targets), _points(), eps=1e-6, atol=1e-6)


def test_typical_set_term_vanishes_on_the_typical_shell(mixtures):
    """0 (value and gradient) where ℓ = τ; positive on both sides: at the mode and far out."""
    term = typical_set.TypicalSetTerm(mixtures, normalise=True, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fit_targets"):
        term(None, [p.detach() for p in _points()], torch.tensor([0, 1, 0]))
    pooled, labels = _held_out()
    tau, scales = term.fit_targets(pooled, labels)
    assert tau.shape == scales.shape == (2, 2) and (scales > 0).all()
    # held-out clean images score 1 per layer in the median (the normalised form's scale)
    values = term.layer_values([torch.tensor(p) for p in pooled], torch.as_tensor(labels)).numpy()
    for c in (0, 1):
        np.testing.assert_allclose(np.median(values[labels == c], axis=0), 1.0, rtol=1e-9)
    # τ set from single points: the term is exactly 0 there, with a zero gradient
    points = _points(n=2)
    targets = torch.tensor([1, 0])
    term.fit_targets([p.detach().numpy() for p in points], targets.numpy())
    value = term(None, points, targets)
    assert float(value.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(value, points))
    # at the target's mode (over-typical) and far out (atypical) the term is positive
    modes = [torch.tensor(np.stack([mixtures[(layer, int(t))].means[0] for t in targets])) for layer in (0, 1)]
    assert float(term(None, modes, targets)) > 0.0
    assert float(term(None, [p.detach() + 10.0 for p in points], targets)) > 0.0


# --------------------------------------------------------------------------- the stage
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--attack", ATTACK, "-y", "2",
          "--tune-images", "4", "--limit", "6"]
ARMS = COMMON + ["--fit-limit", "8", "--typ-components", "2"]
REQUIRED_ROUNDS = [("base", "fixed"), ("HFC", "fixed"), ("HFC", "typicality"), ("HFC", "refit"),
                   ("typical_set_HFC", "typicality"), ("typical_set_HFC", "refit")]


def test_arms_race_stage_on_the_tiny_run(pipeline, monkeypatch):  # noqa: F811
    monkeypatch.chdir(pipeline)
    # gmm_attack.py's HFC AEs of A_eval with the same settings: the stage reuses them.
    hfc_results = gmm_attack.main(COMMON + ["--lamda", "auto"])
    result = arms_race.main(ARMS)
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "arms_race"
    assert {"dataset", "arch", "attack", "epsilon_256", "step_size_256", "steps", "n_eval", "n_fit", "attackers",
            "defenders", "typ", "rounds", "record"} <= set(result)
    assert result["n_eval"] == 6 and result["n_fit"] == 8 and result["record"]["stage"] == "arms_race"
    pairs = [(r["attacker"], r["defender"]) for r in result["rounds"]]
    assert set(REQUIRED_ROUNDS) <= set(pairs) and pairs == list(arms_race.ROUNDS)
    for r in result["rounds"]:
        assert {"attacker", "defender", "success", "mean_auc", "detectors"} <= set(r)
        assert list(r["detectors"]) == ["KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN", "TYP"]
        assert 0.0 <= r["success"] <= 1.0
        present = {name for name, m in r["detectors"].items() if m is not None}
        expected = set(arms_race.SEVEN) if r["defender"] == "fixed" else set(arms_race.NAMES)
        assert present == expected, r
        for m in r["detectors"].values():
            assert m is None or (0.0 <= m["auc"] <= 1.0 and 0.0 <= m["tnr90"] <= 1.0)
        assert r["mean_auc"] == pytest.approx(np.mean([r["detectors"][n]["auc"] for n in present]))
        lo, hi = r["mean_auc_ci"]
        assert lo - 1e-9 <= r["mean_auc"] <= hi + 1e-9
    by_pair = {(r["attacker"], r["defender"]): r for r in result["rounds"]}
    # the HFC attacker on A_eval is gmm_attack.py's, and so are its scores under the fixed detectors
    hfc_info = result["attackers"]["HFC"]
    assert hfc_info["source"].endswith("hfc_M2_lamauto") and hfc_info["lamda"] == hfc_results["lamda"]
    assert by_pair[("HFC", "fixed")]["success"] == hfc_results["success"]["hfc"]
    # the same images, the same bootstrap draws: the round's interval is gmm_attack.py's
    assert by_pair[("HFC", "fixed")]["mean_auc_ci"] == pytest.approx(report.mean_auc(hfc_results, "hfc")[1])
    for name in arms_race.SEVEN:
        assert by_pair[("HFC", "fixed")]["detectors"][name]["auc"] == \
            pytest.approx(hfc_results["detectors"][name]["hfc"]["auc"])
        assert by_pair[("HFC", "typicality")]["detectors"][name] == by_pair[("HFC", "fixed")]["detectors"][name]
    # the typical-set attacker: λ chosen on A_fit, its A_eval and A_fit AEs saved (checked sets)
    ts = result["attackers"]["typical_set_HFC"]
    assert ts["lamda"] in [t["lamda"] for t in ts["lamda_trials"]] and "typical_log_likelihood" in ts
    base = aesets.load_ae_set(pipeline / "runs_synthetic" / "resnet18" / ATTACK)
    fit_pos, eval_pos = evaluation.fit_eval_split(len(base["index"]))
    for name, positions in (("typical_set_HFC_eval", eval_pos[:6]), ("typical_set_HFC_fit", fit_pos[:8]),
                            ("HFC_fit", fit_pos[:8])):
        ae = aesets.load_ae_set(folder / name)
        assert np.array_equal(ae["index"], base["index"][positions]), name
    assert not (folder / "HFC_eval").exists()  # reused from gmm_attack.py
    assert (folder / "TYP" / "TYP" / "mixtures" / "mixtures.npz").is_file()
    saved = json.loads((folder / "arms_race.json").read_text())
    assert saved["rounds"] == json.loads(json.dumps(result["rounds"]))
    assert (folder / "arms_race.png").stat().st_size > 0 and "typical_set_HFC" in (folder / "arms_race.md").read_text()
    print("\n" + (folder / "arms_race.md").read_text())
    print({a: {k: info.get(k) for k in ("lamda", "success_eval", "success_fit", "mixture_log_likelihood",
                                        "typical_log_likelihood")} for a, info in result["attackers"].items()})

    # A second call reuses every piece: no attack, no fit, no feature pass, no scoring.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished piece was recomputed")
    for owner, name in ((hfc, "hfc_attack"), (hfc, "choose_lambda"), (detectors.Detector, "fit"),
                        (evaluation, "score_table"), (features, "extract")):
        monkeypatch.setattr(owner, name, refuse)
    again = arms_race.main(ARMS)
    assert again["rounds"] == saved["rounds"] and again["attackers"] == saved["attackers"]


def test_arms_race_refuses_bad_input_in_one_line(pipeline, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(pipeline)
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "arms_race"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    # as a command: one line on stderr naming the stage to run first, exit code 2
    done = subprocess.run([sys.executable, str(ROOT / "arms_race.py"), *ARMS, "-y", "5"], cwd=pipeline,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "get_GMM.py" in done.stderr and "-y 5" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    for extra, message in ((["--fit-limit", "1"], "--fit-limit"), (["--attack", "Noise_Linf_2"], "noise set"),
                           (["--ts-term", "raw"], "--ts-term"), (["--kappa", "1"], "--kappa")):
        with pytest.raises(UserError, match=message):
            arms_race.main(ARMS + extra)
    fitted_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "detectors"
    with moved_aside(fitted_dir, tmp_path), pytest.raises(UserError, match="extract_features.py"):
        arms_race.main(ARMS)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    assert after == before
