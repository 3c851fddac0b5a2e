"""The HFC diagnosis stage (diagnose_hfc.py): its gradients are the term's, its blocking rule, its
outputs on a tiny synthetic run, and its refusals (one line, exit 2, nothing written)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import aesets
import attacks
import datasets
import diagnose_hfc
import evaluation
import extract_features
import features
import gen_base_adv
import get_GMM
import gmm
import gmm_attack
import hfc
import saver
import utils
from utils import UserError

ATTACK = "I_FGSM_Linf_4"
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--threads", "1"]
FAST_DETECTORS = ["--bu-passes", "5", "--lid-k", "5", "--lid-batch", "20", "--dnn-epochs", "2",
                  "--train-limit", "60", "-b", "16"]
HFC_KEY = "hfc_M2_lam1"


@pytest.fixture(scope="module")
def pipeline(tiny_run, tmp_path_factory):
    """tiny_run copied; the base attack, the detectors (for the noise set and gmm_attack.py), M = 2
    mixtures and an HFC set at λ = 1 on the first 10 images of A_eval."""
    root = tmp_path_factory.mktemp("diagnose")
    shutil.copytree(tiny_run, root / "runs_synthetic" / "resnet18")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        gen_base_adv.main(COMMON + ["--attack", ATTACK])
        extract_features.main(COMMON + ["--attack", ATTACK, *FAST_DETECTORS])
        get_GMM.main(COMMON + ["-y", "2", "--jobs", "1"])
        gmm_attack.main(COMMON + ["--attack", ATTACK, "-y", "2", "--lamda", "1", "--limit", "10"])
    finally:
        os.chdir(cwd)
    return root


def _model_and_term(root):
    run = root / "runs_synthetic" / "resnet18"
    model, _ = saver.load_model(run, "cpu")
    mixtures = gmm.load_mixtures(run / "gmm_M2")
    base = aesets.load_ae_set(run / ATTACK)
    return model, mixtures, base


def test_per_layer_gradients_add_up_to_the_terms_gradients(pipeline):
    model, mixtures, base = _model_and_term(pipeline)
    term = hfc.HFCTerm(mixtures)
    x = torch.from_numpy(base["adv"][:6])
    targets = torch.from_numpy(base["targets"][:6])
    geo = diagnose_hfc.geometry(model, term, x, targets, loss="ce", kappa=0.0,
                                scales=diagnose_hfc.scale_table(mixtures, term.layers), keep_grads=True)
    assert geo.values.shape == geo.cosine.shape == geo.ratio.shape == (6, len(term.layers))

    # Independently, autograd of the whole term as the attack computes it (batch mean, times B:
    # every image's own gradient): the paper's sum and the normalised mean over layers.
    def whole_gradient(extra):
        xg = x.clone().requires_grad_(True)
        logits, feats = model.forward_features(xg, layers=extra.layers)
        (g,) = torch.autograd.grad(extra(logits, feats, targets) * len(x), xg)
        return g.flatten(1).double()

    paper = whole_gradient(hfc.HFCTerm(mixtures))
    normalised = whole_gradient(hfc.HFCTerm(mixtures, normalise=True, reduce="mean"))
    assert paper.abs().max() > 0 and normalised.abs().max() > 0
    torch.testing.assert_close(geo.grads["paper"], paper, rtol=1e-4, atol=1e-6 * float(paper.abs().max()))
    torch.testing.assert_close(geo.grads["normalised"], normalised, rtol=1e-4,
                               atol=1e-6 * float(normalised.abs().max()))

    # One layer's cosine and ratio from a fresh pass, against the CE the attack minimises.
    j = len(term.layers) // 2
    xg = x.clone().requires_grad_(True)
    logits, feats = model.forward_features(xg, layers=term.layers)
    (g_cls,) = torch.autograd.grad(attacks.classification_loss(logits, targets) * len(x), xg, retain_graph=True)
    (g_j,) = torch.autograd.grad(term.layer_values(feats, targets)[:, j].sum(), xg)
    g_cls, g_j = g_cls.flatten(1).double(), g_j.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(g_j, g_cls, dim=1).numpy()
    np.testing.assert_allclose(geo.cosine[:, j], cosine, atol=1e-5)
    np.testing.assert_allclose(geo.ratio[:, j], (g_j.norm(dim=1) / g_cls.norm(dim=1)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(geo.grads["class"].double().numpy(), g_cls.numpy(), rtol=1e-5, atol=1e-9)
    # the values are the term's own, and every cosine is a cosine
    with torch.no_grad():
        _, feats = model.forward_features(x, layers=term.layers)
        np.testing.assert_allclose(geo.values, term.layer_values(feats, targets).double().numpy(), rtol=1e-6)
    assert np.all(np.abs(geo.cosine) <= 1) and np.all(geo.ratio >= 0)
    assert np.all(np.abs(geo.term_cosine["paper"]) <= 1) and np.all(np.abs(geo.term_cosine["normalised"]) <= 1)


def test_blocking_rule():
    cosine = np.array([-0.5, 0.3, -0.1, np.nan])
    ratio = np.array([4.0, 100.0, 0.5, 10.0])
    blocks, limit = diagnose_hfc.blocking(cosine, ratio, lamda=1.0)
    assert blocks.tolist() == [True, False, False, False]  # positive cosine or a small pull never blocks
    assert limit == pytest.approx(0.25)  # min over negative-cosine layers of 1/ratio
    assert diagnose_hfc.blocking(cosine, ratio, lamda=0.2499)[0].sum() == 0
    assert diagnose_hfc.blocking(cosine, ratio, lamda=2.01)[0].tolist() == [True, False, True, False]
    assert diagnose_hfc.blocking(np.array([0.2, np.nan]), np.array([9.0, 9.0]), 1.0)[1] is None


def test_diagnosis_of_a_tiny_run(pipeline, monkeypatch, capsys):
    monkeypatch.chdir(pipeline)
    out = diagnose_hfc.main(COMMON + ["--attack", ATTACK, "-y", "2", "--limit", "8", "--hfc", HFC_KEY, "-b", "5"])
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "diagnosis_M2"
    saved = json.loads((folder / "diagnosis.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(out["summary"]))
    assert (folder / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "diagnosis.md").read_text()
    assert "| layer1 |" in md and "| all |" in md and "| layer1.0.relu |" in md
    assert "HFC diagnosis of 8 A_eval images" in capsys.readouterr().out

    # the images: the first 8 of A_eval, the HFC set's as well
    base = aesets.load_ae_set(folder.parent)
    _, eval_pos = evaluation.fit_eval_split(len(base["index"]))
    assert saved["n_images"] == 8 and saved["index"] == base["index"][eval_pos[:8]].tolist()
    assert saved["hfc_set"] == HFC_KEY and saved["hfc"]["lamda"] == 1.0 and saved["points"] == ["clean", "base", "hfc"]
    rec = saved["record"]
    assert rec["stage"] == "diagnosis" and set(rec["inputs"]) == {"checkpoint", "attack_set", "mixtures", "hfc_set"}
    assert set(rec["outputs"]) == {"diagnosis.md", "diagnosis.png"} and rec["settings"]["limit"] == 8

    mixtures = gmm.load_mixtures(pipeline / "runs_synthetic" / "resnet18" / "gmm_M2")
    model, _ = saver.load_model(pipeline / "runs_synthetic" / "resnet18")
    assert [r["layer"] for r in saved["layers"]] == mixtures.layers and saved["n_layers"] == len(mixtures.layers)
    targets = base["targets"][eval_pos[:8]]
    for row in saved["layers"]:
        assert set(row) >= {"layer", "name", "stage", "channels", "median_term", "cosine", "ratio", "blocks",
                            "block_fraction"}
        assert set(row["median_term"]) == set(diagnose_hfc.TERM_ROWS)
        assert all(v is not None and v >= 0 for v in row["median_term"].values())
        held = np.median([mixtures.scales[(row["layer"], int(t))] for t in targets])
        assert row["median_term"]["heldout_scale"] == pytest.approx(held)
        for p in saved["points"]:
            cos, ratio = row["cosine"][p], row["ratio"][p]
            assert -1 <= cos <= 1 and ratio >= 0 and 0 <= row["block_fraction"][p] <= 1
            assert row["blocks"][p] == (cos < 0 and saved["lamda"] * ratio > 1)
    # z²: each layer's median of the mean squared per-channel z-score, recomputed here from the
    # training features for the base AEs under their target class
    train_images, train_labels = datasets.load_part(pipeline / "runs_synthetic" / "resnet18", "train")
    train = features.extract(model, train_images, "cpu", progress=False)
    adv = features.extract(model, torch.from_numpy(base["adv"][eval_pos[:8]]), "cpu", progress=False)
    for row in saved["layers"]:
        assert set(row["z2"]) == set(diagnose_hfc.DISTANCE_ROWS) and all(v >= 0 for v in row["z2"].values())
        X, y = train.pooled[row["layer"]].astype(np.float64), train_labels.numpy()
        values = []
        for i, t in enumerate(targets):
            Xt = X[y == t]
            variance = Xt.var(0)
            std = np.sqrt(np.maximum(variance, gmm.CHANNEL_VARIANCE_FLOOR * variance.mean()) + 1e-24)
            values.append(np.mean(((adv.pooled[row["layer"]][i] - Xt.mean(0)) / std) ** 2))
        assert row["z2"]["base_target"] == pytest.approx(np.median(values), rel=1e-5)
        # knn: the mean Euclidean distance to the nearest training features of the target class
        assert set(row["knn"]) == set(diagnose_hfc.DISTANCE_ROWS) and all(v > 0 for v in row["knn"].values())
        k = diagnose_hfc.KNN_NEIGHBOURS
        nearest = [np.sort(np.linalg.norm(X[y == t] - adv.pooled[row["layer"]][i].astype(np.float64), axis=1))[:k].mean()
                   for i, t in enumerate(targets)]
        assert row["knn"]["base_target"] == pytest.approx(np.median(nearest), rel=1e-4)
    assert "z² base_target" in md and "knn base_target" in md
    summary = saved["summary"]
    assert set(summary) == {"sum_median_term", "blocking_layers", "lamda_no_block", "term_cosine", "term_ratio",
                            "zero_class_gradient"}
    for p in saved["points"]:
        names = [r["name"] for r in saved["layers"] if r["blocks"][p]]
        assert summary["blocking_layers"][p] == names
        negative = [1 / r["ratio"][p] for r in saved["layers"] if r["cosine"][p] < 0]
        assert summary["lamda_no_block"][p] == (pytest.approx(min(negative)) if negative else None)
        for form in diagnose_hfc.FORMS:
            assert -1 <= summary["term_cosine"][form][p] <= 1
    sums = summary["sum_median_term"]
    assert sums["clean_own"] == pytest.approx(sum(r["median_term"]["clean_own"] for r in saved["layers"]))
    # The base AEs' features are outliers of the target class (the reason detectors see them);
    # the clean images sit in their own class's mixtures, and HFC pulls the AEs back in.
    assert sums["clean_own"] < sums["base_target"] and sums["hfc_target"] < sums["base_target"]

    # the budget's first-order reach at the same clean images, as attacks.first_order_reach gives it
    margins, reach = attacks.first_order_reach(model, torch.from_numpy(base["clean"][eval_pos[:8]]), targets,
                                               attacks.parse_attack(ATTACK).eps)
    ratio = reach / margins
    assert np.all(margins > 0)  # the clean images are classified as their own class, not the target
    assert saved["reach"] == pytest.approx({"margin_median": np.median(margins), "reach_median": np.median(reach),
                                            "ratio_median": np.median(ratio), "ratio_q10": np.quantile(ratio, 0.1),
                                            "below_one": int((ratio < 1).sum())})
    assert "first-order reach" in md


def test_diagnosis_of_a_fit_images(pipeline, monkeypatch, capsys):
    """--images fit: the first images of A_fit, in their own folder; A_eval's diagnosis is kept."""
    monkeypatch.chdir(pipeline)
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    before = {p.name: p.read_bytes() for p in (attack_dir / "diagnosis_M2").glob("*")} \
        if (attack_dir / "diagnosis_M2").is_dir() else {}
    diagnose_hfc.main(COMMON + ["--attack", ATTACK, "-y", "2", "--limit", "4", "--images", "fit", "-b", "4"])
    saved = json.loads((attack_dir / "diagnosis_M2_imgfit" / "diagnosis.json").read_text())
    base = aesets.load_ae_set(attack_dir)
    fit_pos, _ = evaluation.fit_eval_split(len(base["index"]))
    assert saved["images_of"] == "A_fit" and saved["index"] == base["index"][fit_pos[:4]].tolist()
    assert "HFC diagnosis of 4 A_fit images" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (attack_dir / "diagnosis_M2").glob("*")} == before
    shutil.rmtree(attack_dir / "diagnosis_M2_imgfit")  # the module's pipeline is shared with the refusal test


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_zero_classification_gradient_is_reported_not_divided_by(pipeline, monkeypatch):
    """With the clamped margin (κ = 0) a base AE that hits its target has no classification
    gradient: no cosine, an infinite ratio; the JSON stays standard (null) and counts them."""
    monkeypatch.chdir(pipeline)
    out = diagnose_hfc.main(COMMON + ["--attack", ATTACK, "-y", "2", "--limit", "4", "--class-loss", "margin"])
    saved = _strict_json(pipeline / "runs_synthetic" / "resnet18" / ATTACK / "diagnosis_M2" / "diagnosis.json")
    assert saved["points"] == ["clean", "base"] and saved["hfc_set"] is None and saved["loss"] == "cw"
    assert saved["kappa"] == 0.0 and out["summary"]["sum_median_term"]["hfc_target"] is None
    assert saved["summary"]["zero_class_gradient"]["base"] == round(4 * saved["success"]["base"]) == 4
    assert saved["summary"]["zero_class_gradient"]["clean"] == 0  # a clean image is not yet the target
    assert all(r["cosine"]["base"] is None and r["ratio"]["base"] is None for r in saved["layers"])
    assert all(-1 <= r["cosine"]["clean"] <= 1 for r in saved["layers"])
    assert saved["summary"]["term_cosine"]["paper"]["base"] is None


def test_refusals_are_one_line_exit_2_and_write_nothing(pipeline, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(pipeline)
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    shutil.rmtree(attack_dir / "diagnosis_M2", ignore_errors=True)
    cases = [(["-y", "5"], "get_GMM.py -a resnet18 --dataset synthetic -y 5 first"),
             (["-y", "2", "--hfc", "hfc_M2_lam7"], "gmm_attack.py"),
             (["-y", "2", "--hfc", HFC_KEY, "--limit", "12"], "holds 10 of the first 12 images"),
             (["-y", "2", "--attack", "PGD_Linf_4"], "gen_base_adv.py -a resnet18 --dataset synthetic --attack PGD_Linf_4"),
             (["-y", "2", "--kappa", "1"], "--kappa")]
    for flags, message in cases:
        argv = COMMON + ["--attack", ATTACK] + flags
        with pytest.raises(SystemExit) as exit_info:
            utils.run_cli(lambda: diagnose_hfc.main(argv))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, flags
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flags, err)
    assert not list(attack_dir.glob("diagnosis*")) and not list(attack_dir.glob(".diagnosis*"))
    assert not list((pipeline / "runs_synthetic" / "resnet18").glob("*/diagnosis*"))
    # no run at all: the hint names train.py
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="train.py"):
        diagnose_hfc.main(COMMON)
    assert not (tmp_path / "runs_synthetic").exists() or not list((tmp_path / "runs_synthetic").rglob("diagnosis*"))
