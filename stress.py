"""The stress test (docs/PROTOCOL.md §11): how far an L∞ budget can push a model's features.

Two measurements per stage-end layer (``model.stage_end_layers``):

- **Deviation.** The feature-deviation attack maximises, one layer at a time, the Mahalanobis
  distance of an image's pooled feature from the clean statistics of its own class (mean and
  Ledoit–Wolf covariance of the run's training features). The result is read against the clean
  images' own spread: the ratio of the AEs' median distance to the 99th percentile of the clean
  test images' distances. A ratio above 1 means the budget carries a typical image beyond
  nearly every clean one.
- **Direction consistency.** For a targeted base attack, the shift f_adv − f_clean of each image at
  each layer; the mean pairwise cosine of these shifts among images with the same target (pairs
  pooled over targets). Near 1: every image moves the same way; near 0: no common direction.

Both are the TMI paper's evidence that medical features are fragile (claims 2 and 5); the
comparison with a natural-image model trained the same way is ``side_by_side``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

import attacks

EPSILONS_256 = (0.25, 0.5, 1.0, 2.0, 4.0)
PERCENTILE = 99.0


@dataclass
class ClassStatistics:
    """Per class: the mean (K×C) and the precision (K×C×C, from a Ledoit–Wolf shrunk covariance,
    well defined with fewer samples than channels) of one layer's pooled features."""
    means: np.ndarray
    precisions: np.ndarray

    @classmethod
    def fit(cls, pooled: np.ndarray, labels: np.ndarray, num_classes: int) -> "ClassStatistics":
        pooled = np.asarray(pooled, dtype=np.float64)
        labels = np.asarray(labels)
        means, precisions = [], []
        for c in range(num_classes):
            members = pooled[labels == c]
            if len(members) < 2:
                raise ValueError(f"class {c} has {len(members)} training samples; at least 2 are needed")
            estimator = LedoitWolf().fit(members)
            means.append(estimator.location_)
            precisions.append(estimator.precision_)
        return cls(np.stack(means), np.stack(precisions))

    def distances(self, pooled: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row from the statistics of its class (NumPy)."""
        pooled = np.asarray(pooled, dtype=np.float64)
        labels = np.asarray(labels)
        squared = np.zeros(len(pooled))
        for c in np.unique(labels):  # one C×C product per class: never an N×C×C gather
            rows = labels == c
            diff = pooled[rows] - self.means[c]
            squared[rows] = np.einsum("ni,ni->n", diff @ self.precisions[c], diff)
        return np.sqrt(np.maximum(squared, 0.0))


class DeviationTerm:
    """The feature-deviation attack's ``extra`` for the engine: minus the mean Mahalanobis distance of
    tap ``layer``'s pooled feature from its class's clean statistics. The engine passes each
    image's *true* label as its "target" and runs with ``loss="none"``: no classification goal,
    and the network is run only as far as the tap (``tap``)."""

    def __init__(self, statistics: ClassStatistics, layer: int, device: torch.device | str = "cpu"):
        self.tap = layer
        self.means = torch.as_tensor(statistics.means, dtype=torch.float32, device=device)
        # The precision's Cholesky factor L (P = L Lᵀ): the squared distance is ‖(f − μ) L‖².
        self.factors = torch.as_tensor(np.linalg.cholesky(statistics.precisions), dtype=torch.float32, device=device)

    def distances(self, feature: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        squared = feature.new_zeros(len(feature))
        for c in torch.unique(labels).tolist():  # one C×C product per class, not one per image
            rows = torch.nonzero(labels == c).squeeze(1)
            value = ((feature[rows] - self.means[c]) @ self.factors[c]).pow(2).sum(1)
            squared = squared.index_put((rows,), value)
        return squared.clamp_min(1e-12).sqrt()

    def __call__(self, logits: torch.Tensor, features: list, labels: torch.Tensor) -> torch.Tensor:
        return -self.distances(features[self.tap], labels).mean()


def deviation_attack(model, images: torch.Tensor, labels: np.ndarray, statistics: ClassStatistics, layer: int,
                     eps_256: float, *, device, seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """The L∞ feature-deviation attack on one tap: the engine's I_FGSM schedule (T = 10 steps of
    ε/5, signed) maximising ``DeviationTerm``; returns the AEs (CPU)."""
    spec = attacks.parse_attack(f"I_FGSM_Linf_{eps_256:g}")
    term = DeviationTerm(statistics, layer, device)
    adv, _ = attacks.run_attack(model, images, labels, spec, extra=term, lam=1.0, seed=seed, batch_size=batch_size,
                                device=device, progress=False, loss="none", keep_successful=False)
    return adv


def deviation_summary(adv_distances: np.ndarray, clean_distances: np.ndarray,
                      reference_distances: np.ndarray) -> dict:
    """The deviation numbers of one (ε, layer): medians of the AEs' and of the same images' clean
    distances, the clean reference's 99th percentile, and the ratio that the test reports."""
    p99 = float(np.percentile(reference_distances, PERCENTILE))
    median_adv = float(np.median(adv_distances))
    return {"median_deviation": median_adv, "median_clean": float(np.median(clean_distances)),
            "clean_p99": p99, "ratio_to_clean_p99": median_adv / p99 if p99 > 0 else float("inf")}


def direction_consistency(shifts: np.ndarray, targets: np.ndarray) -> float:
    """Mean pairwise cosine of the rows of ``shifts`` (N×C) among rows with the same target,
    over all such pairs (rows with a zero shift are left out)."""
    shifts = np.asarray(shifts, dtype=np.float64)
    targets = np.asarray(targets)
    total, pairs = 0.0, 0
    for target in np.unique(targets):
        group = shifts[targets == target]
        norms = np.linalg.norm(group, axis=1)
        group = group[norms > 0] / norms[norms > 0, None]
        n = len(group)
        if n < 2:
            continue
        summed = group.sum(axis=0)
        # Σ_{i≠j} cos(i, j) = ‖Σ_i u_i‖² − n for unit rows u_i.
        total += float(summed @ summed) - n
        pairs += n * (n - 1)
    return total / pairs if pairs else float("nan")
