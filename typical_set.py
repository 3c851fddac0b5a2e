"""Typical-set HFC (docs/PROTOCOL.md §10): the attacker's reply to the two-sided typicality detector.

HFC pulls an AE's features towards the mode of a component of the target class's mixture, where the
log-likelihood is far *higher* than that of clean images (the typical set of a density in C
dimensions is a shell well below its mode): a defender who watches both tails (``detectors.TYP``)
sees that. The typical-set term instead asks the AE's log-likelihood to equal that of a typical clean
image of the target class. For target t and each kept layer l with pooled feature f:

    term_l = (ℓ_l(f) − τ_{l,t})²,   ℓ_l(f) = log Σ_k π_k N(f; μ_k, Σ_k)   (the full mixture of t at l)

with τ_{l,t} the median log-likelihood of held-out clean images of class t at layer l under the same
(the attacker's) mixtures (``fit_targets``; arms_race.py uses the run's validation images). ℓ is the
exact mixture log-likelihood (``gmm.MixtureParams.log_likelihood``), differentiable: all M
components are scored with gradient (log-sum-exp), about twice the work of one HFC step's scoring.

Forms, as for ``hfc.HFCTerm``: ``normalise=False`` (the default, with ``reduce="sum"``) sums the raw
squared gaps over the layers; ``normalise=True`` (with ``reduce="mean"``) divides each layer's gap
by its clean held-out scale, the median over the same held-out images of class t of
(ℓ_l − τ_{l,t})² (the squared median absolute deviation of ℓ_l), and averages over the layers: a
held-out clean image then scores about 1 per layer, whatever the layer's likelihood scale.
``hfc_term`` (optional) adds an HFC term (in its own form) to the value: both constraints at once.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import features
import gmm
import hfc
from utils import UserError

SCALE_FLOOR = 1e-12


def fitted_term(run_, model, mixtures: gmm.Mixtures, device, batch_size: int, *,
                normalise: bool = True) -> "TypicalSetTerm":
    """A typical-set term on ``mixtures`` with τ (and the scales) measured on the run's held-out
    clean images (``features.heldout_pooled``; the features are ``features.part_features``' cached ones)."""
    term = TypicalSetTerm(mixtures, normalise=normalise, device=device)
    val = features.part_features(run_, model, "val", device, batch_size)
    pooled, labels = features.heldout_pooled(val.pooled, val.labels, term.num_classes,
                                    lambda: features.part_features(run_, model, "train", device, batch_size))
    term.fit_targets(pooled, labels)
    return term


class TypicalSetTerm(nn.Module):
    """``term(logits, features, targets)``: the typical-set constraint as the engine's ``extra``.

    ``features`` is the list of pooled hierarchical features (None where not computed); ``layers``
    (attribute) are the indices the engine must compute: the mixtures' layers (or those given),
    plus the HFC term's when ``hfc_term`` is set. ``fit_targets(pooled, labels)`` must be called
    (held-out clean features) before the term is used: it sets τ and the normalised form's scales.
    """

    def __init__(self, mixtures: gmm.Mixtures, layers: Sequence[int] | None = None, *, normalise: bool = False,
                 reduce: str | None = None, hfc_term: hfc.HFCTerm | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ts_layers = [int(i) for i in (mixtures.layers if layers is None else layers)]
        unknown = [i for i in self.ts_layers if i not in mixtures.layers]
        if unknown or not self.ts_layers:
            raise UserError(f"no mixtures for layers {unknown or '(none given)'}; fitted layers: {mixtures.layers}")
        if mixtures.classes != list(range(len(mixtures.classes))):
            raise ValueError(f"mixture classes must be 0..K-1, got {mixtures.classes}")
        self.normalise = bool(normalise)
        self.reduce = reduce or ("mean" if normalise else "sum")
        if self.reduce not in gmm.REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(gmm.REDUCTIONS)}, got {self.reduce!r}")
        self.hfc_term = hfc_term
        self.layers = sorted(set(self.ts_layers) | set(hfc_term.layers if hfc_term is not None else ()))
        self.num_classes = len(mixtures.classes)
        self._moved = device is not None
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        for i, layer in enumerate(self.ts_layers):
            means, chol, const = gmm.stacked_layer(mixtures, layer, np_dtype)
            # The log-likelihood needs the Gaussian's normalising constant too (the HFC term does not).
            const = const - 0.5 * means.shape[2] * math.log(2 * math.pi)
            self.register_buffer(f"means_{i}", torch.from_numpy(means).to(device))
            self.register_buffer(f"chol_{i}", torch.from_numpy(chol).to(device))
            self.register_buffer(f"const_{i}", torch.as_tensor(const, dtype=dtype, device=device))
        self.register_buffer("tau", None)  # classes × layers, set by fit_targets
        self.register_buffer("scales", None)

    def _ensure_on(self, like: torch.Tensor) -> None:
        if not self._moved:
            self.to(like.device)
            self._moved = True

    @staticmethod
    def _class_log_likelihood(f, means_c, chol_c, const_c):
        diff = f.unsqueeze(0) - means_c.unsqueeze(1)  # M×n×C
        y = torch.bmm(diff, chol_c)  # (f − μ_k) L_k for every component
        return torch.logsumexp(const_c[:, None] - 0.5 * y.square().sum(2), dim=0)

    def log_likelihoods(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """B×L: ℓ_l(f) under the target class's mixture at each of ``ts_layers`` (with gradient)."""
        self._ensure_on(features[self.ts_layers[0]])
        device = self.means_0.device
        targets = targets.to(device, torch.long)
        present = torch.unique(targets).tolist()
        groups = [(c, None if len(present) == 1 else torch.nonzero(targets == c).squeeze(1)) for c in present]
        columns = []
        for i, layer in enumerate(self.ts_layers):
            means, chol, const = getattr(self, f"means_{i}"), getattr(self, f"chol_{i}"), getattr(self, f"const_{i}")
            f = features[layer].to(means.dtype)
            if groups[0][1] is None:
                c = groups[0][0]
                columns.append(self._class_log_likelihood(f, means[c], chol[c], const[c]))
                continue
            out = f.new_zeros(len(f))
            for c, idx in groups:
                out = out.index_copy(0, idx, self._class_log_likelihood(f.index_select(0, idx), means[c], chol[c],
                                                                        const[c]))
            columns.append(out)
        return torch.stack(columns, 1)

    @torch.no_grad()
    def fit_targets(self, pooled: Sequence[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """τ (classes × layers): the median ℓ of the given held-out clean images of each class under
        that class's mixture; and the normalised form's scales, the median of (ℓ − τ)² over the same
        images (floored at 1e-12). Every class needs at least one image. Returns (τ, scales)."""
        labels = np.asarray(labels, np.int64)
        dtype, device = self.means_0.dtype, self.means_0.device
        feats = [None if p is None else torch.as_tensor(np.asarray(p), dtype=dtype, device=device) for p in pooled]
        values = self.log_likelihoods(feats, torch.as_tensor(labels, device=device)).double().cpu().numpy()
        tau = features.per_class_median(values, labels, self.num_classes, "the typical log-likelihood")
        gaps = (values - tau[labels]) ** 2
        scales = np.maximum(features.per_class_median(gaps, labels, self.num_classes, "the typical log-likelihood"),
                            SCALE_FLOOR)
        self.tau = torch.as_tensor(tau, dtype=dtype, device=device)
        self.scales = torch.as_tensor(scales, dtype=dtype, device=device)
        return tau, scales

    def layer_values(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """B×L: (ℓ_l − τ_{l,t})², divided by the held-out scale of (l, t) with ``normalise``."""
        if self.tau is None:
            raise RuntimeError("TypicalSetTerm needs fit_targets(pooled, labels) on held-out clean images first")
        ll = self.log_likelihoods(features, targets)
        targets = targets.to(self.tau.device, torch.long)
        values = (ll - self.tau.index_select(0, targets)).square()
        if self.normalise:
            values = values / self.scales.index_select(0, targets)
        return values

    def forward(self, logits: torch.Tensor, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        values = self.layer_values(features, targets)
        value = (values.sum(1) if self.reduce == "sum" else values.mean(1)).mean()
        if self.hfc_term is not None:
            value = value + self.hfc_term(logits, features, targets)
        return value

    def describe(self) -> str:
        form = "normalised, averaged over layers" if self.normalise else "raw, summed over layers"
        return f"(ℓ − τ)² per layer ({form})" + (" + the HFC term" if self.hfc_term is not None else "")
