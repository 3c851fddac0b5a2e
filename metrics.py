"""Detection metrics (docs/PROTOCOL.md §6): the one place they are computed.

Convention: a detector score is higher for "more adversarial"; a sample is *flagged* when its
score is strictly above a threshold t, so a benign sample *passes* when its score is <= t.

- ``roc_auc``: ROC AUC with the adversarial samples as positives. Ties between a benign and an
  adversarial score count one half (the Mann-Whitney statistic; equal to
  ``sklearn.metrics.roc_auc_score``).
- ``tnr_at_tpr(benign, adv, tpr)``: the fraction of AEs flagged at the lowest threshold that
  lets at least ``tpr`` of the benign samples pass. Here, as in Lee et al. (NeurIPS 2018), the
  *benign* samples are the positives of "TPR" and the AEs the negatives of "TNR".
  The HFC papers' "TNR@90" is ``tnr_at_tpr(..., 0.90)``; Lee et al.'s "TNR at 95% TPR" is
  ``tnr_at_tpr(..., 0.95)``. Ties: an AE whose score equals the threshold is not flagged
  (a threshold cannot separate equal scores, and the benign samples at t pass).
  Lee et al.'s code picks the threshold whose TPR is *closest* to 95%; we require *at least*
  that fraction of benign samples to pass, so the benign pass rate is never below target.
- ``detection_accuracy``: Lee et al.'s "detection accuracy",
  ``max_t 0.5 * (P(benign passes) + P(AE flagged))`` over every threshold (including "flag
  everything", which scores 0.5).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata


def _scores(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(array).any():
        raise ValueError("detector scores contain NaN")
    return array


def roc_auc(benign_scores, adv_scores) -> float:
    """ROC AUC with adversarial = positive; ties count 1/2. NaN when a side is empty."""
    benign, adv = _scores(benign_scores), _scores(adv_scores)
    if len(benign) == 0 or len(adv) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([adv, benign]))  # average ranks handle ties
    rank_sum = ranks[: len(adv)].sum()
    return float((rank_sum - len(adv) * (len(adv) + 1) / 2) / (len(adv) * len(benign)))


def benign_pass_threshold(benign_scores, tpr: float) -> float:
    """The lowest threshold t with at least a fraction ``tpr`` of benign scores <= t."""
    benign = np.sort(_scores(benign_scores))
    if len(benign) == 0:
        return float("nan")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    # Guard the float product (0.9 * 10 = 9.000000000000002) before taking the ceiling.
    needed = max(1, math.ceil(round(tpr * len(benign), 9)))
    return float(benign[needed - 1])


def tnr_at_tpr(benign_scores, adv_scores, tpr: float) -> float:
    """Fraction of AEs flagged (score > t) at the threshold letting ``tpr`` of benign pass."""
    adv = _scores(adv_scores)
    threshold = benign_pass_threshold(benign_scores, tpr)
    if len(adv) == 0 or math.isnan(threshold):
        return float("nan")
    return float(np.mean(adv > threshold))


def tnr90(benign_scores, adv_scores) -> float:
    """The HFC papers' "TNR@90": AEs flagged when 90% of benign samples pass."""
    return tnr_at_tpr(benign_scores, adv_scores, 0.90)


def detection_accuracy(benign_scores, adv_scores) -> float:
    """Lee et al.'s detection accuracy: max over t of (P(benign <= t) + P(adv > t)) / 2."""
    benign, adv = _scores(benign_scores), _scores(adv_scores)
    if len(benign) == 0 or len(adv) == 0:
        return float("nan")
    thresholds = np.concatenate([[-np.inf], np.unique(np.concatenate([benign, adv]))])
    benign_sorted, adv_sorted = np.sort(benign), np.sort(adv)
    benign_pass = np.searchsorted(benign_sorted, thresholds, side="right") / len(benign)
    adv_flagged = 1.0 - np.searchsorted(adv_sorted, thresholds, side="right") / len(adv)
    return float(np.max(0.5 * (benign_pass + adv_flagged)))


def detection_report(benign_scores, adv_scores) -> dict[str, float]:
    """AUC, TNR@90, TNR at 95% TPR and detection accuracy, plus the sample counts."""
    return {
        "auc": roc_auc(benign_scores, adv_scores),
        "tnr90": tnr90(benign_scores, adv_scores),
        "tnr_at_tpr95": tnr_at_tpr(benign_scores, adv_scores, 0.95),
        "detection_acc": detection_accuracy(benign_scores, adv_scores),
        "n_benign": int(np.size(benign_scores)),
        "n_adv": int(np.size(adv_scores)),
    }
