"""The HFC stage: schedule, λ choice, λ = 0 equals the base attack, the term pulls features into the
mixtures, and the whole pipeline end to end on a tiny synthetic run (gmm_attack, eval, reproduce)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aesets
import attacks
import detectors
import eval as eval_script
import evaluation
import exemplar
import extract_features
import features
import gen_base_adv
import get_GMM
import gmm
import gmm_attack
import hfc
import report
import reproduce
from conftest import TINY_TRAIN
import runs
import saver
import typical_set
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
ATTACK = "I_FGSM_Linf_4"
FAST_DETECTORS = ["--bu-passes", "5", "--lid-k", "5", "--lid-batch", "20", "--dnn-epochs", "2",
                  "--train-limit", "60", "--device", "cpu", "-b", "16"]


@pytest.fixture(scope="module")
def pipeline(tiny_run, tmp_path_factory):
    """tiny_run copied, then the base attack, the detectors and M = 2 mixtures (module-scoped)."""
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(tiny_run, root / "runs_synthetic" / "resnet18")
    shutil.copytree(tiny_run.parents[1] / ".cache", root / ".cache", dirs_exist_ok=True) \
        if (tiny_run.parents[1] / ".cache").is_dir() else None
    import os
    cwd = os.getcwd()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu"]
        gen_base_adv.main(common + ["--attack", ATTACK])
        extract_features.main(["-a", "resnet18", "--attack", ATTACK, *FAST_DETECTORS])
        get_GMM.main(common + ["-y", "2"])
    finally:
        os.chdir(cwd)
    return root


def test_schedule_follows_the_paper():
    assert hfc.hfc_schedule("APTOS", "resnet50", 1.0) == (0.025, 80)
    assert hfc.hfc_schedule("CXR", "resnet50", 2.0) == (0.01, 400)
    assert hfc.hfc_schedule("CXR", "vgg16", 1.0) == (0.04, 50)
    assert hfc.hfc_schedule("synthetic", "resnet18", 4.0) == (pytest.approx(0.4), 20)
    assert hfc.hfc_schedule("APTOS", "resnet50", 1.0, step_size_256=0.1, steps=7) == (0.1, 7)
    with pytest.raises(UserError):
        hfc.hfc_schedule("APTOS", "resnet50", 1.0, step_size_256=0)


def test_choose_lambda_takes_the_largest_that_succeeds(monkeypatch):
    # success ≥ 95% exactly when λ ≤ 0.002: decades 1, 0.1, 0.01 fail, 0.001 succeeds, midpoint √(0.01·0.001) fails
    def fake_attack(model, term, images, targets, spec, *, lam, **kwargs):
        return images, torch.full((len(images),), lam <= 0.002)
    monkeypatch.setattr(hfc, "hfc_attack", fake_attack)
    lam, trials, rule = hfc.choose_lambda(None, None, torch.zeros(4, 3, 2, 2), np.zeros(4), None,
                                          grid=[1, 0.1, 0.01, 0.001, 1e-4], min_success=0.95)
    assert lam == 0.001 and "0.95" in rule
    # the largest λ first, then bisection of the rest of the grid (0.01 fails, 0.001 passes) and the
    # midpoint above the chosen value; the base attack (λ = 0) is not run, since a λ reached 95%
    assert [t["lamda"] for t in trials] == [1, 0.01, 0.001, pytest.approx(np.sqrt(1e-5))]
    # a failing λ is settled by its first image; a passing one attacks all four
    assert [(t["images"], t["fit_success"]) for t in trials] == [(1, None), (1, None), (4, 1), (1, None)]
    # when the midpoint succeeds it is taken
    monkeypatch.setattr(hfc, "hfc_attack", lambda *a, lam, **k: (a[2], torch.full((len(a[2]),), lam <= 0.005)))
    lam, _, _ = hfc.choose_lambda(None, None, torch.zeros(4, 3, 2, 2), np.zeros(4), None,
                                  grid=[0.01, 0.001], min_success=0.95)
    assert lam == pytest.approx(np.sqrt(1e-5))


def _indexed_images(n: int) -> torch.Tensor:
    """n tiny images whose first pixel is their index, so that a fake attack knows which it got."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def _attack_hitting(rates, calls=None):
    """A fake hfc_attack under which, at λ, exactly the first round(rates(λ)·n) images hit."""
    def fake_attack(model, term, images, targets, spec, *, lam, **kwargs):
        index = images[:, 0, 0, 0].long()
        if calls is not None:
            calls.append((lam, index.tolist(), kwargs.get("stop_when_all_hit")))
        return images, index < int(round(rates(lam) * N_TUNE))
    return fake_attack


N_TUNE = 10


def test_choose_lambda_bar_is_the_base_attacks_own_success(monkeypatch):
    # The base attack (λ = 0) hits 8 of 10 images: the bar is 0.8, not 0.95, so the largest λ that
    # does as well as the base attack is taken; when none does, the best success.
    images = _indexed_images(N_TUNE)
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: 0.8 if lam <= 0.01 else 0.3))
    lam, trials, rule = hfc.choose_lambda(None, None, images, np.zeros(N_TUNE), None, grid=[1, 0.1, 0.01, 0.001],
                                          min_success=0.95)
    # no λ reaches 95%, so the base attack runs (in full: its success sets the bar) and the search is repeated
    assert lam == 0.01 and "0.800" in rule
    assert [t["fit_success"] for t in trials if t["lamda"] == 0] == [pytest.approx(0.8)]
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: {0: 0.9, 1: 0.5}.get(lam, 0.7)))
    lam, trials, rule = hfc.choose_lambda(None, None, images, np.zeros(N_TUNE), None, grid=[1, 0.1, 0.01],
                                          min_success=0.95)
    assert lam == 0.1 and "best" in rule  # the best success, the larger λ of a tie
    assert {t["lamda"]: t["fit_success"] for t in trials if t["lamda"] > 0} == {1: 0.5, 0.1: 0.7, 0.01: 0.7}


def test_when_no_lambda_reaches_a_bar_the_base_attack_reaches_its_trial_is_not_completed(monkeypatch):
    # bar 0.5: the base attack (all hit) reaches it after 8 of the 10 images; every λ hits 3 of 10,
    # so the best λ is taken, and the base trial is not run on to the end to state the bar
    images = _indexed_images(N_TUNE)
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: 1.0 if lam == 0 else 0.3))
    lam, trials, rule = hfc.choose_lambda(None, None, images, np.zeros(N_TUNE), None, grid=[1, 0.1],
                                          min_success=0.5, refine=False)
    assert lam == 1 and "no λ reached 0.500" in rule
    base = [t for t in trials if t["lamda"] == 0]
    assert len(base) == 1 and base[0]["images"] < N_TUNE and base[0]["hits"] >= 5


def test_a_trial_stops_once_its_verdict_is_certain(monkeypatch):
    # 10 images in chunks of 4, bar 0.95 (all 10 must hit): λ = 1 (3 hits) fails on its first chunk,
    # λ = 0.1 (all hit) needs all 10. Each record bounds the full success, and the verdicts are
    # those of the full rates.
    calls = []
    images = _indexed_images(N_TUNE)
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: 0.3 if lam >= 1 else 1.0, calls))
    lam, trials, _ = hfc.choose_lambda(None, None, images, np.zeros(N_TUNE), None, grid=[1, 0.1],
                                       min_success=0.95, refine=False, chunk=4)
    assert lam == 0.1
    assert [(c[0], c[1]) for c in calls] == [(1, [0, 1, 2, 3]), (0.1, [0, 1, 2, 3]), (0.1, [4, 5, 6, 7]),
                                             (0.1, [8, 9])]
    assert all(c[2] for c in calls)  # within a chunk, images leave at their first hit
    first = trials[0]
    assert (first["lamda"], first["images"], first["hits"], first["fit_success"]) == (1, 4, 3, None)
    assert first["success_bounds"] == [0.3, pytest.approx(0.9)]  # 0.3 (the full rate) lies within
    # under a lower bar (the base attack's 0.7, 3 misses allowed) λ = 1 needs a second chunk to fail
    calls.clear()
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: {0: 0.7, 1: 0.3}.get(lam, 0.7), calls))
    lam, trials, rule = hfc.choose_lambda(None, None, images, np.zeros(N_TUNE), None, grid=[1, 0.1],
                                          min_success=0.95, refine=False, chunk=4)
    assert lam == 0.1 and "0.700" in rule
    assert (trials[0]["images"], trials[0]["success_bounds"]) == (8, [0.3, 0.5])


def test_trial_chunks_double_from_one_image(monkeypatch):
    # by default a λ that fails on its first image costs one image; one that passes runs in
    # chunks that double (1, 1, 2, 4, then the rest)
    calls = []
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: 1.0 if lam < 1 else 0.0, calls))
    lam, trials, _ = hfc.choose_lambda(None, None, _indexed_images(N_TUNE), np.zeros(N_TUNE), None, grid=[1, 0.5],
                                       min_success=0.95, refine=False)
    assert lam == 0.5 and calls[0][:2] == (1, [0]) and trials[0]["images"] == 1
    assert [c[1] for c in calls if c[0] == 0.5] == [[0], [1], [2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_term_with_per_image_guides_is_tried_in_one_chunk(monkeypatch):
    calls = []

    class Guided:
        per_image = True
    monkeypatch.setattr(hfc, "hfc_attack", _attack_hitting(lambda lam: 1.0, calls))
    hfc.choose_lambda(None, Guided(), _indexed_images(N_TUNE), np.zeros(N_TUNE), None, grid=[1], min_success=0.95,
                      chunk=4)
    assert [c[1] for c in calls] == [list(range(N_TUNE))]


def test_choose_lambda_stops_at_the_first_lambda_that_passes(monkeypatch):
    # λ = 1 reaches 95%: one trial, no λ = 0 run, and every trial asks the engine to stop early
    calls = []

    def fake_attack(model, term, images, targets, spec, *, lam, **kwargs):
        calls.append((lam, kwargs.get("stop_when_all_hit")))
        return images, torch.ones(len(images), dtype=torch.bool)
    monkeypatch.setattr(hfc, "hfc_attack", fake_attack)
    lam, trials, rule = hfc.choose_lambda(None, None, torch.zeros(4, 3, 2, 2), np.zeros(4), None,
                                          grid=[1, 0.1], min_success=0.95)
    assert lam == 1 and set(calls) == {(1, True)} and "0.95" in rule


def test_results_keys_of_other_settings_do_not_collide():
    keys = [hfc.results_key(8, "auto"), hfc.results_key(8, "1"), hfc.results_key(8, "0.0100"),
            hfc.results_key(8, "auto", {"a": 0.05, "T": 40}), hfc.results_key(8, "auto", {"last": True}),
            hfc.results_key(2, "AUTO"), hfc.results_key(8, "auto", {"det": "PGD_Linf_4", "term": "normalised"})]
    assert keys == ["M8_lamauto", "M8_lam1", "M8_lam0.01", "M8_lamauto_a0.05_T40", "M8_lamauto_last",
                    "M2_lamauto", "M8_lamauto_detPGD_Linf_4_termnormalised"]
    run = runs.Run("synthetic", "resnet18")
    folder = lambda **kw: gmm_attack.Config(arch="resnet18", **kw).results_dir(run).name  # noqa: E731
    assert folder() == "hfc_M8_lam1" and folder(detector="I_FGSM_Linf_1") == "hfc_M8_lam1"
    assert folder(lamda="auto", steps=7, class_loss="margin") == "hfc_M8_lamauto_T7_lossmargin"


def _eval_images(root: Path, n: int = 12):
    run = root / "runs_synthetic" / "resnet18"
    base = aesets.load_ae_set(run / ATTACK)
    model, _ = saver.load_model(run, "cpu")
    mixtures = gmm.load_mixtures(run / "gmm_M2")
    return run, model, mixtures, torch.from_numpy(base["clean"][:n]), base["targets"][:n], base


def test_lambda_zero_is_the_base_attack_and_lambda_pulls_features_in(pipeline):
    run, model, mixtures, clean, targets, base = _eval_images(pipeline)
    spec = attacks.parse_attack(ATTACK)
    term = hfc.HFCTerm(mixtures)
    kwargs = dict(step_size_256=0.8, steps=10, seed=0, batch_size=5, device="cpu", progress=False)
    plain, plain_success = hfc.hfc_attack(model, term, clean, targets, spec, lam=0.0, **kwargs)
    reference, reference_success = attacks.run_attack(model, clean, targets, spec, steps=10, step_size=0.8 / 256,
                                                      batch_size=5, progress=False)
    assert torch.equal(plain, reference) and torch.equal(plain_success, reference_success)

    hidden, _ = hfc.hfc_attack(model, term, clean, targets, spec, lam=1.0, **kwargs)
    rows = {"base": (plain.numpy(), np.ones(len(clean), bool)), "hfc": (hidden.numpy(), np.ones(len(clean), bool))}
    loglik = evaluation.mixture_log_likelihood(model, mixtures, rows, targets, "cpu")
    assert loglik["hfc"] > loglik["base"]
    # features already extracted (as score_table returns them) give the same values
    extracted = {row: features.adv_set(model, adv, success, "cpu", progress=False) for row, (adv, success) in rows.items()}
    again = evaluation.mixture_log_likelihood(model, mixtures, rows, targets, "cpu", extracted=extracted)
    assert again == pytest.approx(loglik, rel=1e-5)
    assert (hidden - clean).abs().max() <= spec.eps + 1e-6


def test_fast_lambda_search_picks_what_trying_every_lambda_in_full_picks(pipeline):
    """The λ search (largest first, bisection, each trial stopped once its verdict is certain) on a
    real tiny model gives the λ of the plain rule: every grid value attacked for all its steps, the
    largest whose success reaches the bar taken."""
    run, model, mixtures, clean, targets, base = _eval_images(pipeline, n=12)
    spec = attacks.parse_attack(ATTACK)
    term = hfc.HFCTerm(mixtures)
    kwargs = dict(step_size_256=0.8, steps=10, seed=0, batch_size=12, device="cpu")
    grid = [100.0, 10.0, 1.0, 0.1, 0.01]
    full = {lam: float(hfc.hfc_attack(model, term, clean, targets, spec, lam=lam, progress=False,
                                      **kwargs)[1].float().mean())
            for lam in grid + [0.0]}
    for min_success in (0.95, 0.6):
        bar = min(min_success, full[0.0])
        passing = [lam for lam in grid if full[lam] >= bar]
        lam, trials, _ = hfc.choose_lambda(model, term, clean, targets, spec, grid=grid, min_success=min_success,
                                           refine=False, **kwargs)
        if passing:
            assert lam == max(passing), (full, trials)
        assert len(trials) <= len(grid) + 1
        for trial in trials:  # a trial's bounds hold the full run's success (stopping early changes no count)
            low, high = trial["success_bounds"]
            assert low - 1e-6 <= full[trial["lamda"]] <= high + 1e-6
            if trial["fit_success"] is not None:
                assert trial["fit_success"] == pytest.approx(full[trial["lamda"]])
    assert len({v for v in full.values()}) > 1, f"the grid must span passing and failing λ: {full}"


def test_normalised_term_with_the_cw_loss(pipeline, monkeypatch):
    """The normalised, layer-averaged term with the clamped margin on I_FGSM: the options reach
    the engine, the budget holds, and the features move towards the target's mixtures."""
    run, model, mixtures, clean, targets, base = _eval_images(pipeline, n=8)
    assert mixtures.scales is not None  # get_GMM measured them on the validation images
    spec = attacks.parse_attack(ATTACK)
    seen = []
    real_run_attack = attacks.run_attack

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_run_attack(*args, **kwargs)

    monkeypatch.setattr(attacks, "run_attack", spy)
    term = hfc.HFCTerm(mixtures, normalise=True, reduce="mean")
    kwargs = dict(step_size_256=0.8, steps=10, seed=0, batch_size=8, device="cpu", progress=False,
                  loss="cw", kappa=1.0)
    plain, plain_success = hfc.hfc_attack(model, term, clean, targets, spec, lam=0.0, **kwargs)
    hidden, success = hfc.hfc_attack(model, term, clean, targets, spec, lam=1.0, **kwargs)
    assert [(k["loss"], k["kappa"]) for k in seen] == [("cw", 1.0)] * 2
    assert (hidden - clean).abs().max() <= spec.eps + 1e-6
    both = plain_success & success
    assert both.any()
    rows = {"base": (plain.numpy(), both.numpy()), "hfc": (hidden.numpy(), both.numpy())}
    loglik = evaluation.mixture_log_likelihood(model, mixtures, rows, targets, "cpu")
    assert loglik["hfc"] > loglik["base"]


def test_gmm_attack_eval_and_reproduce_end_to_end(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2"]
    results = gmm_attack.main(common + ["--attack", ATTACK, "--lamda", "auto", "--tune-images", "8"])
    assert set(results["detectors"]) == {"KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"}
    for rows in results["detectors"].values():
        for row in ("base", "hfc"):
            assert 0.0 <= rows[row]["auc"] <= 1.0 and 0.0 <= rows[row]["tnr90"] <= 1.0
    assert results["attack"] == ATTACK and results["detector_attack"] == ATTACK and results["epsilon_256"] == 4.0
    assert 0 <= results["success"]["hfc"] <= 1 and results["lamda"] in [t["lamda"] for t in results["lamda_trials"]]
    base_index = aesets.load_ae_set(pipeline / "runs_synthetic" / "resnet18" / ATTACK)["index"]
    fit_pos, _ = evaluation.fit_eval_split(len(base_index))
    assert results["lamda_tune_index"] == base_index[fit_pos[:8]].tolist()
    # the base row is the detectors' own A_eval report: one scoring path for both stages
    fitted_summary = json.loads((pipeline / "runs_synthetic" / "resnet18" / ATTACK / "detectors" / "summary.json")
                                .read_text())
    for name, rows in results["detectors"].items():
        assert rows["base"]["auc"] == pytest.approx(fitted_summary["detectors"][name]["auc"], abs=1e-12), name
        assert rows["base"]["tnr90"] == pytest.approx(fitted_summary["detectors"][name]["tnr90"], abs=1e-12), name
    # every AUC, TNR@90, mean AUC and success carries its bootstrap interval (by image), which holds it
    for rows in results["detectors"].values():
        for row in ("base", "hfc"):
            for metric in ("auc", "tnr90"):
                lo, hi = rows[row][f"{metric}_ci"]
                assert lo <= rows[row][metric] <= hi
    for row in ("base", "hfc"):
        lo, hi = results["success_ci"][row]
        assert lo <= results["success"][row] <= hi
        lo, hi = results["mean_auc_ci"][row]
        assert lo <= results["mean_auc"][row] <= hi
        aucs = [r[row]["auc"] for r in results["detectors"].values()]
        assert results["mean_auc"][row] == pytest.approx(np.mean(aucs))
    assert set(results["mean_auc_of"]) == set(results["detectors"]) and results["bootstrap"]["resamples"] == 1000
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "hfc_M2_lamauto"
    assert json.loads((folder / "results.json").read_text())["n_eval"] == results["n_eval"]
    assert "] |" in (folder / "results.md").read_text()  # the table shows the intervals
    assert "| KD |" in (folder / "results.md").read_text()
    hfc_set = aesets.load_ae_set(folder)  # checked: L∞ ≤ ε, range, shapes
    assert len(hfc_set["index"]) == results["n_eval"]
    assert results["cpu_seconds"]["choose_lamda"] > 0 and results["cpu_seconds"]["attack"] > 0
    # the per-layer table shows MAHA's combination weights, read from the fitted detector the record names
    table = report.main(["--layers", "MAHA", str(folder / "results.json")])
    weights = [line for line in table.splitlines() if "combination weight" in line]
    maha = detectors.load_detectors(pipeline / "runs_synthetic" / "resnet18" / ATTACK / "detectors", ["MAHA"])["MAHA"]
    assert len(weights) == 1 and len(maha.layer_weights()) == len(maha.layers_)
    shown = [float(cell) for cell in weights[0].split("|")[3:-2]]
    assert shown == pytest.approx([w for w in maha.layer_weights().values()], abs=0.006)

    # HFC hides: its mean detector AUC is below that of the λ = 0 control (the same base attack at
    # HFC's own schedule and keep-successful rule) on the same A_eval images.
    control = gmm_attack.main(common + ["--attack", ATTACK, "--lamda", "0"])
    mean_auc = lambda r: np.mean([rows["hfc"]["auc"] for rows in r["detectors"].values()])  # noqa: E731
    print(f"mean AUC: HFC {mean_auc(results):.3f} (λ = {results['lamda']:g}), λ = 0 control {mean_auc(control):.3f}")
    assert mean_auc(results) < mean_auc(control) - 0.1

    # eval.py scores the saved sets again with the same code path: identical numbers
    [again] = eval_script.main(["-a", "resnet18", "--dataset", "synthetic", "--attack", ATTACK, "--device", "cpu",
                                "--format", "csv", "--per-layer", "--hfc", "hfc_M2_lamauto"])
    assert again["detectors"] == results["detectors"] and again["success"] == results["success"]
    assert again["success_ci"] == results["success_ci"] and again["mean_auc_ci"] == results["mean_auc_ci"]
    # the per-layer detectors report every layer's AUC, for both rows
    for name in ("KD", "LID", "MAHA", "DNN"):
        for row in ("base", "hfc"):
            layer_auc = results["detectors"][name][row]["layer_auc"]
            assert layer_auc and all(0.0 <= v <= 1.0 for v in layer_auc.values())
    assert "layer_auc" not in results["detectors"]["SVM"]["hfc"]
    assert "MAHA: AUC of each layer's score" in (folder / "results.md").read_text()

    # reproduce.py composed with the same settings finds every artifact up to date, skips every
    # stage and writes the report
    summary = reproduce.run(*_reproduce_same_settings())
    assert summary["stage_seconds"] == {}
    out = pipeline / "runs_synthetic" / "resnet18" / "report"
    for name in ("table.md", "report.json", "auc_before_after.png", "feature_space.png"):
        assert (out / name).stat().st_size > 0, name


def _reproduce_same_settings():
    """reproduce.py's config (+ stage overrides) with the settings the fixtures used."""
    config = reproduce.Config(arch="resnet18", attack=ATTACK, num_component=2, device="cpu",
                              image_size=TINY_TRAIN["image_size"], epochs=TINY_TRAIN["epochs"])
    overrides = {"train": {key: TINY_TRAIN[key] for key in ("synthetic_train", "synthetic_test", "batch_size")},
                 "detectors": {"bu_passes": 5, "lid_k": 5, "lid_batch": 20, "dnn_epochs": 2, "train_limit": 60,
                               "batch_size": 16},
                 "hfc": {"tune_images": 8}}
    return config, overrides


def test_reproduce_runs_its_own_auto_lambda_after_a_manual_run(pipeline, monkeypatch):
    """A manual ``--lamda 1e-6`` run never answers for reproduce.py's ``--lamda auto``."""
    monkeypatch.chdir(pipeline)
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    shutil.rmtree(attack_dir / "hfc_M2_lamauto", ignore_errors=True)
    manual = gmm_attack.main(["-a", "resnet18", "--device", "cpu", "-y", "2", "--attack", ATTACK, "--lamda", "1e-6"])
    assert manual["lamda"] == 1e-6 and (attack_dir / "hfc_M2_lam1e-06" / "results.json").is_file()
    summary = reproduce.run(*_reproduce_same_settings())
    assert list(summary["stage_seconds"]) == ["hfc"]  # every other stage was up to date
    assert summary["results"].endswith("hfc_M2_lamauto/results.json")
    assert summary["record"]["settings"]["lamda"] == "auto" and summary["lamda_rule"] != "given"


def test_gmm_attack_error_paths(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(pipeline)
    with pytest.raises(UserError, match="get_GMM.py"):
        gmm_attack.main(["-a", "resnet18", "--attack", ATTACK, "-y", "5", "--device", "cpu"])
    with pytest.raises(UserError, match="extract_features.py"):
        gmm_attack.main(["-a", "resnet18", "--attack", ATTACK, "--detector", "PGD_Linf_4", "-y", "2"])
    with pytest.raises(UserError, match="'auto'"):
        gmm_attack.main(["-a", "resnet18", "--attack", ATTACK, "--lamda", "lots"])
    result = subprocess.run([sys.executable, str(ROOT / "gmm_attack.py"), "-a", "resnet18"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "train.py" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_report_formats():
    results = report.results_dict(
        dataset="APTOS", arch="resnet50", attack="I_FGSM_Linf_1", detector_attack="I_FGSM_Linf_1", epsilon_256=1,
        n_eval=10, success={"base": 1.0, "hfc": 0.9},
        detectors={"MAHA": {"base": {"auc": 1.0, "tnr90": 1.0}, "hfc": {"auc": 0.2, "tnr90": 0.0}},
                   "KD": {"base": {"auc": 0.9, "tnr90": 0.8}, "hfc": {"auc": 0.4, "tnr90": 0.1}}})
    assert list(results["detectors"]) == ["KD", "MAHA"]  # the paper's order
    md = report.format_table(results, "md")
    assert "| KD | 0.900 | 0.800 | 0.400 | 0.100 |" in md and "| mean | 0.950 |  | 0.300 |  |" in md
    csv_text = report.format_table(results, "csv")
    assert csv_text.splitlines()[0] == "detector,base AUC,base TNR@90,hfc AUC,hfc TNR@90"
    assert "success" in report.format_table(results, "text")
    assert report.format_layer_table(results, "md") == ""
    results["detectors"]["MAHA"]["base"]["layer_auc"] = {"layer1": 0.9, "layer4": 1.0}
    results["detectors"]["MAHA"]["hfc"]["layer_auc"] = {"layer1": 0.3, "layer4": 0.6}
    layers = report.format_layer_table(results, "md")
    assert "| layer4 | 1.000 | 0.600 |" in layers and "| combined | 1.000 | 0.200 |" in layers


def _mean_layer_values(model, term, folders: dict) -> dict:
    """For each named AE folder: the mean of ``term.layer_values`` over its successful AEs' features."""
    means = {}
    for name, where in folders.items():
        ae = aesets.load_ae_set(where)
        hit = ae["success"]
        feats = features.adv_set(model, ae["adv"], hit, "cpu", progress=False)
        pooled = [torch.from_numpy(p) for p in feats.pooled]
        means[name] = float(term.layer_values(pooled, torch.as_tensor(ae["targets"][hit])).mean())
    return means


def test_gmm_attack_typical_term_pulls_each_layer_to_the_clean_level(pipeline, monkeypatch):
    """--term typical: the two-sided term (typical_set.py) with τ from the validation images. Its
    AEs' per-layer log-likelihoods lie closer to the typical clean level than those of the λ = 0
    control (the same margin loss and schedule, the same images), and the folder and record name it."""
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2", "--attack", ATTACK,
              "--class-loss", "margin", "--limit", "12"]
    typical = gmm_attack.main(common + ["--term", "typical", "--lamda", "1"])
    control = gmm_attack.main(common + ["--lamda", "0"])
    assert typical["term"] == "typical" and typical["record"]["settings"]["term"] == "typical"
    assert typical["success"]["hfc"] > 0 and control["success"]["hfc"] > 0
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    folder = attack_dir / "hfc_M2_lam1_termtypical_lossmargin"
    assert (folder / "results.json").is_file()

    run_ = runs.Run("synthetic", "resnet18")
    model, _ = saver.load_model(run_.checkpoint, "cpu")
    term = typical_set.fitted_term(run_, model, gmm.load_mixtures(run_.mixtures_dir(2)), "cpu", 16)
    gaps = _mean_layer_values(model, term, {"typical": folder, "control": attack_dir / "hfc_M2_lam0_lossmargin"})
    print(f"per-layer (ℓ − τ)² / scale: typical {gaps['typical']:.3g}, control {gaps['control']:.3g}")
    assert gaps["typical"] < 0.5 * gaps["control"], gaps


def test_gmm_attack_exemplar_term_pulls_towards_clean_images_of_the_target(pipeline, monkeypatch):
    """--term exemplar: every layer pulled towards the nearest correctly classified training image of
    the target class (exemplar.py). Its AEs lie closer to such an image, on the held-out-normalised
    scale, than those of the λ = 0 control (the same margin loss and schedule, the same images)."""
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2", "--attack", ATTACK,
              "--class-loss", "margin", "--limit", "12"]
    with pytest.raises(UserError, match="--exemplars applies to --term exemplar or exemplar-hinged only"):
        gmm_attack.main(common + ["--exemplars", "val", "--lamda", "1"])
    pulled = gmm_attack.main(common + ["--term", "exemplar", "--lamda", "1"])
    control = gmm_attack.main(common + ["--lamda", "0"])
    assert pulled["term"] == "exemplar" and pulled["record"]["settings"]["term"] == "exemplar"
    assert pulled["success"]["hfc"] > 0 and control["success"]["hfc"] > 0
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    folder = attack_dir / "hfc_M2_lam1_termexemplar_lossmargin"
    assert (folder / "results.json").is_file()

    run_ = runs.Run("synthetic", "resnet18")
    model, _ = saver.load_model(run_.checkpoint, "cpu")
    term = exemplar.fitted_term(run_, model, model.conv_layers, "cpu", 16)
    distance = _mean_layer_values(model, term, {"exemplar": folder, "control": attack_dir / "hfc_M2_lam0_lossmargin"})
    print(f"per-layer distance to the nearest exemplar / clean scale: exemplar {distance['exemplar']:.3g}, "
          f"control {distance['control']:.3g}")
    assert distance["exemplar"] < 0.8 * distance["control"], distance


def test_term_layer_choices_resolve_to_mixture_layers(pipeline):
    """--hfc-layers: all is the mixtures' layers, last the deepest of them, last-stage those after the
    second-to-last stage end; names resolve to their taps, and a tap without a mixture is refused."""
    _, model, mixtures, *_ = _eval_images(pipeline, n=2)
    fitted = sorted(mixtures.layers)
    assert hfc.resolve_term_layers("all", model, mixtures.layers) == fitted
    assert hfc.resolve_term_layers("last", model, mixtures.layers) == fitted[-1:]
    deepest = hfc.resolve_term_layers("last-stage", model, mixtures.layers)
    assert deepest and all(i > model.stage_end_layers[-2] for i in deepest)
    assert set(fitted) - set(deepest) and all(i <= model.stage_end_layers[-2] for i in set(fitted) - set(deepest))
    names = ",".join(model.layer_names[i] for i in (fitted[2], fitted[0]))
    assert hfc.resolve_term_layers(names, model, mixtures.layers) == [fitted[0], fitted[2]]
    with pytest.raises(UserError, match="unknown: nope"):
        hfc.resolve_term_layers("nope", model, mixtures.layers)
    unfitted = [name for i, name in enumerate(model.layer_names) if i not in fitted]
    with pytest.raises(UserError, match="no mixtures for"):
        hfc.resolve_term_layers(unfitted[-1], model, mixtures.layers)


def test_hfc_layers_with_a_form_without_mixtures_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """The flag check comes first: in a folder with no run at all the error names the flag, not the
    missing checkpoint."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--hfc-layers applies to"):
        gmm_attack.main(["--dataset", "synthetic", "--device", "cpu", "--term", "exemplar", "--hfc-layers", "last"])


def test_gmm_attack_on_the_deepest_stage_constrains_only_those_layers(pipeline, monkeypatch):
    """--hfc-layers last-stage: the term acts on the deepest stage's mixture layers only. Against the
    λ = 0 control (the same schedule and images) the AEs' term falls on those layers, the folder and the
    results name the layers, and the forms without mixtures refuse the flag."""
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2", "--attack", ATTACK,
              "--limit", "12"]
    with pytest.raises(UserError, match="--hfc-layers applies to"):
        gmm_attack.main(common + ["--term", "typical", "--hfc-layers", "last-stage", "--lamda", "1"])
    deep = gmm_attack.main(common + ["--hfc-layers", "last-stage", "--lamda", "1"])
    control = gmm_attack.main(common + ["--lamda", "0"])
    run_ = runs.Run("synthetic", "resnet18")
    model, _ = saver.load_model(run_.checkpoint, "cpu")
    mixtures = gmm.load_mixtures(run_.mixtures_dir(2))
    chosen = hfc.resolve_term_layers("last-stage", model, mixtures.layers)
    assert deep["term_layers"] == [model.layer_names[i] for i in chosen]
    assert deep["record"]["settings"]["hfc_layers"] == "last-stage"
    assert report.summary_rows(deep, "run", with_base=False)[0][1].startswith("HFC (paper on last-stage")
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    folder = attack_dir / "hfc_M2_lam1_layerslast-stage"
    assert (folder / "results.json").is_file() and deep["success"]["hfc"] > 0 and control["success"]["hfc"] > 0
    term = hfc.HFCTerm(mixtures, layers=chosen)
    values = _mean_layer_values(model, term, {"deep": folder, "control": attack_dir / "hfc_M2_lam0"})
    print(f"deepest-stage term: constrained {values['deep']:.3g}, control {values['control']:.3g}")
    assert values["deep"] < 0.8 * values["control"], values


def test_gmm_attack_lamda_fallback_records_each_images_lamda(pipeline, monkeypatch):
    """--lamda-fallback: the results record the factors and, per attacked image, the λ its AE was
    made with (λ itself, or λ times a factor for an image attacked again, which then hit); its own
    folder; the row says so; bad factors are one-line errors."""
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2", "--attack", ATTACK,
              "--limit", "12", "--lamda", "100"]
    with pytest.raises(UserError, match="lamda-fallback"):
        gmm_attack.main(common + ["--lamda-fallback", "0.1,0.5"])
    results = gmm_attack.main(common + ["--lamda-fallback", "0.01,0"])
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "hfc_M2_lam100_fb0.01+0"
    assert (folder / "results.json").is_file()
    assert results["lamda_fallback"] == [0.01, 0.0] and results["record"]["settings"]["lamda_fallback"] == "0.01,0"
    lamdas = np.array(results["lamda_per_image"])
    success = aesets.load_ae_set(folder)["success"]
    assert len(lamdas) == 12 and set(lamdas) <= {100.0, 1.0, 0.0}
    assert success[lamdas < 100].all()  # a smaller weight is kept only where it hit
    assert results["success"]["hfc"] == pytest.approx(success.mean())
    assert "λ fallback" in report.summary_rows(results, "run", with_base=False)[0][1]
    print(f"λ = 100 with fallback: {np.unique(lamdas, return_counts=True)}, success {success.mean():.2f}")


def test_gmm_attack_on_a_fit_attacks_those_images_and_keeps_them_apart(pipeline, monkeypatch):
    """--images fit: the attack and the scores are on A_fit's images (for choosing a setting without
    A_eval), in their own folder, and the results say which part they are of."""
    monkeypatch.chdir(pipeline)
    common = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "-y", "2", "--attack", ATTACK,
              "--lamda", "0", "--limit", "6"]
    on_fit = gmm_attack.main(common + ["--images", "fit"])
    on_eval = gmm_attack.main(common)
    attack_dir = pipeline / "runs_synthetic" / "resnet18" / ATTACK
    base = aesets.load_ae_set(attack_dir)
    fit_pos, eval_pos = evaluation.fit_eval_split(len(base["index"]))
    fit_set = aesets.load_ae_set(attack_dir / "hfc_M2_lam0_imgfit")
    eval_set = aesets.load_ae_set(attack_dir / "hfc_M2_lam0")
    assert fit_set["index"].tolist() == base["index"][fit_pos[:6]].tolist()
    assert eval_set["index"].tolist() == base["index"][eval_pos[:6]].tolist()
    assert not set(fit_set["index"].tolist()) & set(eval_set["index"].tolist())
    assert (on_fit["images_of"], fit_set["meta"]["images_of"], on_eval["images_of"]) == ("A_fit", "A_fit", "A_eval")
    assert on_fit["record"]["settings"]["images"] == "fit" and on_fit["n_eval"] == 6
    assert [row[1] for row in report.summary_rows(on_fit, "run")] == ["base [A_fit]", "λ = 0 control [A_fit]"]
    assert [row[1] for row in report.summary_rows(on_eval, "run")] == ["base", "λ = 0 control"]
    table = report.main(["--format", "md", str(attack_dir / "hfc_M2_lam0_imgfit" / "results.json"),
                         str(attack_dir / "hfc_M2_lam0" / "results.json")])
    assert "AUC on A_eval and A_fit" in table and table.count("| base") == 2, table
    # λ chosen with --images fit: on A_fit images that are not then attacked and scored
    tuned = gmm_attack.main(common[:-4] + ["--images", "fit", "--limit", "4", "--lamda", "auto",
                                           "--tune-images", "2", "--lamda-grid", "1"])
    tuned_set = aesets.load_ae_set(attack_dir / "hfc_M2_lamauto_imgfit")
    assert tuned["lamda_tune_index"] == base["index"][fit_pos[4:6]].tolist()
    assert not set(tuned["lamda_tune_index"]) & set(tuned_set["index"].tolist())
    with pytest.raises(UserError, match="A_fit images that are not attacked"):
        gmm_attack.main(common[:-4] + ["--images", "fit", "--lamda", "auto"])
