"""The HFC stage as a library: step schedule, the choice of λ on A_fit, and the one scoring path
that turns AE sets of A_eval into the paper's table (PROTOCOL sections 6 and 7).

``gmm_attack.py`` (attack, then score) and ``eval.py`` (score saved sets) both call
``score_rows``, so the "base" and "HFC" rows always come from the same code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import aesets
import attacks
import detectors
import features
import gmm
import protocol
from utils import UserError

# The HFC code's fixed step α in units of 1/256 (PROTOCOL section 7), keyed by (data set, arch).
PAPER_STEP_256 = {("APTOS", "resnet50"): 0.025, ("APTOS", "vgg16"): 0.1,
                  ("CXR", "resnet50"): 0.01, ("CXR", "vgg16"): 0.04}
# Elsewhere (the synthetic set, the small CPU archs): ε/10 per step, i.e. T = 20.
FALLBACK_STEP_FRACTION = 0.1
DEFAULT_LAMBDA_GRID = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_MIN_SUCCESS = 0.95
REMAKE_HINT = "re-make it for the same images (same --seed and --limit)"


def hfc_schedule(dataset: str, arch: str, eps_256: float, step_size_256: float | None = None,
                 steps: int | None = None) -> tuple[float, int]:
    """(α in units of 1/256, T): the paper's small fixed α and T = 2ε/α unless overridden."""
    if step_size_256 is None:
        step_size_256 = PAPER_STEP_256.get((dataset, arch), FALLBACK_STEP_FRACTION * eps_256)
    if step_size_256 <= 0:
        raise UserError(f"--step-size must be positive, got {step_size_256}")
    if steps is None:
        steps = max(1, int(round(2 * eps_256 / step_size_256)))
    if steps < 1:
        raise UserError(f"--steps must be positive, got {steps}")
    return float(step_size_256), int(steps)


def results_folder_name(num_component: int, lam: float, variant: str = "") -> str:
    """``hfc_M<y>_lam<λ>`` plus ``variant`` (see ``variant_suffix``)."""
    return f"hfc_M{num_component}_lam{lam:.3g}{variant}"


def variant_suffix(schedule: tuple[float, int], default_schedule: tuple[float, int],
                   last_iterate: bool = False) -> str:
    """"" for the default settings; ``_a<α>_T<T>`` for another step schedule and ``_last`` for
    ``--last-iterate``, so that runs with other settings never overwrite each other."""
    suffix = "" if schedule == default_schedule else f"_a{schedule[0]:g}_T{schedule[1]}"
    return suffix + ("_last" if last_iterate else "")


def find_results(folder: Path, num_component: int, lamda: str, variant: str = "") -> Path | None:
    """The newest ``results.json`` of an HFC run in ``folder`` with these settings (``lamda``:
    a number, or "auto" for any λ), or None."""
    pattern = re.compile(rf"hfc_M{num_component}_lam(?P<lam>[0-9.e+-]+){re.escape(variant)}")
    found = []
    for path in Path(folder).glob(f"hfc_M{num_component}_lam*/results.json"):
        match = pattern.fullmatch(path.parent.name)
        if match and (lamda == "auto" or match["lam"] == f"{float(lamda):.3g}"):
            found.append(path)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def hfc_attack(model, term: gmm.HFCTerm | None, images: torch.Tensor, targets: np.ndarray,
               spec: attacks.AttackSpec, *, lam: float, step_size_256: float, steps: int, seed: int,
               batch_size: int, device, progress: bool = True, keep_successful: bool = True,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The base attack ``spec`` with the HFC ``term`` added with weight λ (λ = 0: the base method
    itself at the HFC schedule; the term is not computed).

    With ``keep_successful`` (the default) an image whose last iterate is pulled back across the
    decision boundary by the term returns its latest iterate that was classified as the target:
    the attack's output is the most hidden adversarial example it found, never a miss it had
    already passed. Images are attacked grouped by target class (and returned in the given
    order): a batch with one target reads one class's mixture parameters, which makes the term
    about half as costly."""
    targets = np.asarray(targets, dtype=np.int64)
    order = np.argsort(targets, kind="stable")
    adv, success = attacks.run_attack(model, images[torch.from_numpy(order)], targets[order], spec,
                                      extra=term if lam > 0 else None, lam=lam, steps=steps,
                                      step_size=step_size_256 / 256, seed=seed, batch_size=batch_size,
                                      device=device, progress=progress, keep_successful=keep_successful,
                                      **options)
    restore = torch.from_numpy(np.argsort(order))
    return adv[restore], success[restore]


def choose_lambda(model, term: gmm.HFCTerm, images: torch.Tensor, targets: np.ndarray, spec, *,
                  grid: Sequence[float], min_success: float, refine: bool = True,
                  **attack_kwargs) -> tuple[float, list[dict]]:
    """The largest λ whose HFC attack succeeds on at least ``min_success`` of the given images
    (a subset of A_fit: never the evaluation images). Returns λ and the trials.

    ``grid`` is tried from the largest value down and the search stops at the first success;
    with ``refine``, the geometric midpoint between that value and the failed one above it is
    tried too. When no value succeeds, the base attack (λ = 0) is run on the same images and the
    largest λ that does as well as it is taken (a base attack below ``min_success`` cannot be
    beaten by adding a constraint). The term's scale depends on the data (a mixture fitted on a
    few hundred samples in hundreds of dimensions has very large precisions off the data), hence
    a grid over decades.
    """
    trials: list[dict] = []

    def succeeds(lam: float) -> bool:
        # A trial on real images takes minutes: its progress bar shows (and clears after).
        _, success = hfc_attack(model, term, images, targets, spec, lam=lam, progress=True, **attack_kwargs)
        rate = float(success.float().mean())
        trials.append({"lamda": lam, "fit_success": rate, "images": len(images)})
        print(f"  λ = {lam:.3g}: success {rate:.3f} on {len(images)} A_fit images")
        return rate >= min_success

    ordered = sorted(set(grid), reverse=True)
    for i, lam in enumerate(ordered):
        if succeeds(lam):
            if refine and i > 0:
                middle = float(np.sqrt(lam * ordered[i - 1]))
                if succeeds(middle):
                    return middle, trials
            return lam, trials
    # None reached it: when the base attack itself (λ = 0, same schedule) falls short of
    # ``min_success`` on these images, the bar becomes the base attack's own success.
    succeeds(0.0)
    base_rate = trials[-1]["fit_success"]
    matching = [t for t in trials[:-1] if t["fit_success"] >= base_rate]
    if matching:
        chosen = max(t["lamda"] for t in matching)
        print(f"  no λ reached {min_success:.0%}; the base attack reaches {base_rate:.3f}: taking the "
              f"largest λ that matches it, {chosen:.3g}")
        return chosen, trials
    best = max(trials[:-1], key=lambda t: (t["fit_success"], t["lamda"]))  # ties: the larger λ
    print(f"  no λ reached {min_success:.0%} nor the base attack's {base_rate:.3f}; taking λ = "
          f"{best['lamda']:.3g} (the best success)")
    return best["lamda"], trials


def load_protocol_sets(run: Path, attack: str, noise: str, arch: str, dataset: str) -> dict[str, Any]:
    """A (the base attack's set), its A_fit / A_eval positions and the noise versions of A."""
    hint = f"run gen_base_adv.py -a {arch} --dataset {dataset} --attack {attack} first"
    base = aesets.load_ae_set(run / attack, hint=hint)
    noise_set = aesets.load_ae_set(run / noise, hint=f"run extract_features.py -a {arch} --dataset {dataset} "
                                                      f"--attack {attack} first (it makes {noise})")
    noisy = noise_set["adv"][aesets.rows_of(noise_set, base["index"], f"noise set {run / noise}", REMAKE_HINT)]
    fit_pos, eval_pos = protocol.fit_eval_split(len(base["index"]))
    return {"base": base, "noisy": noisy, "fit": fit_pos, "eval": eval_pos}


def score_rows(model, fitted: dict[str, detectors.Detector], clean: np.ndarray, noisy: np.ndarray,
               rows: dict[str, tuple[np.ndarray, np.ndarray]], *, device, batch_size: int = 32
               ) -> tuple[dict[str, dict[str, dict]], dict[str, float], dict[str, features.FeatureSet]]:
    """Score benign (clean + noisy) against each row's successful AEs with every detector.

    ``rows`` maps a row name ("base", "hfc", ...) to (AE images, success) of the same images as
    ``clean``. The feature sets are built exactly as ``extract_features.py`` builds them
    (``features.benign_set`` and ``features.adv_set``), so a row scored here equals the same row scored there; the
    benign set is extracted and scored once for all rows.
    Returns ({detector: {row: detection report}}, {row: success rate}, {row: features of its
    successful AEs}); the reports of the per-layer detectors (KD, LID, MAHA, DNN) carry
    ``layer_auc`` {layer name: AUC of that layer's score}."""
    keep_maps = fitted["DNN"].layers_ if "DNN" in fitted else ()
    success_rates, adv_rows = {}, {}
    for row, (adv, success) in rows.items():
        success = np.asarray(success, dtype=bool)
        success_rates[row] = float(success.mean()) if len(success) else 0.0
        if success.sum() < 1:
            raise UserError(f"no successful {row} AE among {len(success)} evaluation images: nothing to score")
        adv_rows[row] = features.adv_set(model, adv, success, device, batch_size, keep_maps, desc=f"{row}: ")
    benign = features.benign_set(model, clean, noisy, device, batch_size, keep_maps)
    # Per-layer AUCs cost nothing more (the combined score is made from the layer scores).
    table = detectors.evaluate_rows(fitted, model, benign, adv_rows, per_layer=True, progress=True)
    return table, success_rates, adv_rows


@torch.no_grad()
def mixture_log_likelihood(model, mixtures: gmm.Mixtures, rows: dict[str, tuple[np.ndarray, np.ndarray]],
                           targets: np.ndarray, device, batch_size: int = 64,
                           extracted: dict[str, features.FeatureSet] | None = None) -> dict[str, float]:
    """Per row, the mean over successful AEs and kept layers of the target class's mixture
    log-likelihood of the AE's pooled features: how typical of the target class they look.
    ``extracted`` (as ``score_rows`` returns it) holds rows whose successful AEs' features are
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
