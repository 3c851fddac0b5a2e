"""The competing adaptive attacks of docs/PROTOCOL.md §9 as ``extra`` terms of the one L∞ engine.

Each term has HFCTerm's call contract: ``term(logits, features, targets)`` -> a batch-mean scalar
to minimise, where ``features`` is the list of pooled hierarchical features (N×C per layer, None
for a layer not asked for) and ``term.layers`` the indices it reads (the engine pools only those).
Each is built from fitted artifacts of the run: the detectors' stored training features, class
statistics and reference batch. Statistics move to torch once (``device``/``dtype`` as given, or
the features' device on the first call).

Per sample, each term gives one value per kept layer (``layer_values``: B×L). The paper form
reduces them over the layers (each term's own reduction, below). ``normalise=True`` is the
analogue of HFC's ``--term normalised``: each layer's value, less its x-independent constant
(``offsets``: non-zero for KD only), is divided by its median over held-out clean images of the
target class (``fit_scales``; compare.py uses the run's validation images), and the layers are
averaged, so that a held-out clean image scores about 1.

``RandomGuide`` needs one guide per attacked image: bind the guides with ``term.guiding(rows,
targets)`` for exactly the images one engine batch sees, in its order, or attack through
``attack`` below, which does that batch by batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import detectors
import hfc
from utils import UserError, batches

REDUCTIONS = ("sum", "mean")


def _pairwise_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """B×R squared Euclidean distances (expanded form, clipped at 0 like detectors.squared_distances)."""
    sq = x.square().sum(1, keepdim=True) + y.square().sum(1)[None, :] - 2.0 * (x @ y.T)
    return sq.clamp_min(0.0)


class AdaptiveTerm(nn.Module):
    """Shared plumbing: layers, the reduction over layers, the normalised form and its scales.

    Subclasses implement ``layer_values(features, targets) -> B×L`` (differentiable) and may set
    ``offsets`` (L, the part of each layer's value that does not depend on the features)."""

    default_reduce = "mean"
    per_image = False

    def __init__(self, layers: Sequence[int], num_classes: int, normalise: bool = False, reduce: str | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layers = [int(i) for i in layers]
        if not self.layers:
            raise UserError(f"{type(self).__name__}: no layers to constrain")
        self.num_classes = int(num_classes)
        self.normalise = bool(normalise)
        self.reduce = reduce or ("mean" if normalise else self.default_reduce)
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")
        self.dtype = dtype
        self._moved = device is not None
        self._device = device
        self.register_buffer("offsets", torch.zeros(len(self.layers), dtype=dtype, device=device))
        self.register_buffer("scales", None)  # classes × layers, once fit_scales has measured them

    def _ensure_on(self, like: torch.Tensor) -> None:
        if not self._moved:
            self.to(like.device)
            self._moved = True

    def _tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=self.dtype, device=self._device)

    def layer_values(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        self._ensure_on(features[self.layers[0]])
        targets = targets.to(self.offsets.device, torch.long)
        values = self.layer_values(features, targets)
        if self.normalise:
            if self.scales is None:
                raise RuntimeError(f"{type(self).__name__}(normalise=True) needs fit_scales(...) on held-out images")
            values = (values - self.offsets) / self.scales.index_select(0, targets)
        return (values.sum(1) if self.reduce == "sum" else values.mean(1)).mean()

    @torch.no_grad()
    def fit_scales(self, pooled: Sequence[np.ndarray], labels: np.ndarray) -> np.ndarray:
        """Per (class, kept layer): the median over the given held-out clean images of that class
        of the layer's value less its offset, with the image's own class as the target. Stored as
        the normalised form's divisors (floored at 1e-12); returns them (classes × layers)."""
        labels = np.asarray(labels, np.int64)
        missing = [c for c in range(self.num_classes) if not np.any(labels == c)]
        if missing:
            raise UserError(f"no held-out image of class(es) {missing} to measure the normalised term's scale on")
        where = dict(dtype=self.offsets.dtype, device=self.offsets.device)
        feats = [None if p is None else torch.as_tensor(np.asarray(p), **where) for p in pooled]
        targets = torch.as_tensor(labels, device=self.offsets.device)
        values = (self.layer_values(feats, targets) - self.offsets).double().cpu().numpy()
        table = np.stack([np.median(values[labels == c], axis=0) for c in range(self.num_classes)])
        table = np.maximum(table, 1e-12)
        self.scales = torch.as_tensor(table, dtype=self.offsets.dtype, device=self.offsets.device)
        return table


class RandomGuide(AdaptiveTerm):
    """Feature adversaries (Sabour et al., "Adversarial manipulation of deep representations",
    ICLR 2016): per image a seeded random clean training image of the target class is its guide;
    per kept layer ‖f − f_guide‖²/C, averaged over the layers. ``pool``: pooled training features
    indexed by layer (None where not kept), ``pool_labels`` their classes."""

    per_image = True

    def __init__(self, pool: Sequence[np.ndarray | None], pool_labels: np.ndarray, layers: Sequence[int],
                 num_classes: int | None = None, **kwargs):
        pool_labels = np.asarray(pool_labels, np.int64)
        super().__init__(layers, int(pool_labels.max()) + 1 if num_classes is None else num_classes, **kwargs)
        absent = [i for i in self.layers if i >= len(pool) or pool[i] is None]
        if absent:
            raise UserError(f"random guide: no training features for layers {absent}")
        empty = [c for c in range(self.num_classes) if not np.any(pool_labels == c)]
        if empty:
            raise UserError(f"random guide: no training image of class(es) {empty} to guide towards")
        self.pool_labels = pool_labels
        for j, layer in enumerate(self.layers):
            self.register_buffer(f"pool_{j}", self._tensor(pool[layer]))
        self._rows: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None

    def draw(self, targets: np.ndarray, seed: int) -> np.ndarray:
        """For each target, a random pool row of that class (seeded): the images' guides."""
        targets = np.asarray(targets, np.int64)
        rng = np.random.default_rng(seed)
        rows = np.empty(len(targets), np.int64)
        for c in range(self.num_classes):
            members = np.flatnonzero(self.pool_labels == c)
            at = np.flatnonzero(targets == c)
            rows[at] = members[rng.integers(0, len(members), size=len(at))]
        return rows

    @contextlib.contextmanager
    def guiding(self, rows: np.ndarray, targets: np.ndarray):
        """Bind the guides (pool rows) of the images the next engine calls see, in their order.
        A call with other targets (another batch, another order) is an error, never a silent
        mismatch."""
        rows = np.asarray(rows, np.int64)
        wrong = self.pool_labels[rows] != np.asarray(targets)
        if wrong.any():
            raise ValueError(f"{int(wrong.sum())} guides are not of their image's target class")
        self._rows = torch.as_tensor(rows)
        self._targets = torch.as_tensor(np.asarray(targets, np.int64))
        try:
            yield self
        finally:
            self._rows = self._targets = None

    def layer_values(self, features, targets):
        if self._rows is None:
            raise RuntimeError("RandomGuide needs its images' guides: use term.guiding(rows, targets) "
                               "or adaptive.attack")
        if len(targets) != len(self._rows) or not torch.equal(targets.cpu(), self._targets):
            raise RuntimeError(f"RandomGuide is bound to {len(self._rows)} images with other targets than the "
                               f"{len(targets)} it was called with (one engine batch per binding)")
        rows = self._rows.to(self.offsets.device)
        columns = []
        for j, layer in enumerate(self.layers):
            f = features[layer].to(self.offsets.dtype)
            guide = getattr(self, f"pool_{j}").index_select(0, rows)
            columns.append((f - guide).square().sum(1) / f.shape[1])
        return torch.stack(columns, 1)


class KDConstrained(AdaptiveTerm):
    """KD-constrained attack (Carlini & Wagner, "Adversarial examples are not easily detected",
    AISec 2017): per kept layer, minus the log Gaussian kernel density of the target class's
    clean training features, with the KD detector's bandwidth and stored features (default: its
    score layer), i.e. the KD detector's score under the target class; summed over layers.
    ``offsets`` = ½·C·log(2πh²), so the normalised form divides ``log M − logsumexp(−d²/2h²) ≥ 0``."""

    default_reduce = "sum"

    def __init__(self, detector: detectors.KD, layers: Sequence[int] | None = None, **kwargs):
        detector._check_fitted()
        layers = [detector.score_layer_] if layers is None else list(layers)
        unknown = [i for i in layers if i not in detector.train_features_]
        if unknown:
            raise UserError(f"the KD detector holds no training features for layers {unknown}")
        super().__init__(layers, detector.num_classes_, **kwargs)
        self.bandwidth = float(detector.bandwidth)
        labels = np.asarray(detector.train_labels_, np.int64)
        self.counts = [int((labels == c).sum()) for c in range(self.num_classes)]
        channels = []
        for j, layer in enumerate(self.layers):
            train = np.asarray(detector.train_features_[layer], np.float64)
            channels.append(train.shape[1])
            for c in range(self.num_classes):
                self.register_buffer(f"train_{j}_{c}", self._tensor(train[labels == c]))
        h2 = self.bandwidth ** 2
        self.offsets = self._tensor([0.5 * C * math.log(2 * math.pi * h2) for C in channels])

    def layer_values(self, features, targets):
        present = torch.unique(targets).tolist()
        two_h2 = 2.0 * self.bandwidth ** 2
        columns = []
        for j, layer in enumerate(self.layers):
            f = features[layer].to(self.offsets.dtype)
            parts, order = [], []
            for c in present:
                idx = torch.nonzero(targets == c).squeeze(1) if len(present) > 1 else None
                fc = f if idx is None else f.index_select(0, idx)
                sq = _pairwise_sq(fc, getattr(self, f"train_{j}_{c}"))
                parts.append(math.log(self.counts[c]) - torch.logsumexp(-sq / two_h2, dim=1) + self.offsets[j])
                order.append(idx)
            if len(parts) == 1:
                columns.append(parts[0])
            else:
                position = torch.cat(order)
                columns.append(torch.cat(parts)[torch.argsort(position)])
        return torch.stack(columns, 1)


class LIDConstrained(AdaptiveTerm):
    """LID-constrained attack (the HFC papers' competitor; the estimate is Ma et al.'s, ICLR 2018):
    per layer of the LID detector, the MLE LID of the feature from its k nearest neighbours in
    the detector's clean reference batch (as ``detectors.lid_mle`` computes it), averaged over
    the layers."""

    def __init__(self, detector: detectors.LID, layers: Sequence[int] | None = None, num_classes: int = 2,
                 **kwargs):
        detector._check_fitted()
        layers = list(detector.layers_) if layers is None else list(layers)
        unknown = [i for i in layers if i not in detector.reference_]
        if unknown:
            raise UserError(f"the LID detector holds no reference batch for layers {unknown}")
        super().__init__(layers, num_classes, **kwargs)
        self.k = int(detector.k)
        for j, layer in enumerate(self.layers):
            reference = np.asarray(detector.reference_[layer])
            if not 1 <= self.k <= len(reference):
                raise UserError(f"LID k = {self.k} exceeds the reference batch of {len(reference)}")
            self.register_buffer(f"reference_{j}", self._tensor(reference))

    def layer_values(self, features, targets):
        columns = []
        for j, layer in enumerate(self.layers):
            f = features[layer].to(self.offsets.dtype)
            dist = _pairwise_sq(f, getattr(self, f"reference_{j}")).clamp_min(1e-24).sqrt()  # ≥ 1e-12 as lid_mle
            nearest = torch.topk(dist, self.k, dim=1, largest=False, sorted=True).values
            mean_log = torch.log(nearest / nearest[:, -1:]).mean(1).clamp(max=-1e-12)
            columns.append(-1.0 / mean_log)
        return torch.stack(columns, 1)


class MAHAConstrained(AdaptiveTerm):
    """MAHA-constrained attack (a reference the HFC papers did not run; the statistic is Lee et
    al.'s, NeurIPS 2018): per MAHA layer, ½(f − μ_t)ᵀ P (f − μ_t) with the detector's class mean of
    the target t and its tied precision P -- HFC with one component and a shared covariance;
    summed over layers."""

    default_reduce = "sum"

    def __init__(self, detector: detectors.MAHA, layers: Sequence[int] | None = None, **kwargs):
        detector._check_fitted()
        layers = list(detector.layers_) if layers is None else list(layers)
        unknown = [i for i in layers if i not in detector.means_]
        if unknown:
            raise UserError(f"the MAHA detector holds no class statistics for layers {unknown}")
        super().__init__(layers, len(detector.means_[layers[0]]), **kwargs)
        for j, layer in enumerate(self.layers):
            self.register_buffer(f"means_{j}", self._tensor(detector.means_[layer]))
            self.register_buffer(f"precision_{j}", self._tensor(detector.precisions_[layer]))

    def layer_values(self, features, targets):
        columns = []
        for j, layer in enumerate(self.layers):
            f = features[layer].to(self.offsets.dtype)
            diff = f - getattr(self, f"means_{j}").index_select(0, targets)
            columns.append(0.5 * ((diff @ getattr(self, f"precision_{j}")) * diff).sum(1))
        return torch.stack(columns, 1)


def attack(model, term, images: torch.Tensor, targets: np.ndarray, spec, *, lam: float, batch_size: int,
           seed: int, guides: np.ndarray | None = None, progress: bool = True, **kwargs
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``hfc.hfc_attack`` with any term (None or λ = 0: the base method at the given schedule).

    A per-image term (``RandomGuide``) needs ``guides`` (pool rows, one per image): the images
    are then attacked in hfc_attack's order (grouped by target) one batch per call, each with
    its guides bound, and the call for batch b uses seed + b."""
    if term is None or lam == 0 or not getattr(term, "per_image", False):
        return hfc.hfc_attack(model, term, images, targets, spec, lam=lam, batch_size=batch_size, seed=seed,
                              progress=progress, **kwargs)
    targets = np.asarray(targets, np.int64)
    if guides is None or len(guides) != len(targets):
        raise ValueError(f"{type(term).__name__} needs one guide per image")
    order = np.argsort(targets, kind="stable")
    adv = torch.empty(images.shape, dtype=torch.float32)
    success = torch.empty(len(images), dtype=torch.bool)
    parts = list(batches(len(order), batch_size))
    for number, part in enumerate(tqdm(parts, desc=f"{spec.name} + {type(term).__name__}", disable=not progress,
                                       leave=False)):
        rows = order[part]
        with term.guiding(np.asarray(guides)[rows], targets[rows]):
            a, s = hfc.hfc_attack(model, term, images[torch.from_numpy(rows)], targets[rows], spec, lam=lam,
                                  batch_size=len(rows), seed=seed + number, progress=False, **kwargs)
        adv[torch.from_numpy(rows)], success[torch.from_numpy(rows)] = a, s
    return adv, success
