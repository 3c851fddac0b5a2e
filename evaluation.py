"""The evaluation protocol (docs/PROTOCOL.md §6): the set A, its A_fit / A_eval parts, the benign
and adversarial sets, the one producer of the noise set, and the scoring of every table.

A = the correctly classified test images in a seeded order (fixed by ``gen_base_adv.py`` and
saved with every AE set). The first 70% of A is A_fit, the rest A_eval: detectors are fitted on
A_fit and scored on A_eval; the HFC attack attacks A_eval. Benign = the clean images and their
noise versions (``Noise_Linf_<k>``, made by ``make_noise_set`` only); adversarial = the
successful AEs. ``score_table`` scores any number of AE rows
of the same images against the same benign set with the same detectors: the "base" and "HFC" rows
of a table come from one code path, with bootstrap intervals that resample the images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import aesets
import attacks
import detectors
import features
import gmm
import metrics
import runs
from utils import UserError

REMAKE_HINT = "re-make it for the same images (same --seed and --limit)"

FIT_FRACTION = 0.7


def fit_eval_split(n: int, fit_fraction: float = FIT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into A) of A_fit and A_eval: a prefix and the rest of the seeded order."""
    n_fit = int(round(fit_fraction * n))
    return np.arange(n_fit), np.arange(n_fit, n)


def eligible_order(correct: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the correctly classified test images, in the seeded order that defines A."""
    candidates = np.flatnonzero(np.asarray(correct, dtype=bool))
    return candidates[np.random.default_rng(seed).permutation(len(candidates))]


def choose_targets(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Attack targets: the other class when binary, else a seeded random other class."""
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes == 2:
        return 1 - labels
    shift = np.random.default_rng(seed + 1).integers(1, num_classes, size=len(labels))
    return (labels + shift) % num_classes


def parse_noise(name: str) -> attacks.AttackSpec:
    """The spec of a benign noise set; a UserError unless ``name`` is a ``Noise_Linf_<k>`` set."""
    spec = attacks.parse_attack(name)
    if spec.method != "Noise":
        raise UserError(f"--noise must be a Noise_Linf_<k> set, not {name!r}")
    return spec


def make_noise_set(run: runs.Run, model, noise: str, clean: np.ndarray, labels: np.ndarray, targets: np.ndarray,
                   index: np.ndarray, *, seed: int, batch_size: int, device, made_by: str,
                   extra_meta: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The benign noisy versions (``Noise_Linf_<k>``: uniform noise in [−ε, ε], clipped) of the
    given images of A, saved as an AE set in ``run``; the one place a noise set is made."""
    spec = parse_noise(noise)
    adv, success = attacks.run_attack(model, torch.from_numpy(np.asarray(clean)), targets, spec, seed=seed,
                                      batch_size=batch_size, device=device, progress=False)
    settings = {**(settings or {}), "attack": spec.name, "seed": seed, "images": runs.array_digest(index)}
    meta = {"attack": spec.name, "method": spec.method, "dataset": run.dataset, "arch": model.arch,
            "run": str(run.dir), "image_size": int(np.asarray(clean).shape[-1]), "seed": seed, "made_by": made_by,
            **(extra_meta or {})}
    return aesets.save_ae_set(run.ae_dir(spec.name), clean=clean, adv=adv, labels=labels, targets=targets,
                              success=success, index=index, eps=spec.eps, meta=meta,
                              provenance=("noise", settings, {"checkpoint": run.checkpoint}))


def noise_versions(run: runs.Run, noise: str, base: dict[str, Any], *, hint: str) -> np.ndarray:
    """The noise versions of the images of the AE set ``base``, in its order; a UserError (with
    ``hint``) when the noise set is missing, stale (made from another model) or lacks some images."""
    spec = parse_noise(noise)
    folder = run.ae_dir(spec.name)
    noise_set = aesets.load_ae_set(folder, hint=hint)
    runs.require_fresh(folder / aesets.SUMMARY_FILE, {"checkpoint": run.checkpoint}, f"noise set {noise}", hint)
    rows = aesets.rows_of(noise_set, base["index"], f"noise set {folder}", hint)
    if not np.array_equal(noise_set["clean"][rows], base["clean"]):
        raise UserError(f"the clean images of {folder} differ from those of the attack set; {hint}")
    return noise_set["adv"][rows]


def load_protocol_sets(run: runs.Run, attack: str, noise: str) -> dict[str, Any]:
    """A (the base attack's set, checked fresh against the checkpoint), its A_fit / A_eval
    positions and the noise versions of A."""
    base_dir = run.ae_dir(attack)
    base = aesets.load_ae_set(base_dir, hint=run.hint("attack", f"--attack {attack}"))
    runs.require_fresh(base_dir / aesets.SUMMARY_FILE, {"checkpoint": run.checkpoint}, f"AE set {attack}",
                       run.hint("attack", f"--attack {attack}", when="again"))
    noisy = noise_versions(run, noise, base, hint=run.hint("detectors", f"--attack {attack}"))
    fit_pos, eval_pos = fit_eval_split(len(base["index"]))
    return {"base": base, "noisy": noisy, "fit": fit_pos, "eval": eval_pos}


def protocol_images(n_images: int, success) -> tuple[np.ndarray, np.ndarray]:
    """The image (0 .. n − 1) each scored sample comes from, for the bootstrap: the benign set
    is the clean then the noisy versions of the n images (``features.benign_set``), the
    adversarial set the successful AEs in order (``features.adv_set``)."""
    success = np.asarray(success, dtype=bool)
    if len(success) != n_images:
        raise ValueError(f"{len(success)} success flags for {n_images} images")
    return np.tile(np.arange(n_images), 2), np.flatnonzero(success)


@dataclass
class ScoredRows:
    """``score_table``'s result. ``table``: {detector: {row: report}} (each report also carries
    ``auc_ci`` and ``tnr90_ci``); per row: ``success`` (rate over the images), ``success_ci``,
    ``mean_auc`` (over the detectors ``mean_auc_of``) and ``mean_auc_ci``; ``features``: {row:
    features of its successful AEs}; ``bootstrap``: how the intervals were drawn;
    ``auc_replicates``: {row: {detector: the AUC of every resample}}, so that AUCs scored in
    separate calls on the same images (the same draws) can still be averaged resample by resample."""

    table: dict[str, dict[str, dict]]
    success: dict[str, float]
    success_ci: dict[str, list[float]]
    mean_auc: dict[str, float]
    mean_auc_ci: dict[str, list[float]]
    mean_auc_of: list[str]
    features: dict[str, features.FeatureSet]
    bootstrap: dict[str, Any]
    auc_replicates: dict[str, dict[str, np.ndarray]]

    def summary_fields(self) -> dict[str, Any]:
        """The fields a results file carries beside ``success`` and ``detectors``."""
        return {"success_ci": self.success_ci, "mean_auc": self.mean_auc, "mean_auc_ci": self.mean_auc_ci,
                "mean_auc_of": self.mean_auc_of, "bootstrap": self.bootstrap}


def bootstrap_settings(resamples: int = metrics.BOOTSTRAP_RESAMPLES, seed: int = metrics.BOOTSTRAP_SEED,
                       level: float = metrics.BOOTSTRAP_LEVEL) -> dict[str, Any]:
    """How the intervals are drawn (recorded with them)."""
    return {"unit": "image (its clean and noisy benign versions and its AE together)", "resamples": resamples,
            "seed": seed, "level": level, "interval": "percentile"}


def score_table(model, fitted: dict[str, detectors.Detector], clean: np.ndarray, noisy: np.ndarray,
                rows: dict[str, tuple[np.ndarray, np.ndarray]], *, device, batch_size: int = 32,
                mean_of: Sequence[str] | None = None, resamples: int = metrics.BOOTSTRAP_RESAMPLES,
                bootstrap_seed: int = metrics.BOOTSTRAP_SEED, level: float = metrics.BOOTSTRAP_LEVEL
                ) -> ScoredRows:
    """Score benign (clean + noisy) against each row's successful AEs with every detector, with
    bootstrap intervals.

    ``rows`` maps a row name ("base", "hfc", ...) to (AE images, success) of the same images as
    ``clean``. The feature sets are built exactly as ``extract_features.py`` builds them
    (``features.benign_set`` and ``features.adv_set``), so a row scored here equals the same row scored there; the
    benign set is extracted and scored once for all rows. The reports of the per-layer detectors
    (KD, LID, MAHA, DNN) carry ``layer_auc`` {layer name: AUC of that layer's score}.

    Intervals: ``resamples`` seeded draws of the images with replacement (``metrics.ImageBootstrap``;
    an image's two benign versions and its AE move together), the same draws for every detector
    and row, so the mean AUC's interval averages the detectors' AUCs resample by resample;
    the central ``level`` percentile interval. ``mean_of``: the detectors the mean AUC is over
    (those of them scored; default: every detector scored)."""
    keep_maps = fitted["DNN"].layers_ if "DNN" in fitted else ()
    n_images = len(clean)
    success_rates, successes, adv_rows = {}, {}, {}
    for row, (adv, success) in rows.items():
        success = np.asarray(success, dtype=bool)
        if len(success) != n_images:
            raise ValueError(f"row {row}: {len(success)} success flags for {n_images} images")
        success_rates[row] = float(success.mean()) if len(success) else 0.0
        successes[row] = success
        if success.sum() < 1:
            raise UserError(f"no successful {row} AE among {len(success)} evaluation images: nothing to score")
        adv_rows[row] = features.adv_set(model, adv, success, device, batch_size, keep_maps, desc=f"{row}: ")
    benign = features.benign_set(model, clean, noisy, device, batch_size, keep_maps)
    # Per-layer AUCs cost nothing more (the combined score is made from the layer scores).
    scores: dict[str, dict] = {}
    table = detectors.evaluate_rows(fitted, model, benign, adv_rows, per_layer=True, progress=True, scores=scores)

    boot = metrics.ImageBootstrap(n_images, resamples, bootstrap_seed)
    mean_auc_of = [name for name in (mean_of if mean_of is not None else table) if name in table]
    success_ci, mean_auc, mean_auc_ci, auc_replicates = {}, {}, {}, {}
    for row, success in successes.items():
        benign_images, adv_images = protocol_images(n_images, success)
        success_ci[row] = metrics.percentile_interval(boot.rate(success), level)
        replicates = auc_replicates[row] = {}
        for name, per_row in table.items():
            benign_scores, adv_scores = scores[name]["benign"], scores[name]["adv"][row]
            replicates[name] = boot.auc(benign_scores, adv_scores, benign_images, adv_images)
            per_row[row]["auc_ci"] = metrics.percentile_interval(replicates[name], level)
            per_row[row]["tnr90_ci"] = metrics.percentile_interval(
                boot.tnr(benign_scores, adv_scores, benign_images, adv_images, 0.90), level)
        if mean_auc_of:
            mean_auc[row] = float(np.mean([table[name][row]["auc"] for name in mean_auc_of]))
            mean_auc_ci[row] = metrics.percentile_interval(np.mean([replicates[name] for name in mean_auc_of],
                                                                   axis=0), level)
    return ScoredRows(table=table, success=success_rates, success_ci=success_ci, mean_auc=mean_auc,
                      mean_auc_ci=mean_auc_ci, mean_auc_of=mean_auc_of, features=adv_rows,
                      bootstrap=bootstrap_settings(resamples, bootstrap_seed, level), auc_replicates=auc_replicates)


@torch.no_grad()
def mixture_log_likelihood(model, mixtures: gmm.Mixtures, rows: dict[str, tuple[np.ndarray, np.ndarray]],
                           targets: np.ndarray, device, batch_size: int = 64,
                           extracted: dict[str, features.FeatureSet] | None = None) -> dict[str, float]:
    """Per row, the mean over successful AEs and kept layers of the target class's mixture
    log-likelihood of the AE's pooled features: how typical of the target class they look.
    ``extracted`` (``ScoredRows.features``) holds rows whose successful AEs' features are
    already extracted."""
    out = {}
    for row, (adv, success) in rows.items():
        success = np.asarray(success, dtype=bool)
        if not success.any():
            out[row] = float("nan")
            continue
        feats = (extracted or {}).get(row)
        if feats is None:
            feats = features.adv_set(model, adv, success, device, batch_size, progress=False)
        t = np.asarray(targets)[success]
        per_layer = []
        for layer in mixtures.layers:
            ll = np.empty(len(t))
            for cls in np.unique(t):
                rows_c = t == cls
                ll[rows_c] = mixtures.log_likelihood(layer, int(cls), feats.pooled[layer][rows_c])
            per_layer.append(ll.mean())
        out[row] = float(np.mean(per_layer))
    return out


def load_fresh_detectors(run_: runs.Run, attack: str, names=None) -> dict:
    """The detectors fitted on ``attack``'s AEs (all of them, or ``names``), refused with a one-line
    hint when missing or made from an older model or AE set."""
    folder = run_.detectors_dir(attack)
    fitted = detectors.load_detectors(folder, names=names, hint=run_.hint("detectors", f"--attack {attack}"))
    runs.require_fresh(folder / runs.SUMMARY,
                       {"checkpoint": run_.checkpoint, "attack_set": run_.ae_dir(attack) / aesets.AE_FILE},
                       "the detectors", run_.hint("detectors", f"--attack {attack}", when="again"))
    return fitted


def load_fresh_mixtures(run_: runs.Run, num_component: int, need_scales: bool = False) -> gmm.Mixtures:
    """The run's mixtures with ``num_component`` components, refused with a one-line hint when missing,
    made from an older model, or (``need_scales``) without the held-out scales of the normalised term."""
    folder = run_.mixtures_dir(num_component)
    mixtures = gmm.load_mixtures(folder, hint=run_.hint("mixtures", f"-y {num_component}"))
    again = run_.hint("mixtures", f"-y {num_component}", when="again")
    runs.require_fresh(folder / runs.SUMMARY, {"checkpoint": run_.checkpoint}, "the mixtures", again)
    if need_scales and mixtures.scales is None:
        raise UserError(f"the mixtures in {folder} carry no held-out term scales (made by an older get_GMM.py); "
                        f"{again}")
    return mixtures
