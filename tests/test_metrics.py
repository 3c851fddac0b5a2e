"""Detection metrics on hand-computed cases (metrics.py)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import metrics


def test_auc_hand_computed_with_a_tie():
    benign, adv = [0.1, 0.4, 0.35, 0.8], [0.9, 0.4, 0.5]
    # adv 0.9 beats 4 benign; 0.4 beats 2 and ties 1 (counts 1/2); 0.5 beats 3 -> 9.5 / 12
    assert metrics.roc_auc(benign, adv) == pytest.approx(9.5 / 12)
    labels = np.r_[np.zeros(4), np.ones(3)]
    assert metrics.roc_auc(benign, adv) == pytest.approx(roc_auc_score(labels, np.r_[benign, adv]))


def test_auc_extremes_and_empty():
    assert metrics.roc_auc([0, 1, 2], [3, 4]) == 1.0
    assert metrics.roc_auc([3, 4], [0, 1, 2]) == 0.0
    assert metrics.roc_auc([1, 1], [1, 1, 1]) == 0.5
    assert np.isnan(metrics.roc_auc([], [1.0]))
    with pytest.raises(ValueError):
        metrics.roc_auc([np.nan], [1.0])


def test_tnr90_hand_computed():
    benign = np.arange(1, 11)           # 90% of 10 pass at t = 9 (the 9th smallest)
    adv = [9.5, 9.0, 11.0, 5.0]         # flagged: 9.5 and 11; 9.0 ties the threshold -> passes
    assert metrics.benign_pass_threshold(benign, 0.9) == 9
    assert metrics.tnr90(benign, adv) == 0.5
    assert metrics.tnr_at_tpr(benign, adv, 0.9) == 0.5
    # 95% of 10 benign samples -> all 10 must pass: t = 10, only 11 is flagged
    assert metrics.tnr_at_tpr(benign, adv, 0.95) == 0.25


def test_tnr_threshold_is_order_free_and_handles_ties():
    benign = [5, 1, 3, 3, 3, 2, 4, 3, 3, 9]   # sorted: 1 2 3 3 3 3 3 4 5 9 -> t90 = 5
    assert metrics.benign_pass_threshold(benign, 0.9) == 5
    assert metrics.tnr90(benign, [5, 6, 5.0001]) == pytest.approx(2 / 3)
    # with 20 benign samples 95% = 19 samples pass
    assert metrics.benign_pass_threshold(np.arange(20), 0.95) == 18


def test_detection_accuracy_hand_computed():
    # t=-inf: (0 + 1)/2; t=1: (1/3 + 1)/2; t=2: (2/3 + 1/2)/2; t=3: (1 + 1/2)/2 = 0.75; t=4: 0.5
    assert metrics.detection_accuracy([1, 2, 3], [2, 4]) == pytest.approx(0.75)
    assert metrics.detection_accuracy([0, 1], [2, 3]) == 1.0
    assert metrics.detection_accuracy([2, 3], [0, 1]) == 0.5  # never below "flag everything"


def test_detection_report_keys_and_values():
    report = metrics.detection_report(np.arange(1, 11), [9.5, 9.0, 11.0, 5.0])
    assert set(report) == {"auc", "tnr90", "tnr_at_tpr95", "detection_acc", "n_benign", "n_adv"}
    assert report["n_benign"] == 10 and report["n_adv"] == 4
    assert report["tnr90"] == 0.5 and report["tnr_at_tpr95"] == 0.25
    # adv 9.5 beats 9; 9.0 beats 8, ties 1; 11 beats 10; 5.0 beats 4, ties 1 -> 32 / 40
    assert report["auc"] == pytest.approx(32 / 40)


# ------------------------------------------------------------------ bootstrap intervals

def _protocol_example(n, seed=0, shift=1.0):
    """n images: a clean and a noisy benign score each, an AE score for the successful ones."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=n)
    noisy = clean + 0.3 * rng.normal(size=n)
    success = rng.random(n) < 0.8
    adv = rng.normal(loc=shift, size=n)[success]
    benign = np.r_[clean, noisy]
    return benign, adv, np.r_[np.arange(n), np.arange(n)], np.flatnonzero(success), success


def _reference(boot, benign, adv, benign_images, adv_images, success):
    """Resample by copying: for each draw of images, the benign versions and AEs of those images."""
    out = {"auc": [], "tnr90": [], "success": []}
    for draw in boot.draws:
        b = np.concatenate([benign[benign_images == i] for i in draw])
        a = np.concatenate([adv[adv_images == i] for i in draw])
        out["auc"].append(metrics.roc_auc(b, a))
        out["tnr90"].append(metrics.tnr90(b, a))
        out["success"].append(success[draw].mean())
    return {k: np.array(v) for k, v in out.items()}


def test_bootstrap_matches_a_copying_reference_that_pairs_an_images_samples():
    benign, adv, bi, ai, success = _protocol_example(9, seed=3)
    benign = np.round(benign, 1)  # ties between and within the sides
    adv = np.round(adv, 1)
    boot = metrics.ImageBootstrap(9, resamples=200, seed=5)
    reference = _reference(boot, benign, adv, bi, ai, success)
    np.testing.assert_allclose(boot.auc(benign, adv, bi, ai), reference["auc"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(boot.tnr(benign, adv, bi, ai), reference["tnr90"])
    np.testing.assert_allclose(boot.rate(success), reference["success"], atol=1e-12)
    # the public interval is the percentile interval of those resamples
    lo, hi = metrics.bootstrap_interval(benign, adv, "auc", benign_images=bi, adv_images=ai, n_images=9,
                                        resamples=200, seed=5)
    assert [lo, hi] == pytest.approx(np.nanpercentile(reference["auc"], [2.5, 97.5]))
    assert metrics.success_interval(success, resamples=200, seed=5) == pytest.approx(
        np.percentile(reference["success"], [2.5, 97.5]))


def test_bootstrap_is_by_image_not_by_sample():
    # Image 0: benign (clean, noisy) scores 0, 0 and AE 0.5; image 1: benign 1, 1 and AE 2.0.
    benign, bi = np.array([0.0, 1.0, 0.0, 1.0]), np.array([0, 1, 0, 1])  # clean 0, 1, then noisy 0, 1
    adv, ai = np.array([0.5, 2.0]), np.array([0, 1])
    boot = metrics.ImageBootstrap(2, resamples=400, seed=0)
    values = set(np.round(boot.auc(benign, adv, bi, ai), 12))
    # By image only three resamples exist: {0, 0} and {1, 1} give AUC 1, {0, 1} the full set's 6/8.
    assert values == {1.0, 0.75} and metrics.roc_auc(benign, adv) == 0.75
    # Resampling samples on their own would also give e.g. AE 0.5 against benign {0, 1}: 0.5.


def test_interval_contains_the_estimate_narrows_and_is_seeded():
    widths = []
    for n in (30, 300):
        benign, adv, bi, ai, success = _protocol_example(n, seed=1)
        kw = dict(benign_images=bi, adv_images=ai, n_images=n)
        for metric, point in (("auc", metrics.roc_auc(benign, adv)), ("tnr90", metrics.tnr90(benign, adv))):
            lo, hi = metrics.bootstrap_interval(benign, adv, metric, **kw)
            assert lo <= point <= hi
            if metric == "auc":
                widths.append(hi - lo)
        lo, hi = metrics.success_interval(success)
        assert lo <= success.mean() <= hi
        assert metrics.bootstrap_interval(benign, adv, **kw, seed=7) == metrics.bootstrap_interval(
            benign, adv, **kw, seed=7)
        assert metrics.bootstrap_interval(benign, adv, **kw, seed=7) != metrics.bootstrap_interval(
            benign, adv, **kw, seed=8)
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_is_fast():
    import time

    benign, adv, bi, ai, success = _protocol_example(300, seed=2)
    started = time.perf_counter()
    boot = metrics.ImageBootstrap(300)
    boot.auc(benign, adv, bi, ai), boot.tnr(benign, adv, bi, ai), boot.rate(success)
    assert time.perf_counter() - started < 1.0


def test_bootstrap_edge_cases():
    assert metrics.bootstrap_interval([0.0, 1.0, 2.0], [3.0, 4.0]) == [1.0, 1.0]  # perfectly separated
    with pytest.raises(ValueError):
        metrics.bootstrap_interval([0.0], [1.0], "f1")
    with pytest.raises(ValueError):
        metrics.bootstrap_interval([0.0], [1.0], benign_images=[0])
    # a resample without any AE is left out, not counted as 0 or 1
    boot = metrics.ImageBootstrap(2, resamples=50, seed=0)
    values = boot.auc([0.0, 0.0], [1.0], [0, 1], [0])
    assert np.isnan(values).any() and set(values[~np.isnan(values)]) == {1.0}
    assert metrics.percentile_interval([np.nan, np.nan]) == pytest.approx([np.nan, np.nan], nan_ok=True)


def test_protocol_images_follow_the_benign_and_adversarial_sets_order():
    import evaluation

    benign_images, adv_images = evaluation.protocol_images(4, [True, False, True, True])
    assert benign_images.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # clean, then noisy (features.benign_set)
    assert adv_images.tolist() == [0, 2, 3]                     # the successful AEs in order (features.adv_set)
    with pytest.raises(ValueError):
        evaluation.protocol_images(3, [True, False])
