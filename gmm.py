"""Per-layer, per-class Gaussian mixtures of the pooled features: fit, save, load, score (docs/PROTOCOL.md §7).

For every class c and every kept hierarchical conv layer l, a full-covariance Gaussian mixture is
fitted to the pooled training features of class c at layer l (scikit-learn's
``BayesianGaussianMixture`` as in the HFC code, plain EM ``GaussianMixture`` as an option).
``Mixtures`` holds the fitted parameters as plain arrays (saved as ``mixtures.npz`` +
``summary.json``, no pickle); the HFC term built from them (``hfc.HFCTerm``) lives with the attack.

Component scores. With ``L_k`` the precision Cholesky factor (scikit-learn's
``precisions_cholesky_``: upper triangular, precision = L Lᵀ), a component's log-density is
``log_prior_k + Σ log diag(L_k) − ½·C·log 2π − ½‖(f − μ_k) L_k‖²``. For EM, ``log_prior_k`` is
``log π_k``. For the Bayesian (variational) mixture, scikit-learn scores a component with the
expected log weight plus an expected-precision correction per component; both are folded into
``log_prior_k`` so that ``component_log_prob`` equals scikit-learn's ``_estimate_weighted_log_prob``
and ``log_likelihood`` its ``score_samples`` for either kind. The HFC component choice uses the same
scores (the constant ``½·C·log 2π`` does not change the argmax).

Small-sample regime (a few hundred samples per class, up to 512 dimensions, M up to 64): a
component's empirical covariance is rank-deficient, so the diagonal regulariser decides the
precision in the directions the data do not span. ``reg_covar`` is therefore *relative*: the value
handed to scikit-learn is ``reg_covar × (mean per-channel variance of that class at that layer)``,
which makes it independent of the feature scale of each layer. With ``reg_scale="channel"`` the
regulariser is per channel instead: each channel is divided by its own training standard deviation
before the fit (``reg_covar × 1`` is then added in those units) and the fitted means and precision
factors are mapped back, so the regulariser is ``reg_covar × diag(per-channel variance)``. A
scalar regulariser at the *mean* variance swamps the channels whose clean variance is far below
the mean (two orders of magnitude in ResNet-50's last layer), so the term hardly weighs them; per
channel, every channel counts on its own scale, and the fit no longer depends on how each channel
happens to be scaled. M is clamped to
``n_samples // min_samples_per_component`` per (layer, class) fit (k-means initialisation needs at
least one sample per component, and a component needs a few to mean anything); every clamp is
recorded in the summary.

Held-out scale of the term. A mixture fitted on a few hundred samples in hundreds of dimensions
fits those samples, not the class: on held-out clean images of the class the term
``(1/C)‖(f − μ_k*) L_k*‖²`` is far above its training value (≈1 per layer for a density that fits),
and grows with depth. ``term_scales`` measures, per (layer, class), the median term over held-out
clean images of that class (get_GMM.py uses the run's validation part); ``Mixtures`` carries them
as ``scales`` (saved in ``mixtures.npz``, reported in the summary as the fit report), and
``hfc.HFCTerm(normalise=True)`` divides each layer's term by the scale of the sample's target class, so
that a held-out clean image scores ≈1 per layer on every layer and every model.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import digamma, logsumexp

from utils import UserError, load_npz, read_json, save_npz, write_json

DEFAULT_MAX_CHANNELS = 512
DEFAULT_NUM_COMPONENTS = 8  # the paper's README uses 64; why 8 on a CPU: get_GMM.py --help
DEFAULT_REG_COVAR = 1e-3  # relative to the mean per-channel variance (see module docstring)
DEFAULT_MAX_ITER = 100  # scikit-learn's default
REG_SCALES = ("mean", "channel")  # reg_covar relative to the mean variance, or to each channel's
# With reg_scale="channel", a channel whose training variance is below this fraction of the mean
# (dead ReLUs: 0) is scaled as if it had this variance, so its z-units stay finite.
CHANNEL_VARIANCE_FLOOR = 1e-2
DEFAULT_MIN_SAMPLES_PER_COMPONENT = 4
KINDS = ("bayesian", "em")
# Each component's covariance: full (the paper's) or diagonal (one variance per channel: with a few
# dozen samples per component in up to 2048 dimensions it is estimated from the data in every
# direction instead of being left to the regulariser).
COVARIANCES = ("full", "diag")
MIXTURES_NAME = "mixtures.npz"
SUMMARY_NAME = "summary.json"
_REG_RETRIES = 4  # a fit whose covariance is not positive definite is retried with 10x reg_covar
SCALE_FLOOR = 1e-12  # a layer whose held-out term is 0 (dead features) is not divided by 0
REDUCTIONS = ("sum", "mean")


def select_layers(model_or_channels, conv_layers: Sequence[int] | None = None,
                  max_channels: int = DEFAULT_MAX_CHANNELS) -> list[int]:
    """Indices of the hierarchical conv layers with at most ``max_channels`` channels.

    ``model_or_channels`` is a ``HierarchicalNet`` (its ``layer_channels`` and ``conv_layers`` are
    used) or a list of channel counts, in which case ``conv_layers`` must be given.
    """
    if isinstance(model_or_channels, (list, tuple, np.ndarray)):
        channels = list(model_or_channels)
        if conv_layers is None:
            raise ValueError("select_layers: conv_layers is required with a list of channel counts")
    else:
        channels = list(model_or_channels.layer_channels)
        conv_layers = model_or_channels.conv_layers if conv_layers is None else conv_layers
    return [int(i) for i in conv_layers if channels[i] <= max_channels]


@dataclass
class MixtureParams:
    """One fitted mixture (one layer, one class); arrays in float64."""

    means: np.ndarray  # M×C
    prec_chol: np.ndarray  # M×C×C, upper triangular, precision = L Lᵀ
    weights: np.ndarray  # M, the mixing weights (weights_)
    log_prior: np.ndarray  # M, additive log-score per component (log π_k for EM; see docstring)
    avg_log_likelihood: float
    converged: bool
    n_iter: int
    n_samples: int
    reg_covar: float  # the absolute value scikit-learn used
    seconds: float = 0.0

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    def component_log_prob(self, X: np.ndarray, chunk: int = 256) -> np.ndarray:
        """N×M weighted log-densities; equals scikit-learn's ``_estimate_weighted_log_prob``."""
        X = np.asarray(X, dtype=np.float64)
        C = self.means.shape[1]
        if X.ndim != 2 or X.shape[1] != C:
            raise ValueError(f"features of shape {X.shape}; this mixture expects N×{C}")
        log_det = np.log(np.diagonal(self.prec_chol, axis1=1, axis2=2)).sum(1)
        const = self.log_prior + log_det - 0.5 * C * math.log(2 * math.pi)
        out = np.empty((len(X), self.n_components))
        for start in range(0, len(X), chunk):  # bounds the M×N×C temporary
            y = np.matmul(X[None, start:start + chunk] - self.means[:, None, :], self.prec_chol)
            out[start:start + chunk] = (const[:, None] - 0.5 * np.square(y).sum(2)).T
        return out

    def log_likelihood(self, X: np.ndarray) -> np.ndarray:
        """Per-sample log-likelihood; equals scikit-learn's ``score_samples``."""
        return logsumexp(self.component_log_prob(X), axis=1)

    def chosen_term(self, X: np.ndarray) -> np.ndarray:
        """Per-sample HFC term ``(1/C)‖(f − μ_k*) L_k*‖²`` in float64, with k* the component of the
        highest ``component_log_prob`` (HFCTerm's choice: the scores differ by a constant)."""
        X = np.asarray(X, dtype=np.float64)
        out = np.zeros(len(X))
        if len(X) == 0:
            return out
        chosen = self.component_log_prob(X).argmax(1)
        for k in np.unique(chosen):  # one product per chosen component: no N×C×C gather
            rows = chosen == k
            z = (X[rows] - self.means[k]) @ self.prec_chol[k]
            out[rows] = np.square(z).sum(1) / X.shape[1]
        return out


def _bayesian_log_prior(model, n_features: int) -> np.ndarray:
    """Per-component additive score of a fitted BayesianGaussianMixture (see module docstring).

    Expected log weight E[log π_k] under the variational posterior, plus the terms of the expected
    log-density that do not depend on x: ½(E[log|Λ_k|] − C·log ν_k − C/β_k), where
    E[log|Λ_k|] = C·log 2 + Σ_i ψ((ν_k − i)/2) + log|W_k| and log|W_k| = log|precision| − C·log ν_k
    (scikit-learn's precisions are normalised by the degrees of freedom ν_k).
    """
    concentration = model.weight_concentration_
    if model.weight_concentration_prior_type == "dirichlet_process":
        alpha, beta = concentration
        total = digamma(alpha + beta)
        log_weights = digamma(alpha) - total + np.hstack((0.0, np.cumsum(digamma(beta) - total)[:-1]))
    else:
        log_weights = digamma(concentration) - digamma(np.sum(concentration))
    dof = model.degrees_of_freedom_
    log_lambda = n_features * np.log(2.0) + digamma(0.5 * (dof[None, :] - np.arange(n_features)[:, None])).sum(0)
    return log_weights - 0.5 * n_features * np.log(dof) + 0.5 * (log_lambda - n_features / model.mean_precision_)


def _make_estimator(kind: str, n_components: int, reg_covar: float, max_iter: int, random_state: int,
                    covariance: str = "full"):
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    cls = BayesianGaussianMixture if kind == "bayesian" else GaussianMixture
    return cls(n_components=n_components, covariance_type=covariance, reg_covar=reg_covar,
               max_iter=max_iter, random_state=random_state)


def params_from_sklearn(model, X: np.ndarray, reg_covar: float | None = None,
                        seconds: float = 0.0) -> MixtureParams:
    """Copy a fitted scikit-learn (Bayesian)GaussianMixture with full or diagonal covariance into
    plain arrays (a diagonal factor is stored as the diagonal M×C×C matrix, so that every consumer
    scores both kinds the same way; scikit-learn's Bayesian log-density has the same form for both)."""
    from sklearn.mixture import BayesianGaussianMixture

    if model.covariance_type not in COVARIANCES:
        raise ValueError(f"only covariance_type in {COVARIANCES} mixtures are supported")
    n_features = model.means_.shape[1]
    if isinstance(model, BayesianGaussianMixture):
        log_prior = _bayesian_log_prior(model, n_features)
    else:
        with np.errstate(divide="ignore"):
            log_prior = np.log(model.weights_)
    params = MixtureParams(
        means=np.array(model.means_, dtype=np.float64),
        prec_chol=(np.array(model.precisions_cholesky_, dtype=np.float64) if model.covariance_type == "full"
                   else np.stack([np.diag(row) for row in np.asarray(model.precisions_cholesky_, np.float64)])),
        weights=np.array(model.weights_, dtype=np.float64),
        log_prior=np.asarray(log_prior, dtype=np.float64),
        avg_log_likelihood=0.0, converged=bool(model.converged_), n_iter=int(model.n_iter_),
        n_samples=int(len(X)), reg_covar=float(model.reg_covar if reg_covar is None else reg_covar),
        seconds=seconds)
    params.avg_log_likelihood = float(params.log_likelihood(X).mean())
    return params


def channel_std(X: np.ndarray) -> np.ndarray:
    """Each channel's standard deviation over the rows of ``X``, its variance floored at
    ``CHANNEL_VARIANCE_FLOOR`` of the mean variance (dead channels), never 0: the units of
    ``reg_scale="channel"`` (and of diagnose_hfc.py's per-channel z-scores)."""
    variance = np.asarray(X, dtype=np.float64).var(axis=0)
    return np.sqrt(np.maximum(variance, CHANNEL_VARIANCE_FLOOR * variance.mean()) + 1e-24)


def _fit_one(X: np.ndarray, kind: str, n_components: int, reg_covar_rel: float, max_iter: int,
             random_state: int, reg_scale: str = "mean", covariance: str = "full") -> MixtureParams:
    """Fit one mixture (a joblib job: top-level, so process workers can run it)."""
    start = time.perf_counter()
    X = np.asarray(X, dtype=np.float64)  # float32 Cholesky factors of near-singular covariances break
    if reg_scale == "channel":
        std = channel_std(X)
        params = _fit_one(X / std, kind, n_components, reg_covar_rel, max_iter, random_state, covariance=covariance)
        # Back to the features' units: μ = μ_z·s and L = diag(1/s)·L_z (still upper triangular), so
        # ‖(f − μ)L‖ = ‖(f/s − μ_z)L_z‖ and the log-density gains −Σ log s.
        params.means = params.means * std
        params.prec_chol = params.prec_chol / std[None, :, None]
        params.avg_log_likelihood = float(params.log_likelihood(X).mean())
        params.seconds = time.perf_counter() - start
        return params
    # The regulariser scales with the data (module docstring); the floor covers dead (all-zero) layers.
    reg = max(reg_covar_rel * float(X.var(axis=0).mean()), 1e-8)
    for attempt in range(_REG_RETRIES):
        model = _make_estimator(kind, n_components, reg, max_iter, random_state, covariance)
        try:
            model.fit(X)
            break
        except ValueError:  # scikit-learn: "ill-defined empirical covariance"
            if attempt == _REG_RETRIES - 1:
                raise
            reg *= 10.0
    return params_from_sklearn(model, X, reg_covar=reg, seconds=time.perf_counter() - start)


def _fit_seed(seed: int, layer: int, cls: int) -> int:
    # Independent of the scheduling order, so the same seed gives the same mixtures.
    return int(np.random.SeedSequence([seed, layer, cls]).generate_state(1)[0])


class Mixtures:
    """The fitted mixtures of every kept layer and every class, with their metadata."""

    def __init__(self, params: dict[tuple[int, int], MixtureParams], layers: Sequence[int],
                 classes: Sequence[int], *, kind: str, num_components: int,
                 layer_names: Sequence[str] | None = None, layer_channels: Sequence[int] | None = None,
                 seed: int = 0, reg_covar: float = DEFAULT_REG_COVAR, max_iter: int = DEFAULT_MAX_ITER,
                 min_samples_per_component: int = DEFAULT_MIN_SAMPLES_PER_COMPONENT,
                 max_channels: int | None = None, fit_seconds: float = 0.0,
                 scales: dict[tuple[int, int], float] | None = None, scale_info: dict | None = None,
                 reg_scale: str = "mean", covariance: str = "full"):
        self.params = params
        self.layers = [int(layer) for layer in layers]
        self.classes = [int(c) for c in classes]
        self.kind = kind
        self.num_components = int(num_components)
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.layer_channels = [int(c) for c in layer_channels] if layer_channels is not None else None
        self.seed = int(seed)
        self.reg_covar = float(reg_covar)
        self.reg_scale = reg_scale
        self.covariance = covariance
        self.max_iter = int(max_iter)
        self.min_samples_per_component = int(min_samples_per_component)
        self.max_channels = max_channels
        self.fit_seconds = float(fit_seconds)
        missing = [(l, c) for l in self.layers for c in self.classes if (l, c) not in params]
        if missing:
            raise ValueError(f"mixtures missing for (layer, class) {missing[:5]}")
        self.scales: dict[tuple[int, int], float] | None = None
        self.scale_info: dict | None = None
        if scales is not None:
            self.set_scales(scales, scale_info)

    def set_scales(self, scales: dict[tuple[int, int], float], info: dict | None = None) -> None:
        """Attach the held-out median term of every (layer, class) (``term_scales``); ``info``
        (JSON-able, e.g. which images they come from) goes into the summary."""
        missing = [key for key in self._keys() if key not in scales]
        if missing:
            raise ValueError(f"term scales missing for (layer, class) {missing[:5]}")
        values = {key: float(scales[key]) for key in self._keys()}
        bad = {key: v for key, v in values.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"term scales must be positive and finite, got {dict(list(bad.items())[:5])}")
        self.scales = values
        self.scale_info = dict(info) if info is not None else None

    def __getitem__(self, key: tuple[int, int]) -> MixtureParams:
        return self.params[key]

    def channels(self, layer: int) -> int:
        return int(self.params[(layer, self.classes[0])].means.shape[1])

    def log_likelihood(self, layer: int, cls: int, X: np.ndarray) -> np.ndarray:
        """Per-sample log-likelihood of ``X`` (N×C) under the mixture of ``cls`` at ``layer``."""
        return self.params[(layer, cls)].log_likelihood(X)

    def component_log_prob(self, layer: int, cls: int, X: np.ndarray) -> np.ndarray:
        """N×M weighted component log-densities (scikit-learn's ``_estimate_weighted_log_prob``)."""
        return self.params[(layer, cls)].component_log_prob(X)

    def not_converged(self) -> list[tuple[int, int]]:
        return [key for key in self._keys() if not self.params[key].converged]

    def _keys(self) -> list[tuple[int, int]]:
        return [(l, c) for l in self.layers for c in self.classes]

    def summary(self) -> dict:
        fits = []
        for layer, cls in self._keys():
            p = self.params[(layer, cls)]
            fits.append({
                "layer": layer, "layer_name": self.layer_names[layer] if self.layer_names else None,
                "channels": int(p.means.shape[1]), "class": cls, "n_samples": p.n_samples,
                "n_components": p.n_components, "clamped": p.n_components < self.num_components,
                "reg_covar": p.reg_covar, "avg_log_likelihood": p.avg_log_likelihood,
                "converged": p.converged, "n_iter": p.n_iter, "seconds": round(p.seconds, 3),
                "heldout_median_term": self.scales[(layer, cls)] if self.scales else None})
        lls = [f["avg_log_likelihood"] for f in fits]
        return {
            "kind": self.kind, "num_components": self.num_components, "seed": self.seed,
            "reg_covar_relative": self.reg_covar, "reg_scale": self.reg_scale,
            "covariance": self.covariance, "max_iter": self.max_iter,
            "min_samples_per_component": self.min_samples_per_component,
            "max_channels": self.max_channels, "classes": self.classes, "layers": self.layers,
            "layer_names": self.layer_names, "layer_channels": self.layer_channels,
            "kept_layer_names": [self.layer_names[l] for l in self.layers] if self.layer_names else None,
            "n_fits": len(fits), "n_not_converged": sum(not f["converged"] for f in fits),
            "not_converged": [{"layer": f["layer"], "class": f["class"]} for f in fits if not f["converged"]],
            "n_clamped": sum(f["clamped"] for f in fits),
            "mean_avg_log_likelihood": float(np.mean(lls)) if lls else None,
            "fit_seconds": round(self.fit_seconds, 2), "heldout_term": self.heldout_report(),
            "fits": fits}

    def heldout_report(self) -> dict | None:
        """The fit report: per kept layer, the held-out median term of each class (the scales; about
        1 per layer for a density that fits held-out data), and the median and max of those values
        over all (layer, class) pairs. None without scales."""
        if not self.scales:
            return None
        per_layer = [{"layer": layer, "layer_name": self.layer_names[layer] if self.layer_names else None,
                      "median_term": [self.scales[(layer, cls)] for cls in self.classes]}
                     for layer in self.layers]
        values = np.array(list(self.scales.values()))
        return {"median": float(np.median(values)), "max": float(values.max()),
                "per_layer": per_layer, "info": self.scale_info}

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``mixtures.npz`` (packed upper-triangular Cholesky factors, and the term scales
        ``L<layer>_c<class>_scale`` when set) and ``summary.json`` (``summary()`` plus the entries
        of ``extra``, e.g. the data set and run)."""
        folder = Path(folder)
        arrays = {}
        for layer, cls in self._keys():
            p = self.params[(layer, cls)]
            C = p.means.shape[1]
            if np.any(np.tril(p.prec_chol, -1)):
                raise ValueError(f"precision Cholesky factor of layer {layer} class {cls} is not upper triangular")
            rows, cols = np.triu_indices(C)
            prefix = f"L{layer}_c{cls}_"
            arrays[prefix + "means"] = p.means
            arrays[prefix + "prec_chol_triu"] = p.prec_chol[:, rows, cols]  # halves the file
            arrays[prefix + "weights"] = p.weights
            arrays[prefix + "log_prior"] = p.log_prior
            if self.scales:
                arrays[prefix + "scale"] = np.float64(self.scales[(layer, cls)])
        save_npz(folder / MIXTURES_NAME, **arrays)
        write_json(folder / SUMMARY_NAME, {**(extra or {}), **self.summary()})
        return folder


def stacked_layer(mixtures: "Mixtures", layer: int, np_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's mixtures of every class stacked for batched scoring: means classes×M×C, precision
    factors classes×M×C×C, and per component log prior + log det of its factor (classes×M). A class
    with fewer components is padded with components whose constant is −inf (never chosen)."""
    group = [mixtures[(layer, c)] for c in mixtures.classes]
    M = max(p.n_components for p in group)
    C = group[0].means.shape[1]
    means = np.zeros((len(group), M, C), np_dtype)
    chol = np.zeros((len(group), M, C, C), np_dtype)
    const = np.full((len(group), M), -np.inf)
    for c, p in enumerate(group):
        m = p.n_components
        means[c, :m] = p.means
        chol[c, :m] = p.prec_chol
        const[c, :m] = p.log_prior + np.log(np.diagonal(p.prec_chol, axis1=1, axis2=2)).sum(1)
    return means, chol, const


def load_mixtures(folder: str | Path, hint: str = "run get_GMM.py first") -> Mixtures:
    """Read a folder written by ``Mixtures.save``; ``scales`` is None for a file without them."""
    folder = Path(folder)
    summary = read_json(folder / SUMMARY_NAME, "mixture summary", hint)
    arrays = load_npz(folder / MIXTURES_NAME, "mixtures", hint)
    try:
        info = {(f["layer"], f["class"]): f for f in summary["fits"]}
        params, scales = {}, {}
        for layer in summary["layers"]:
            for cls in summary["classes"]:
                prefix = f"L{layer}_c{cls}_"
                means = arrays[prefix + "means"]
                M, C = means.shape
                rows, cols = np.triu_indices(C)
                prec_chol = np.zeros((M, C, C))
                prec_chol[:, rows, cols] = arrays[prefix + "prec_chol_triu"]
                f = info[(layer, cls)]
                params[(layer, cls)] = MixtureParams(
                    means=means, prec_chol=prec_chol, weights=arrays[prefix + "weights"],
                    log_prior=arrays[prefix + "log_prior"],
                    avg_log_likelihood=float(f["avg_log_likelihood"]), converged=bool(f["converged"]),
                    n_iter=int(f["n_iter"]), n_samples=int(f["n_samples"]),
                    reg_covar=float(f["reg_covar"]), seconds=float(f.get("seconds", 0.0)))
                if prefix + "scale" in arrays:
                    scales[(layer, cls)] = float(arrays[prefix + "scale"])
        if scales and len(scales) != len(params):
            raise ValueError(f"term scales for {len(scales)} of {len(params)} (layer, class) pairs")
        return Mixtures(params, summary["layers"], summary["classes"], kind=summary["kind"],
                        num_components=summary["num_components"], layer_names=summary.get("layer_names"),
                        layer_channels=summary.get("layer_channels"), seed=summary.get("seed", 0),
                        reg_covar=summary.get("reg_covar_relative", DEFAULT_REG_COVAR),
                        reg_scale=summary.get("reg_scale", "mean"),
                        covariance=summary.get("covariance", "full"),
                        max_iter=summary.get("max_iter", DEFAULT_MAX_ITER),
                        min_samples_per_component=summary.get("min_samples_per_component",
                                                              DEFAULT_MIN_SAMPLES_PER_COMPONENT),
                        max_channels=summary.get("max_channels"),
                        fit_seconds=summary.get("fit_seconds", 0.0), scales=scales or None,
                        scale_info=(summary.get("heldout_term") or {}).get("info"))
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"corrupt mixtures {folder / MIXTURES_NAME} (or its {folder / SUMMARY_NAME}): {err!r}; "
                        f"{hint}") from None


def term_scales(mixtures: Mixtures, pooled_by_layer: Sequence[np.ndarray], labels: np.ndarray,
                classes: Sequence[int] | None = None) -> dict[tuple[int, int], float]:
    """Per (kept layer, class): the median over the given images of that class of the HFC term
    ``(1/C)‖(f − μ_k*) L_k*‖²`` under that class's mixture (``MixtureParams.chosen_term``, float64).

    ``pooled_by_layer`` and ``labels`` are indexed as for ``fit_mixtures``; pass held-out clean
    images (not the fitting ones) to measure how well the mixtures fit the class. ``classes``
    (default: the mixtures' classes) selects the classes to measure; each needs at least one image
    (ValueError). A median below ``SCALE_FLOOR`` (dead features) is raised to it.
    """
    labels = np.asarray(labels).astype(np.int64)
    classes = mixtures.classes if classes is None else [int(c) for c in classes]
    empty = [c for c in classes if not np.any(labels == c)]
    if empty:
        raise ValueError(f"no image of class(es) {empty} to measure the term scale on")
    scales = {}
    for layer in mixtures.layers:
        feats = np.asarray(pooled_by_layer[layer])
        if feats.ndim != 2 or len(feats) != len(labels):
            raise ValueError(f"layer {layer}: features of shape {feats.shape} for {len(labels)} labels")
        for cls in classes:
            values = mixtures[(layer, cls)].chosen_term(feats[labels == cls])
            scales[(layer, cls)] = max(float(np.median(values)), SCALE_FLOOR)
    return scales


def fit_mixtures(pooled_by_layer: Sequence[np.ndarray], labels: np.ndarray, layers: Sequence[int],
                 num_components: int, *, kind: str = "bayesian", seed: int = 0, n_jobs: int = 2,
                 classes: Sequence[int] | None = None, reg_covar: float = DEFAULT_REG_COVAR,
                 max_iter: int = DEFAULT_MAX_ITER,
                 min_samples_per_component: int = DEFAULT_MIN_SAMPLES_PER_COMPONENT,
                 layer_names: Sequence[str] | None = None, layer_channels: Sequence[int] | None = None,
                 max_channels: int | None = None, backend: str = "threading",
                 progress: bool = True, reg_scale: str = "mean", covariance: str = "full") -> Mixtures:
    """Fit one mixture per (kept layer, class) on the pooled training features, in parallel.

    ``pooled_by_layer[l]`` is the N×C_l array of layer l (all hierarchical layers, indexed like the
    model's ``layer_names``); ``labels`` the N class labels; ``layers`` the layer indices to fit
    (see ``select_layers``); ``classes`` defaults to ``0..max(label)``. ``kind`` is "bayesian"
    (``BayesianGaussianMixture``, the paper) or "em" (``GaussianMixture``). ``reg_covar`` is
    relative to the mean per-channel variance of each fit's data (``reg_scale="mean"``) or to each
    channel's own variance (``"channel"``, module docstring). ``covariance`` is each component's:
    "full" (the paper's) or "diag" (one variance per channel). Jobs run largest-first on
    ``n_jobs`` joblib workers (``backend``: "threading", the default, or "loky" processes),
    with a progress bar.
    """
    from joblib import Parallel, delayed
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise UserError(f"unknown mixture kind {kind!r}; expected one of {', '.join(KINDS)}")
    if reg_scale not in REG_SCALES:
        raise UserError(f"unknown regulariser scale {reg_scale!r}; expected one of {', '.join(REG_SCALES)}")
    if covariance not in COVARIANCES:
        raise UserError(f"unknown covariance {covariance!r}; expected one of {', '.join(COVARIANCES)}")
    if num_components < 1:
        raise UserError(f"number of components must be >= 1, got {num_components}")
    labels = np.asarray(labels).astype(np.int64)
    classes = list(range(int(labels.max()) + 1)) if classes is None else [int(c) for c in classes]
    jobs = []
    for layer in layers:
        feats = np.asarray(pooled_by_layer[layer])
        if feats.ndim != 2 or len(feats) != len(labels):
            raise ValueError(f"layer {layer}: features of shape {feats.shape} for {len(labels)} labels")
        for cls in classes:
            X = feats[labels == cls]
            if len(X) < 2:
                raise UserError(f"class {cls} has {len(X)} training samples; a mixture needs at least 2")
            m = max(1, min(num_components, len(X) // min_samples_per_component))
            jobs.append((layer, cls, X, m))
    jobs.sort(key=lambda j: -(j[2].shape[1] ** 2 * j[3]))  # largest first: better load balance

    start = time.perf_counter()
    params: dict[tuple[int, int], MixtureParams] = {}
    tasks = [(layer, cls, X, kind, m, reg_covar, max_iter, _fit_seed(seed, layer, cls), reg_scale, covariance)
             for layer, cls, X, m in jobs]
    bar = tqdm(total=len(jobs), desc=f"GMM fits ({kind}, M={num_components})", unit="fit",
               disable=not progress)
    # One BLAS thread per fit: the matrices are small, and a multi-threaded BLAS under parallel
    # fits was 2-4x slower on 2 cores. Threads beat processes for a one-shot run there (the
    # BLAS calls release the GIL; process workers spend seconds importing numpy/sklearn/torch):
    # 18 s vs 26 s for ResNet-50's 78 fits at M = 8 on 2 cores.
    with bar, threadpool_limits(1), warnings.catch_warnings():
        # Non-convergence is recorded per fit (``converged``) and reported, not warned; the
        # filter is process-wide, so it is set here, around all the threads.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # scikit-learn's first variational step subtracts -inf from -inf (its starting lower bound),
        # which NumPy warns about once per fit; the fit is unaffected.
        warnings.filterwarnings("ignore", message="invalid value encountered in scalar subtract",
                                category=RuntimeWarning)
        if n_jobs == 1:
            results = (_fit_one_keyed(*task) for task in tasks)
        else:
            results = Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")(
                delayed(_fit_one_keyed)(*task) for task in tasks)
        for key, fitted in results:
            params[key] = fitted
            bar.update(1)
    return Mixtures(params, layers, classes, kind=kind, num_components=num_components,
                    layer_names=layer_names, layer_channels=layer_channels, seed=seed,
                    reg_covar=reg_covar, max_iter=max_iter,
                    min_samples_per_component=min_samples_per_component, max_channels=max_channels,
                    fit_seconds=time.perf_counter() - start, reg_scale=reg_scale, covariance=covariance)


def _fit_one_keyed(layer, cls, X, kind, m, reg_covar, max_iter, random_state, reg_scale="mean", covariance="full"):
    return (layer, cls), _fit_one(X, kind, m, reg_covar, max_iter, random_state, reg_scale, covariance)
