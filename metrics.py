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
- ``bootstrap_interval`` / ``success_interval`` (``ImageBootstrap``): 95% percentile intervals
  from 1000 seeded resamples of the *images* (an image's clean and noisy benign versions and its
  AE are drawn together), vectorised over resamples.
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


# ------------------------------------------------------------------ bootstrap intervals
#
# The evaluation's sampling unit is the image: an image of A_eval gives two benign samples (its
# clean and its noisy version) and, when the attack succeeds on it, one AE. A resample draws
# n images with replacement, and every sample of a drawn image enters it as many times as the
# image was drawn, so the two benign versions and the AE of an image move together.

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0


class ImageBootstrap:
    """``resamples`` draws of ``n_images`` images with replacement (seeded): ``draws[b]`` are
    the images of resample b and ``counts[b, i]`` how often image i is among them.

    Each statistic is computed for every resample at once from per-sample weights (the count of
    the sample's image), never by copying samples: AUC from the benign scores' weighted
    cumulative counts below and at each AE score (ranks), TNR@90 from the weighted benign
    quantile. One object shared by every detector and row scored on the same images gives paired
    resamples: a mean over detectors is averaged resample by resample."""

    def __init__(self, n_images: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
        if n_images < 1 or resamples < 1:
            raise ValueError(f"need at least one image and one resample, got {n_images} and {resamples}")
        self.n_images, self.resamples, self.seed = int(n_images), int(resamples), int(seed)
        self.draws = np.random.default_rng(seed).integers(0, n_images, size=(resamples, n_images))
        offsets = (np.arange(resamples) * n_images)[:, None]
        self.counts = np.bincount((self.draws + offsets).ravel(),
                                  minlength=resamples * n_images).reshape(resamples, n_images).astype(np.float64)

    def _weights(self, images, size: int, what: str) -> np.ndarray:
        images = np.asarray(images, dtype=np.int64).ravel()
        if len(images) != size:
            raise ValueError(f"{what}: {len(images)} image ids for {size} scores")
        if len(images) and (images.min() < 0 or images.max() >= self.n_images):
            raise ValueError(f"{what}: image ids must lie in [0, {self.n_images})")
        return self.counts[:, images]

    def _sorted(self, benign_scores, adv_scores, benign_images, adv_images):
        benign, adv = _scores(benign_scores), _scores(adv_scores)
        w_benign = self._weights(benign_images, len(benign), "benign")
        w_adv = self._weights(adv_images, len(adv), "adversarial")
        order = np.argsort(benign, kind="stable")
        return benign[order], adv, w_benign[:, order], w_adv

    def auc(self, benign_scores, adv_scores, benign_images, adv_images) -> np.ndarray:
        """``roc_auc`` of every resample (NaN where a side is empty)."""
        benign, adv, w_benign, w_adv = self._sorted(benign_scores, adv_scores, benign_images, adv_images)
        cumulative = np.concatenate([np.zeros((self.resamples, 1)), np.cumsum(w_benign, axis=1)], axis=1)
        below = cumulative[:, np.searchsorted(benign, adv, side="left")]
        at_or_below = cumulative[:, np.searchsorted(benign, adv, side="right")]
        wins = (w_adv * (0.5 * (below + at_or_below))).sum(axis=1)  # below + half the ties
        pairs = w_adv.sum(axis=1) * w_benign.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)

    def tnr(self, benign_scores, adv_scores, benign_images, adv_images, tpr: float = 0.90) -> np.ndarray:
        """``tnr_at_tpr(..., tpr)`` of every resample (NaN where a side is empty)."""
        if not 0.0 < tpr <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        benign, adv, w_benign, w_adv = self._sorted(benign_scores, adv_scores, benign_images, adv_images)
        cumulative = np.cumsum(w_benign, axis=1)
        total = cumulative[:, -1] if len(benign) else np.zeros(self.resamples)
        needed = np.maximum(1.0, np.ceil(np.round(tpr * total, 9)))  # as benign_pass_threshold
        position = np.minimum((cumulative < needed[:, None]).sum(axis=1), max(len(benign) - 1, 0))
        threshold = benign[position] if len(benign) else np.full(self.resamples, np.nan)
        n_adv = w_adv.sum(axis=1)
        flagged = (w_adv * (adv[None, :] > threshold[:, None])).sum(axis=1)
        ok = (n_adv > 0) & (total > 0)
        return np.where(ok, flagged / np.where(ok, n_adv, 1), np.nan)

    def rate(self, flags) -> np.ndarray:
        """The fraction of images with ``flags[i]`` (one flag per image) in every resample."""
        flags = np.asarray(flags, dtype=np.float64).ravel()
        if len(flags) != self.n_images:
            raise ValueError(f"{len(flags)} flags for {self.n_images} images")
        return self.counts @ flags / self.n_images


def percentile_interval(values, level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """The central ``level`` percentile interval [lo, hi] of bootstrap values (NaN resamples,
    where a statistic is undefined, are left out; [nan, nan] when all are)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return [float("nan"), float("nan")]
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_interval(benign_scores, adv_scores, metric: str = "auc", *, benign_images=None, adv_images=None,
                       n_images: int | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """The bootstrap percentile interval of ``metric`` ("auc" or "tnr90") of benign vs. adversarial
    scores, resampling images: ``benign_images[j]`` / ``adv_images[k]`` is the image (0 ..
    ``n_images`` − 1) that benign sample j / AE k comes from (the protocol's: ``evaluation.
    protocol_images``). Without them every sample is its own image (benign first, then AEs)."""
    benign, adv = _scores(benign_scores), _scores(adv_scores)
    if (benign_images is None) != (adv_images is None):
        raise ValueError("give both benign_images and adv_images, or neither")
    if benign_images is None:
        benign_images, adv_images = np.arange(len(benign)), len(benign) + np.arange(len(adv))
        n_images = len(benign) + len(adv)
    elif n_images is None:
        n_images = int(max(np.max(benign_images, initial=-1), np.max(adv_images, initial=-1))) + 1
    boot = ImageBootstrap(n_images, resamples, seed)
    if metric == "auc":
        values = boot.auc(benign, adv, benign_images, adv_images)
    elif metric == "tnr90":
        values = boot.tnr(benign, adv, benign_images, adv_images, 0.90)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected 'auc' or 'tnr90'")
    return percentile_interval(values, level)


def success_interval(success, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """The bootstrap percentile interval of a success rate (one flag per attacked image)."""
    success = np.asarray(success, dtype=bool).ravel()
    if len(success) == 0:
        return [float("nan"), float("nan")]
    return percentile_interval(ImageBootstrap(len(success), resamples, seed).rate(success), level)
