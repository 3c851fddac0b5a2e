"""The competing adaptive attacks (adaptive.py) and the comparison stage (compare.py).

Each term: its gradient against finite differences (float64, tiny shapes), its value against the
detector it is built from, and where it is 0 or minimal; the normalised form; then compare.py on
the tiny synthetic run: the schema, reuse of rows, and the one-line errors.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import moved_aside
from test_hfc import ATTACK, pipeline  # noqa: F401 - the tiny run with its base attack, detectors and M = 2 mixtures

import adaptive
import aesets
import compare
import detectors
import gmm_attack
import hfc
import network
from features import FeatureSet
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = (3, 4)  # two tiny layers


def _feature_set(n: int, seed: int, shift: float = 0.0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    pooled = [(rng.normal(size=(n, c)) + 2.0 * labels[:, None] + shift).astype(np.float32) for c in CHANNELS]
    logits = np.stack([-labels, labels], 1).astype(np.float32)
    return FeatureSet(images=torch.zeros(n, 3, 2, 2), logits=logits, pooled=pooled, labels=labels)


@pytest.fixture(scope="module")
def fitted():
    """KD, LID and MAHA fitted on random two-class features (no model: generic layer names)."""
    train, benign, adv = _feature_set(40, 0), _feature_set(16, 1), _feature_set(16, 2, shift=3.0)
    kd = detectors.KD(bandwidth=1.5, layers="all", score_layer=-1).fit(None, train)
    lid = detectors.LID(k=4, reference_size=12, layers="all").fit(None, train, benign, adv)
    maha = detectors.MAHA(magnitude=0.0, layers="all").fit(None, train, benign, adv)
    return {"train": train, "KD": kd, "LID": lid, "MAHA": maha}


def _terms(fitted, **kwargs) -> dict[str, adaptive.AdaptiveTerm]:
    train = fitted["train"]
    return {"random_guide": adaptive.RandomGuide(train.pooled, train.labels, [0, 1], **kwargs),
            "KD": adaptive.KDConstrained(fitted["KD"], **kwargs),
            "LID": adaptive.LIDConstrained(fitted["LID"], **kwargs),
            "MAHA": adaptive.MAHAConstrained(fitted["MAHA"], **kwargs)}


def _points(seed: int = 5, n: int = 3) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(size=(n, c)) + 1.0, dtype=torch.float64, requires_grad=True) for c in CHANNELS]


@pytest.mark.parametrize("name", ["random_guide", "KD", "LID", "MAHA"])
@pytest.mark.parametrize("normalise", [False, True])
def test_gradient_matches_finite_differences(fitted, name, normalise):
    term = _terms(fitted, dtype=torch.float64, normalise=normalise)[name]
    targets = torch.tensor([0, 1, 0])
    guides = term.draw(targets.numpy(), seed=0) if term.per_image else None
    if normalise:
        held_out = _feature_set(20, 7)
        bound = term.guiding(term.draw(held_out.labels, 1), held_out.labels) if term.per_image else None
        if bound:
            with bound:
                term.fit_scales(held_out.pooled, held_out.labels)
        else:
            term.fit_scales(held_out.pooled, held_out.labels)
    points = _points()
    call = lambda *f: term(None, list(f), targets)
    if term.per_image:
        with term.guiding(guides, targets.numpy()):
            assert torch.autograd.gradcheck(call, points, eps=1e-6, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(call, points, eps=1e-6, atol=1e-6)


def test_terms_equal_the_detectors_statistics(fitted):
    """KD = the KD score under the target class, LID = detectors.lid_mle, MAHA = ½ d² to the
    target's mean: each term is its detector's own statistic, made differentiable."""
    terms = _terms(fitted, dtype=torch.float64)
    points = [p.detach() for p in _points(n=6)]
    targets = torch.tensor([0, 1, 1, 0, 1, 0])
    kd, lid, maha = fitted["KD"], fitted["LID"], fitted["MAHA"]
    values = terms["KD"].layer_values(points, targets).numpy()
    layer = kd.score_layer_
    assert terms["KD"].layers == [layer]
    for c in (0, 1):
        rows = targets.numpy() == c
        expected = -detectors.gaussian_kde_log_density(points[layer].numpy()[rows],
                                                       kd.train_features_[layer][kd.train_labels_ == c], kd.bandwidth)
        np.testing.assert_allclose(values[rows, 0], expected, rtol=1e-6)
    values = terms["LID"].layer_values(points, targets).numpy()
    for j, layer in enumerate(lid.layers_):
        np.testing.assert_allclose(values[:, j], detectors.lid_mle(points[layer].numpy(), lid.reference_[layer], lid.k),
                                   rtol=1e-5)
    values = terms["MAHA"].layer_values(points, targets).numpy()
    for j, layer in enumerate(maha.layers_):
        full = detectors.half_mahalanobis(points[layer].numpy(), maha.means_[layer], maha.precisions_[layer])
        np.testing.assert_allclose(values[:, j], full[np.arange(6), targets.numpy()], rtol=1e-5)


def test_terms_vanish_or_are_minimal_where_they_should(fitted):
    terms = _terms(fitted, dtype=torch.float64)
    train = fitted["train"]
    targets = torch.tensor([1, 0])
    # random guide: 0 exactly at the guides' features, positive elsewhere
    guide = terms["random_guide"]
    rows = guide.draw(targets.numpy(), seed=3)
    assert (guide.pool_labels[rows] == targets.numpy()).all()
    at_guides = [torch.tensor(p[rows], dtype=torch.float64) for p in train.pooled]
    with guide.guiding(rows, targets.numpy()):
        assert float(guide(None, at_guides, targets)) == 0.0
        assert float(guide(None, [f + 0.1 for f in at_guides], targets)) > 0.0
    # MAHA: 0 at the target class's mean
    maha = terms["MAHA"]
    at_means = [torch.tensor(fitted["MAHA"].means_[layer][targets.numpy()], dtype=torch.float64)
                for layer in fitted["MAHA"].layers_]
    assert float(maha(None, at_means, targets)) == pytest.approx(0.0, abs=1e-12)
    # KD: its x-dependent part is ≥ 0, and a training sample of the target class scores lower
    # than the same point moved away from the class
    kd = terms["KD"]
    layer = fitted["KD"].score_layer_
    sample = torch.tensor(train.pooled[layer][train.labels == 1][:1], dtype=torch.float64)
    feats = [None] * len(CHANNELS)
    feats[layer] = sample
    near = kd.layer_values(feats, torch.tensor([1]))
    feats[layer] = sample + 5.0
    far = kd.layer_values(feats, torch.tensor([1]))
    assert float(near - kd.offsets) >= 0.0 and float(near) < float(far)
    # LID: a step against its gradient lowers the estimate
    lid = terms["LID"]
    points = _points(seed=11, n=4)
    value = lid(None, points, torch.zeros(4, dtype=torch.long))
    grads = torch.autograd.grad(value, points)
    stepped = [(p - 1e-3 * g / g.norm()).detach() for p, g in zip(points, grads)]
    assert float(lid(None, stepped, torch.zeros(4, dtype=torch.long))) < float(value.detach())


def test_normalised_terms_score_held_out_clean_images_about_one(fitted):
    held_out = _feature_set(30, 9)
    labels = held_out.labels
    for name, term in _terms(fitted, dtype=torch.float64, normalise=True).items():
        assert term.reduce == "mean"
        feats = [torch.tensor(p, dtype=torch.float64) for p in held_out.pooled]
        targets = torch.as_tensor(labels)
        bind = term.guiding(term.draw(labels, 1), labels) if term.per_image else None
        with bind if bind else torch.no_grad():
            scales = term.fit_scales(held_out.pooled, labels)
            normalised = ((term.layer_values(feats, targets) - term.offsets) / term.scales[targets]).numpy()
        assert scales.shape == (2, len(term.layers)) and (scales > 0).all(), name
        for c in (0, 1):
            np.testing.assert_allclose(np.median(normalised[labels == c], axis=0), 1.0, rtol=1e-9, err_msg=name)
    with pytest.raises(RuntimeError, match="fit_scales"):
        adaptive.MAHAConstrained(fitted["MAHA"], normalise=True)(None, [torch.zeros(1, c) for c in CHANNELS],
                                                                 torch.tensor([0]))


def test_random_guide_refuses_calls_it_is_not_bound_for(fitted):
    train = fitted["train"]
    guide = adaptive.RandomGuide(train.pooled, train.labels, [1])
    feats = [torch.zeros(2, c) for c in CHANNELS]
    with pytest.raises(RuntimeError, match="guides"):
        guide(None, feats, torch.tensor([0, 1]))
    with guide.guiding(guide.draw(np.array([0, 1]), 0), np.array([0, 1])):
        with pytest.raises(RuntimeError, match="bound"):
            guide(None, feats, torch.tensor([1, 0]))  # another order: another batch
    with pytest.raises(ValueError, match="target class"):
        with guide.guiding(guide.draw(np.array([0, 1]), 0), np.array([1, 0])):
            pass
    with pytest.raises(UserError, match="no training features"):
        adaptive.KDConstrained(fitted["KD"], layers=[0, 5])


# --------------------------------------------------------------------------- the stage
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--attack", ATTACK, "-y", "2",
          "--tune-images", "4", "--limit", "6"]


def test_compare_stage_on_the_tiny_run(pipeline, monkeypatch):  # noqa: F811
    monkeypatch.chdir(pipeline)
    # The HFC row of the same settings, made by gmm_attack.py first: compare.py reuses it.
    hfc_results = gmm_attack.main(COMMON + ["--lamda", "auto"])
    result = compare.main(COMMON)
    assert {"dataset", "arch", "attack", "epsilon_256", "step_size_256", "steps", "n_eval", "rows"} <= set(result)
    assert result["attack"] == ATTACK and result["epsilon_256"] == 4.0 and result["n_eval"] == 6
    assert (result["step_size_256"], result["steps"]) == hfc.hfc_schedule("synthetic", "resnet18", 4.0)
    assert list(result["rows"]) == list(compare.DEFAULT_ROWS)
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "compare"
    base_index = None
    for name, row in result["rows"].items():
        assert {"success", "seconds_per_image", "lamda", "mean_auc", "detectors"} <= set(row), name
        assert 0.0 <= row["success"] <= 1.0
        assert row["lamda"] is None if name in compare.OPGD_ROWS else row["lamda"] >= 0.0, name  # OPGD: no λ
        if row["detectors"] is not None:
            assert list(row["detectors"]) == ["KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"]
            aucs = [m["auc"] for m in row["detectors"].values()]
            assert all(0.0 <= m["auc"] <= 1.0 and 0.0 <= m["tnr90"] <= 1.0 for m in row["detectors"].values())
            assert row["mean_auc"] == pytest.approx(np.mean(aucs))
            for m in row["detectors"].values():  # intervals by image (evaluation.score_table)
                assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
                assert m["tnr90_ci"][0] <= m["tnr90"] <= m["tnr90_ci"][1]
            assert row["mean_auc_ci"][0] <= row["mean_auc"] <= row["mean_auc_ci"][1], name
        assert row["success_ci"][0] <= row["success"] <= row["success_ci"][1], name
        ae = aesets.load_ae_set(folder / name)  # checked: L∞ ≤ ε, range, shapes
        base_index = ae["index"] if base_index is None else base_index
        assert np.array_equal(ae["index"], base_index) and len(ae["index"]) == 6
    rows = result["rows"]
    assert rows["base_same_schedule"]["lamda"] == 0.0 and rows["base"]["lamda"] == 0.0
    for name in [r for r in compare.TERM_ROWS if r in compare.DEFAULT_ROWS]:
        assert rows[name]["lamda"] in [t["lamda"] for t in rows[name]["lamda_trials"]], name  # chosen on A_fit
    # the HFC row is gmm_attack.py's, reused
    assert rows["HFC"]["source"].endswith("hfc_M2_lamauto") and rows["HFC"]["lamda"] == hfc_results["lamda"]
    assert rows["HFC"]["success"] == hfc_results["success"]["hfc"]
    for name, per in rows["HFC"]["detectors"].items():
        assert per["auc"] == hfc_results["detectors"][name]["hfc"]["auc"]
        assert per["auc_ci"] == hfc_results["detectors"][name]["hfc"]["auc_ci"]
    # the same seeded draws of the same images: the reused row's intervals are gmm_attack.py's
    assert rows["HFC"]["success_ci"] == hfc_results["success_ci"]["hfc"]
    assert rows["HFC"]["mean_auc_ci"] == hfc_results["mean_auc_ci"]["hfc"]
    for name in ("KD", "MAHA"):  # the base row: gmm_attack's base row of the same images (one scoring path)
        assert rows["base"]["detectors"][name]["auc"] == pytest.approx(hfc_results["detectors"][name]["base"]["auc"])
    print("\n" + (folder / "compare.md").read_text())
    saved = json.loads((folder / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and saved["record"]["stage"] == "compare"
    assert (folder / "compare.png").stat().st_size > 0 and "| HFC |" in (folder / "compare.md").read_text()

    # A second call reuses every row: no attack and no scoring runs, the numbers are the same.
    def refuse(*args, **kwargs):
        raise AssertionError("a reused row was recomputed")
    monkeypatch.setattr(hfc, "hfc_attack", refuse)
    monkeypatch.setattr(compare.evaluation, "score_table", refuse)
    again = compare.main(COMMON)
    assert again["rows"] == saved["rows"]
    monkeypatch.undo()
    monkeypatch.chdir(pipeline)

    # Other settings (a given λ, the normalised terms, batches of 4): HFC has no matching
    # gmm_attack.py folder, so it is computed here by the same functions, and gives what
    # gmm_attack.py gives; the random guide is attacked batch by batch with its guides bound.
    settings = ["--lamda", "0.01", "-b", "4", "--term", "normalised"]
    other = compare.main(COMMON + settings + ["--rows", "HFC,random_guide,base,KD_constrained_stages"])
    assert list(other["rows"]) == ["base", "HFC", "random_guide", "KD_constrained_stages"]
    # the KD term on the stage ends: the stage-end taps, nothing else (KD's score layer is the last,
    # here a copy of the last stage end's pooled map, so adding it would count that stage twice)
    model = network.build_model("resnet18", num_classes=2)
    assert len(model.layer_names) - 1 in model.pooled_copy_layers
    stage_names = [model.layer_names[i] for i in model.stage_end_layers]
    assert other["rows"]["KD_constrained_stages"]["layers"] == stage_names
    assert 0.0 <= other["rows"]["KD_constrained_stages"]["success"] <= 1.0
    assert other["rows"]["HFC"]["source"] == "computed" and other["rows"]["HFC"]["lamda"] == 0.01
    assert other["rows"]["random_guide"]["lamda"] == 0.01 and other["rows"]["base"] == saved["rows"]["base"]
    same = gmm_attack.main(COMMON + settings)
    assert other["rows"]["HFC"]["success"] == same["success"]["hfc"]
    for name, per in other["rows"]["HFC"]["detectors"].items():
        assert per == {key: same["detectors"][name]["hfc"][key] for key in ("auc", "tnr90", "auc_ci", "tnr90_ci")}
    assert other["rows"]["HFC"]["success_ci"] == same["success_ci"]["hfc"]


def test_compare_errors_are_one_line_and_overwrite_nothing(pipeline, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(pipeline)
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "compare"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    result = subprocess.run([sys.executable, str(ROOT / "compare.py"), *COMMON, "--rows", "base,PGD_guide"],
                            cwd=pipeline, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "PGD_guide" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="get_GMM.py"):
        compare.main(COMMON[:-6] + ["-y", "5", "--rows", "base,HFC"])
    fitted_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "detectors"
    with moved_aside(fitted_dir, tmp_path), pytest.raises(UserError, match="extract_features.py"):
        compare.main(COMMON)
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    assert after == before
