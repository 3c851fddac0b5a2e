"""Orthogonal PGD (Bryniarski et al., ICLR 2022) against one fitted detector (docs/PROTOCOL.md §9).

A fitted MAHA, KD or DNN detector becomes a differentiable torch function of what the engine
computes at every step, with the call contract of the engine's ``extra`` terms:

- ``score.scores(logits, features)`` -> (B,): the detector's *final* score per image (the value
  its ``score(...)`` thresholds; higher = more adversarial), ``score(logits, features, targets)``
  its batch mean (so it is also a valid λ-term);
- ``score.layers``: the taps it reads (the engine pools only those), or ``score.uses_maps``: it
  reads the un-pooled maps (DNN), which the engine then passes instead of the pooled features;
- ``score.threshold``: the TNR@90 threshold (``calibrate``), a threshold on that score that lets
  90% of the A_fit benign samples (clean + noisy) pass, as ``metrics.benign_pass_threshold``
  defines it (flagged = score strictly above). The detectors store no calibration of their own.

The scores, per detector:

- MAHA: per layer, the smallest ½-Mahalanobis distance over classes (class means, tied
  precision), then the detector's logistic regression over the layers (z-scored, its
  coefficients and intercept): ``MAHA.score`` *without* its input pre-processing step (equal to
  it for ``magnitude=0``);
- KD: −log of the Gaussian kernel density (its bandwidth, stored training features) of the
  *predicted* class (argmax of the logits, chosen without gradient) at its score layer;
- DNN: the mean over its layers of the detector heads' logits ("adversarial") on the maps.

``attack`` runs the engine with ``orthogonal=rule`` (attacks.run_attack's docstring: per image
and step, a detector step orthogonal to the classification gradient or a classifier step
orthogonal to the detector's gradient) at a given schedule, through ``hfc.hfc_attack`` (images
grouped by target, the latest-successful-iterate rule).
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import adaptive
import attacks
import detectors
import features as feature_lib
import hfc
import metrics
from utils import UserError, batches

DETECTORS = ("MAHA", "KD", "DNN")
TNR_TPR = 0.90  # the papers' TNR@90: 90% of the benign samples pass


class DetectorScore(nn.Module):
    """Shared plumbing: the statistics move to the features' device on the first call."""

    name = ""
    uses_maps = False

    def __init__(self, layers: Sequence[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layers = [int(i) for i in layers]
        self.dtype = dtype
        self.threshold: float | None = None

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=self.dtype)

    def _ensure_on(self, like: torch.Tensor) -> None:
        for tensor in (*self.buffers(), *self.parameters()):
            if tensor.device != like.device:
                self.to(like.device)
            return

    def scores(self, logits: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor], targets=None) -> torch.Tensor:
        return self.scores(logits, features).mean()


class MAHAScore(DetectorScore):
    """MAHA's final score (logistic regression over the layers' smallest ½-Mahalanobis distance),
    without input pre-processing."""

    name = "MAHA"

    def __init__(self, detector: detectors.MAHA, dtype: torch.dtype = torch.float32):
        detector._check_fitted()
        super().__init__(detector.layers_, dtype)
        for j, layer in enumerate(self.layers):
            self.register_buffer(f"means_{j}", self._tensor(detector.means_[layer]))
            self.register_buffer(f"precision_{j}", self._tensor(detector.precisions_[layer]))
        logistic = detector.logistic_
        for key in ("mean", "scale", "coef"):
            self.register_buffer(f"lr_{key}", self._tensor(getattr(logistic, key + "_")))
        self.register_buffer("lr_intercept", self._tensor(logistic.intercept_[0]))

    def layer_scores(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """B×L: per layer the smallest ½(f − μ_c)ᵀP(f − μ_c) over the classes c."""
        self._ensure_on(features[self.layers[0]])
        columns = []
        for j, layer in enumerate(self.layers):
            f = features[layer].to(self.dtype)
            diff = f[:, None, :] - getattr(self, f"means_{j}")[None]  # B×K×C
            distances = 0.5 * ((diff @ getattr(self, f"precision_{j}")) * diff).sum(2)
            columns.append(distances.min(dim=1).values)
        return torch.stack(columns, 1)

    def scores(self, logits, features):
        z = (self.layer_scores(features) - self.lr_mean) / self.lr_scale
        return z @ self.lr_coef + self.lr_intercept


class KDScore(DetectorScore):
    """KD's score: −log kernel density of the predicted class at the score layer."""

    name = "KD"

    def __init__(self, detector: detectors.KD, dtype: torch.dtype = torch.float32):
        detector._check_fitted()
        super().__init__([detector.score_layer_], dtype)
        # KD-constrained's term under a given class is this density; here the class is the predicted one.
        self.density = adaptive.KDConstrained(detector, layers=self.layers, dtype=dtype)

    def scores(self, logits, features):
        self._ensure_on(features[self.layers[0]])
        predicted = logits.detach().argmax(dim=1).to(self.density.offsets.device)
        return self.density.layer_values(features, predicted)[:, 0]


class DNNScore(DetectorScore):
    """DNN's score: the mean over its layers of the detector heads' logits on the feature maps."""

    name = "DNN"
    uses_maps = True

    def __init__(self, detector: detectors.DNN, dtype: torch.dtype = torch.float32):
        detector._check_fitted()
        super().__init__(detector.layers_, dtype)
        self.heads = nn.ModuleDict({str(layer): copy.deepcopy(detector.heads_[layer]).eval().to(dtype)
                                    for layer in self.layers})
        for parameter in self.heads.parameters():
            parameter.requires_grad_(False)

    def scores(self, logits, features):
        self._ensure_on(features[self.layers[0]])
        columns = [self.heads[str(layer)](features[layer].to(self.dtype)) for layer in self.layers]
        return torch.stack(columns, 1).mean(dim=1)


SCORES = {"MAHA": MAHAScore, "KD": KDScore, "DNN": DNNScore}


def build(detector: detectors.Detector, dtype: torch.dtype = torch.float32) -> DetectorScore:
    """The differentiable score of a fitted MAHA, KD or DNN detector."""
    if detector.name not in SCORES:
        raise UserError(f"orthogonal PGD has no differentiable score for the {detector.name} detector; "
                        f"expected one of {', '.join(SCORES)}")
    return SCORES[detector.name](detector, dtype=dtype)


@torch.no_grad()
def score_images(model, score: DetectorScore, images, *, device=None, batch_size: int = 32) -> np.ndarray:
    """The score of every image (eval mode, one forward pass per batch; maps are not kept)."""
    images = feature_lib.as_image_tensor(images)
    device = feature_lib.model_device(model) if device is None else torch.device(device)
    model.eval()
    out = np.empty(len(images))
    for part in batches(len(images), batch_size):
        x = images[part].to(device)
        if score.uses_maps:
            logits, feats = model.forward_maps(x)
        else:
            logits, feats = model.forward_features(x, layers=score.layers)
        out[part] = score.scores(logits, feats).double().cpu().numpy()
    return out


def calibrate(score: DetectorScore, model, clean, noisy, *, device=None, batch_size: int = 32,
              tpr: float = TNR_TPR) -> float:
    """Set and return ``score.threshold``: the lowest threshold that lets a fraction ``tpr`` of
    the benign samples (the given clean images, then their noisy versions: A_fit's benign set)
    pass (``metrics.benign_pass_threshold``; flagged = score strictly above)."""
    benign = np.concatenate([score_images(model, score, clean, device=device, batch_size=batch_size),
                             score_images(model, score, noisy, device=device, batch_size=batch_size)])
    score.threshold = metrics.benign_pass_threshold(benign, tpr)
    return score.threshold


def attack(model, score: DetectorScore, images: torch.Tensor, targets: np.ndarray, spec: attacks.AttackSpec, *,
           rule: str = "success", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal PGD against ``score`` (``attacks.run_attack(orthogonal=rule)``) through
    ``hfc.hfc_attack`` (``step_size_256``, ``steps``, ``seed``, ``batch_size``, ``device``,
    ``keep_successful`` ... as there); returns (adv, success)."""
    if rule not in attacks.ORTHOGONAL_RULES:
        raise UserError(f"unknown orthogonal PGD rule {rule!r}; expected one of {', '.join(attacks.ORTHOGONAL_RULES)}")
    return hfc.hfc_attack(model, score, images, targets, spec, lam=1.0, orthogonal=rule, **kwargs)
