"""The evaluation protocol shared by every stage (docs/PROTOCOL.md §6).

A = the correctly classified test images in a seeded order (fixed by ``gen_base_adv.py`` and
saved with every AE set). The first 70% of A is A_fit, the rest A_eval: detectors are fitted on
A_fit and scored on A_eval; the HFC attack attacks A_eval.
"""
from __future__ import annotations

import numpy as np

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
