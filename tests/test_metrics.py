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
