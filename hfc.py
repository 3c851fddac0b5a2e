"""The HFC attack as a library (docs/PROTOCOL.md §7): the step schedule, the attack (the engine
with the term), the choice of λ on A_fit, and the results folder's key. Scoring lives in
``evaluation.py``; the mixtures in ``gmm.py``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

import attacks
import gmm
from utils import UserError

# The HFC code's fixed step α in units of 1/256 (docs/PROTOCOL.md §7), keyed by (data set, arch).
PAPER_STEP_256 = {("APTOS", "resnet50"): 0.025, ("APTOS", "vgg16"): 0.1,
                  ("CXR", "resnet50"): 0.01, ("CXR", "vgg16"): 0.04}
# Elsewhere (the synthetic set, the small CPU archs): ε/10 per step, i.e. T = 20.
FALLBACK_STEP_FRACTION = 0.1
DEFAULT_LAMBDA_GRID = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_MIN_SUCCESS = 0.95


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


def results_key(num_component: int, lamda: str, step_size_256: float | None = None, steps: int | None = None,
                last_iterate: bool = False, detector: str | None = None) -> str:
    """The results folder's key for the settings as asked (``hfc_<key>``): ``M<y>_lam<λ or auto>``
    plus ``_a<α>``/``_T<T>`` when given, ``_last`` and ``_det<ATTACK>`` when set. It only keeps runs
    with other settings apart; what a folder holds is read from its record, never from its name."""
    key = f"M{num_component}_lam{lamda_text(lamda)}"
    key += f"_a{step_size_256:g}" if step_size_256 is not None else ""
    key += f"_T{steps}" if steps is not None else ""
    key += "_last" if last_iterate else ""
    return key + (f"_det{detector}" if detector else "")


def lamda_text(lamda: str | float) -> str:
    """``auto`` or the number in its shortest form."""
    return "auto" if str(lamda).lower() == "auto" else f"{float(lamda):g}"


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
                  **attack_kwargs) -> tuple[float, list[dict], str]:
    """λ chosen on the given images (a subset of A_fit: never the evaluation images).

    The bar is the smaller of ``min_success`` and the base attack's own success on these images at
    the same schedule (λ = 0): a constraint cannot make the attack succeed more often than the
    attack without it, so the bar never asks for what the base attack cannot do. ``grid`` is
    tried from the largest value down and the search stops at the first λ that reaches the bar;
    with ``refine`` the geometric midpoint between it and the failed value above is tried too.
    When no value reaches the bar, the one with the best success is taken (ties: the larger).
    Returns λ, the trials and the rule in words (recorded in the results)."""
    trials: list[dict] = []

    def success_of(lam: float) -> float:
        # A trial on real images takes minutes: its progress bar shows (and clears after).
        _, success = hfc_attack(model, term, images, targets, spec, lam=lam, progress=True, **attack_kwargs)
        rate = float(success.float().mean())
        trials.append({"lamda": lam, "fit_success": rate, "images": len(images)})
        print(f"  λ = {lam:.3g}: success {rate:.3f} on {len(images)} A_fit images")
        return rate

    base_rate = success_of(0.0)
    bar = min(min_success, base_rate)
    rule = f"largest λ of the grid with A_fit success ≥ min({min_success:g}, base {base_rate:.3f}) = {bar:.3f}"
    ordered = sorted(set(grid), reverse=True)
    for i, lam in enumerate(ordered):
        if success_of(lam) >= bar:
            if refine and i > 0:
                middle = float(np.sqrt(lam * ordered[i - 1]))
                if success_of(middle) >= bar:
                    return middle, trials, rule
            return lam, trials, rule
    best = max(trials[1:], key=lambda t: (t["fit_success"], t["lamda"]))
    print(f"  no λ reached {bar:.3f}; taking λ = {best['lamda']:.3g} (the best success)")
    return best["lamda"], trials, f"no λ reached {bar:.3f}: the λ with the best A_fit success"
