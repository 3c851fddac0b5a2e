"""The exemplar form of the hierarchical feature constraint: pull an AE's features, at every kept
layer at once, towards one real clean image of the target class instead of towards the modes of
per-layer mixtures.

Why: the mixture term pulls each layer separately towards the mode of one of its components, and
the mode of a density in hundreds of dimensions is far more likely than any real image (a clean
image lies on the density's typical shell). HFC's AEs therefore end up *more* typical than clean
images at some layers and not at others (per-layer MAHA AUCs well under 0.5), a combination no
clean image shows and a detector that combines layers can learn (README, "HFC over-hides"). A real
image's features are typical at every layer and consistent across layers by construction, so the
exemplar form's goal is one point that the detectors have seen the like of.

For an AE with target t and kept layers l with pooled features f_l (C_l channels):

    d_l(f, e) = ‖f_l − e_l‖² / (C_l · s_{l,t})          term = mean_l d_l(f, e*)

where e ranges over the bank (the images of class t that the model classifies as t: by default
the training images, or the validation images, see ``fitted_term``),
e* = argmin_e Σ_l d_l(f, e) is chosen anew at each step without gradient (one exemplar for all
layers: a nearest-neighbour density on the whole hierarchy), and s_{l,t} is the median over
held-out clean images of class t of ‖f_l − e*_l‖²/C_l: a held-out clean image scores about 1 per
layer (``fit_scales``; refitted until the joint choice, which depends on the scales, is stable).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import features
from utils import UserError

SCALE_FLOOR = 1e-12
MAX_SCALE_PASSES = 10


BANKS = ("train", "val")


def fitted_term(run_, model, layers: Sequence[int], device, batch_size: int, bank: str = "train",
                floor: float | None = None) -> "ExemplarTerm":
    """An exemplar term whose bank is the run's correctly classified images of one split part.

    ``bank="train"``: the training images; the scales are measured on the held-out clean images
    (``features.heldout_pooled``). ``bank="val"``: the validation images, held out from the model
    and from every detector's fit, so that the goal is as typical as a *test* image (training
    images are more typical than test images under anything fitted on them, MAHA's class means
    and KD's kernels included); the scales are then measured leaving each validation image out
    of its own choice. ``floor``: see ``ExemplarTerm``."""
    if bank not in BANKS:
        raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
    val = features.part_features(run_, model, "val", device, batch_size)
    num_classes = val.logits.shape[1]
    if bank == "train":
        train = features.part_features(run_, model, "train", device, batch_size)
        correct = train.predictions == train.labels
        term = ExemplarTerm([None if p is None else p[correct] for p in train.pooled], train.labels[correct],
                            layers, num_classes, device=device, floor=floor)
        term.fit_scales(*features.heldout_pooled(val.pooled, val.labels, num_classes, lambda: train))
        return term
    correct = val.predictions == val.labels
    counts = np.bincount(val.labels[correct], minlength=num_classes)
    if (counts < features.MIN_HELDOUT_PER_CLASS).any():
        raise UserError(f"the validation split has {counts.tolist()} correctly classified images per class; the "
                        f"validation exemplars need at least {features.MIN_HELDOUT_PER_CLASS} of each "
                        f"(use the training exemplars)")
    pooled = [None if p is None else p[correct] for p in val.pooled]
    term = ExemplarTerm(pooled, val.labels[correct], layers, num_classes, device=device, floor=floor)
    term.fit_scales(pooled, val.labels[correct], leave_out=np.arange(int(correct.sum())))
    return term


class ExemplarTerm(nn.Module):
    """``term(logits, features, targets)``: the exemplar constraint as the engine's ``extra``.

    ``bank_pooled``: per layer (indices as ``forward_features`` returns them) the pooled features
    of the bank images (N×C; None for layers not kept); ``bank_labels`` their classes. ``layers``
    (attribute) are the layers the engine must compute. ``fit_scales`` must be called on held-out
    clean features before the term is used. ``floor`` (None: off) hinges each layer, max(d_l −
    floor, 0): with floor 1 a layer stops pulling once it is as close to its exemplar as the median
    held-out clean image is to its own, so no layer is pulled to be more typical than clean images
    while another still lags (the over-hiding that MAHA's combination of layers weighs against).
    """

    def __init__(self, bank_pooled: Sequence[np.ndarray | None], bank_labels: np.ndarray, layers: Sequence[int],
                 num_classes: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 floor: float | None = None):
        super().__init__()
        if floor is not None and not floor >= 0:
            raise ValueError(f"floor must be non-negative, got {floor}")
        self.floor = None if floor is None else float(floor)
        self.layers = [int(i) for i in layers]
        if not self.layers:
            raise UserError("the exemplar term needs at least one layer")
        missing = [i for i in self.layers if i >= len(bank_pooled) or bank_pooled[i] is None]
        if missing:
            raise UserError(f"no bank features for layers {missing}")
        bank_labels = np.asarray(bank_labels, np.int64)
        empty = [c for c in range(num_classes) if not np.any(bank_labels == c)]
        if empty:
            raise UserError(f"no correctly classified training image of class(es) {empty} to use as an exemplar")
        self.num_classes = num_classes
        self._moved = device is not None
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"bank_{i}", torch.as_tensor(np.asarray(bank_pooled[layer]), dtype=dtype,
                                                              device=device))
        self.register_buffer("bank_labels", torch.as_tensor(bank_labels, device=device))
        # classes × layers; ones until fit_scales (the raw per-channel squared distance)
        self.register_buffer("scales", torch.ones(num_classes, len(self.layers), dtype=dtype, device=device))
        self.fitted = False

    def _ensure_on(self, like: torch.Tensor) -> None:
        if not self._moved:
            self.to(like.device)
            self._moved = True

    @torch.no_grad()
    def nearest(self, features: Sequence[torch.Tensor], targets: torch.Tensor,
                leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """For each sample, the bank row e* of its target's class minimising Σ_l d_l (no gradient);
        ``leave_out`` (B bank rows, −1 for none) is a row each sample may not choose (itself)."""
        self._ensure_on(features[self.layers[0]])
        targets = targets.to(self.bank_labels.device, torch.long)
        scales = self.scales.index_select(0, targets)  # B×L
        total = None
        for i, layer in enumerate(self.layers):
            bank = getattr(self, f"bank_{i}")
            f = features[layer].detach().to(bank.dtype)
            d = torch.cdist(f, bank).square() / (bank.shape[1] * scales[:, i:i + 1])
            total = d if total is None else total + d
        total = total.masked_fill(self.bank_labels.unsqueeze(0) != targets.unsqueeze(1), float("inf"))
        if leave_out is not None:
            rows = torch.nonzero(leave_out >= 0).squeeze(1)
            total[rows, leave_out[rows]] = float("inf")
        return total.argmin(1)

    def layer_values(self, features: Sequence[torch.Tensor], targets: torch.Tensor,
                     chosen: torch.Tensor | None = None) -> torch.Tensor:
        """B×L: d_l(f, e*) with gradient (e* from ``nearest`` unless given)."""
        if chosen is None:
            chosen = self.nearest(features, targets)
        targets = targets.to(self.bank_labels.device, torch.long)
        scales = self.scales.index_select(0, targets)
        columns = []
        for i, layer in enumerate(self.layers):
            bank = getattr(self, f"bank_{i}")
            f = features[layer].to(bank.dtype)
            columns.append((f - bank.index_select(0, chosen)).square().sum(1) / bank.shape[1])
        return torch.stack(columns, 1) / scales

    @torch.no_grad()
    def fit_scales(self, pooled: Sequence[np.ndarray], labels: np.ndarray,
                   leave_out: np.ndarray | None = None) -> np.ndarray:
        """s (classes × layers): the median over the given held-out clean images of each class of
        their per-layer squared distance (per channel) to their nearest exemplar. The choice of the
        nearest exemplar depends on s, so s is refitted until the choices stop changing (at most
        ``MAX_SCALE_PASSES`` times); then a held-out image scores exactly 1 per layer in the median.
        ``leave_out``: for each held-out image, a bank row it may not choose (itself, when the
        images are the bank; −1 for none). Returns s."""
        labels = np.asarray(labels, np.int64)
        dtype, device = self.bank_0.dtype, self.bank_0.device
        feats = [None if p is None else torch.as_tensor(np.asarray(p), dtype=dtype, device=device) for p in pooled]
        targets = torch.as_tensor(labels, device=device)
        skip = None if leave_out is None else torch.as_tensor(np.asarray(leave_out, np.int64), device=device)
        self.scales.fill_(1.0)
        chosen = self.nearest(feats, targets, skip)
        for _ in range(MAX_SCALE_PASSES):
            raw = (self.layer_values(feats, targets, chosen) * self.scales.index_select(0, targets)).double().cpu()
            scales = features.per_class_median(raw.numpy(), labels, self.num_classes, "the exemplar scales")
            self.scales.copy_(torch.as_tensor(np.maximum(scales, SCALE_FLOOR), dtype=dtype))
            again = self.nearest(feats, targets, skip)
            if torch.equal(again, chosen):
                break
            chosen = again
        self.fitted = True
        return self.scales.double().cpu().numpy()

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("ExemplarTerm needs fit_scales(pooled, labels) on held-out clean images first")
        values = self.layer_values(features, targets)
        if self.floor is not None:
            values = (values - self.floor).clamp_min(0.0)
        return values.mean(1).mean()

    def describe(self) -> str:
        hinge = "" if self.floor is None else f", each hinged at {self.floor:g}"
        return f"distance to the nearest clean exemplar over {len(self.layers)} layers (normalised{hinge}, averaged)"
