"""The seven feature-space detectors behind one interface (docs/PROTOCOL.md §6).

Every detector has the same contract, and follows scikit-learn's estimator conventions (it is
a ``sklearn.base.BaseEstimator``, which gives ``get_params``/``set_params``, ``clone`` and the
repr): the constructor only stores its parameters, verbatim, under their own names; they are
checked at ``fit``; everything ``fit`` learns ends with an underscore (``layer_names_``,
``fit_seconds_``, ``layers_``, ``logistic_``, ...); scoring before ``fit`` (or ``load``) raises
``sklearn.exceptions.NotFittedError`` (a ValueError).

- ``fit(model, train, benign, adv)``: ``train`` = training-set FeatureSet with labels (class
  statistics for KD, MAHA; LID's reference batch), ``benign`` = A_fit clean + noise versions,
  ``adv`` = the successful A_fit AEs;
- ``score(model, feats) -> np.ndarray`` (N,), higher = more adversarial;
- per-layer detectors (KD, LID, MAHA, DNN) also give ``layer_scores(model, feats)`` (N×L over
  ``detector.layers_``) and ``combine(layer_scores)``; ``score == combine(layer_scores)``;
- ``save(folder)`` / ``Class.load(folder)`` without pickle: ``settings.json`` (``get_params()``,
  the fitted layer names, the fit time and small state), ``arrays.npz`` (every fitted array,
  in the dtype the scoring code reads, so a loaded detector gives bit-identical scores), and
  for DNN ``heads.pt`` (state dicts, loaded with ``weights_only=True``). scikit-learn is used for fitting only; scores are
  computed here from the saved arrays (logistic regression, standardisation, RBF SVM).

``evaluate`` is the one scoring path for every row of every table (base and HFC AEs alike).
"""
from __future__ import annotations

import io
import math
import numbers
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.linalg import solve_triangular
from scipy.special import logsumexp
from sklearn.base import BaseEstimator
from sklearn.covariance import ledoit_wolf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted
from tqdm import tqdm

import features as feature_lib
import gmm
import metrics
import network
from features import FeatureSet
from utils import UserError, atomic_write_bytes, batches, load_npz, read_json, save_npz, write_json

SETTINGS_FILE = "settings.json"
ARRAYS_FILE = "arrays.npz"
HEADS_FILE = "heads.pt"
LOGISTIC_CS = tuple(10.0 ** p for p in range(-4, 5))


# --------------------------------------------------------------------------- shared pieces
class StandardisedLogistic:
    """Logistic regression on z-scored inputs; the score is the decision value (a logit).

    C is chosen from ``LOGISTIC_CS`` by stratified 5-fold cross-validated log loss (seeded), as
    the original detectors' ``LogisticRegressionCV`` does, then refitted on all samples.
    Fitted: ``mean_``, ``scale_``, ``coef_``, ``intercept_`` (saved under the keys
    ``<prefix>mean``, ``<prefix>scale``, ``<prefix>coef``, ``<prefix>intercept``).
    """

    def fit(self, inputs: np.ndarray, is_adv: np.ndarray, seed: int) -> "StandardisedLogistic":
        inputs = np.asarray(inputs, np.float64)
        is_adv = np.asarray(is_adv, np.int64)
        counts = np.bincount(is_adv, minlength=2)
        if counts.min() == 0:
            raise ValueError("logistic regression needs benign and adversarial samples")
        self.mean_ = inputs.mean(axis=0)
        scale = inputs.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        z = (inputs - self.mean_) / self.scale_
        best_c = 1.0
        folds = int(min(5, counts.min()))
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            losses = [cross_val_score(LogisticRegression(C=c, max_iter=5000), z, is_adv, cv=cv,
                                      scoring="neg_log_loss").mean() for c in LOGISTIC_CS]
            best_c = LOGISTIC_CS[int(np.argmax(losses))]
        model = LogisticRegression(C=best_c, max_iter=5000).fit(z, is_adv)
        self.coef_ = model.coef_[0].astype(np.float64)
        self.intercept_ = model.intercept_.astype(np.float64)
        return self

    def decision(self, inputs: np.ndarray) -> np.ndarray:
        z = (np.asarray(inputs, np.float64) - self.mean_) / self.scale_
        return z @ self.coef_ + self.intercept_[0]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean_, f"{prefix}scale": self.scale_,
                f"{prefix}coef": self.coef_, f"{prefix}intercept": self.intercept_}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "StandardisedLogistic":
        out = cls()
        out.mean_, out.scale_ = arrays[f"{prefix}mean"], arrays[f"{prefix}scale"]
        out.coef_, out.intercept_ = arrays[f"{prefix}coef"], arrays[f"{prefix}intercept"]
        return out


def _labels01(benign_n: int, adv_n: int) -> np.ndarray:
    return np.concatenate([np.zeros(benign_n, np.int64), np.ones(adv_n, np.int64)])


def _layer_names(model, feats: FeatureSet) -> list[str]:
    names = getattr(model, "layer_names", None)
    return list(names) if names is not None else [f"layer{i}" for i in range(len(feats.pooled))]


def resolve_layers(spec, model, num_layers: int, *, conv_only: bool = False) -> list[int]:
    """Layer choice -> sorted feature indices. ``"all"``; ``"stages"`` (the stage-end conv taps,
    ``model.stage_end_layers``, plus -- unless ``conv_only`` -- the FC taps that are not a
    mere copy of the pooled map before them); or indices as a list or "3,7,-1" (negative =
    from the end). A malformed or out-of-range choice is a UserError."""
    conv = list(getattr(model, "conv_layers", range(num_layers)))
    if spec in (None, "all"):
        return conv if conv_only else list(range(num_layers))
    if spec == "stages":
        if model is None or not hasattr(model, "stage_end_layers"):
            raise ValueError('layers="stages" needs a HierarchicalNet (use "all" or indices)')
        chosen = list(model.stage_end_layers)
        if not conv_only:
            copies = set(model.pooled_copy_layers)
            chosen += [i for i in range(num_layers) if i not in set(conv) and i not in copies]
        return sorted(chosen)
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()] if isinstance(spec, str) \
            else [int(i) for i in spec]
    except (TypeError, ValueError):
        indices = []
    if not indices or any(not -num_layers <= i < num_layers for i in indices):
        raise UserError(f"layer choice {spec!r}: expected 'all', 'stages' or indices in "
                        f"[-{num_layers}, {num_layers - 1}] separated by commas")
    chosen = sorted({i % num_layers for i in indices})
    if conv_only and not set(chosen) <= set(conv):
        raise UserError(f"layer choice {spec!r} includes taps that are not conv maps; conv taps: "
                        f"{conv[0]}..{conv[-1]}")
    return chosen


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances in float64 (clipped at 0 against rounding)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(sq, 0.0)


# --------------------------------------------------------------------------- parameter checks
def _check_integer(detector: "Detector", param: str, minimum: int | None = None) -> None:
    value = getattr(detector, param)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise UserError(f"{detector.name} detector: {param} must be an integer{bound}, got {value!r}")


def _check_real(detector: "Detector", param: str, minimum: float = 0.0, inclusive: bool = False) -> None:
    value = getattr(detector, param)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            value < minimum or (value == minimum and not inclusive):
        raise UserError(f"{detector.name} detector: {param} must be a number {'>=' if inclusive else '>'} "
                        f"{minimum:g}, got {value!r}")


def _check_layer_choice(detector: "Detector", param: str = "layers") -> None:
    """Only the kind here ("all", "stages", "3,7,-1", a list of ints or None); ``resolve_layers``
    checks the indices against the model at fit."""
    value = getattr(detector, param)
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                for i in value):
        return
    raise UserError(f"{detector.name} detector: {param} must be 'all', 'stages' or layer indices, got {value!r}")


# --------------------------------------------------------------------------- the base class
class Detector(BaseEstimator):
    """Common plumbing: parameters (scikit-learn conventions), fit timing, fitted check,
    save/load.

    Subclasses list every parameter in ``__init__`` and store it verbatim under its own name;
    ``_check_params`` validates them (called by ``fit``) and ``_fit`` learns the ``*_``
    attributes. ``fit`` itself records ``layer_names_`` and ``fit_seconds_``.
    """

    name = ""
    per_layer = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    # -- to implement
    def _check_params(self) -> None:
        _check_integer(self, "seed", 0)

    def _fit(self, model, train: FeatureSet, benign: FeatureSet | None, adv: FeatureSet | None) -> None:
        raise NotImplementedError

    def score(self, model, feats: FeatureSet) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> None:
        pass

    # -- shared
    def fit(self, model, train: FeatureSet, benign: FeatureSet | None = None,
            adv: FeatureSet | None = None) -> "Detector":
        """Check the parameters, then learn from ``train`` (class statistics, LID's reference
        batch) and A_fit's ``benign`` and ``adv`` sets; returns self."""
        self._check_params()
        start = time.perf_counter()
        self.layer_names_ = _layer_names(model, train)
        self._fit(model, train, benign, adv)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _check_fitted(self) -> None:
        check_is_fitted(self, "layer_names_", msg=f"{self.name} detector is not fitted: call "
                                                   "fit(model, train, benign, adv) or load(folder) first")

    def _check(self, feats: FeatureSet) -> None:
        self._check_fitted()
        if len(feats.pooled) != len(self.layer_names_):
            raise ValueError(f"{self.name} was fitted on {len(self.layer_names_)} layers, "
                             f"the features have {len(feats.pooled)}")

    def save(self, folder: str | Path) -> None:
        self._check_fitted()
        folder = Path(folder)
        state, arrays = self._state()
        save_npz(folder / ARRAYS_FILE, **arrays)
        write_json(folder / SETTINGS_FILE, {"name": self.name, "settings": self.get_params(),
                                            "layer_names": self.layer_names_, "fit_seconds": self.fit_seconds_,
                                            "state": state})

    @classmethod
    def load(cls, folder: str | Path, hint: str = "run extract_features.py first") -> "Detector":
        """The detector saved in ``folder``; a missing, unreadable or foreign file is a UserError
        naming it and ``hint``."""
        folder = Path(folder)
        saved = read_json(folder / SETTINGS_FILE, f"{cls.name} detector settings", hint)
        found = saved.get("name") if isinstance(saved, dict) else None
        if found != cls.name:
            raise UserError(f"{folder / SETTINGS_FILE} holds no {cls.name} detector (found {found!r}); {hint}")
        arrays = load_npz(folder / ARRAYS_FILE, f"{cls.name} detector arrays", hint)
        try:
            detector = cls(**saved["settings"])
            detector.layer_names_ = list(saved["layer_names"])
            detector.fit_seconds_ = float(saved.get("fit_seconds", float("nan")))  # absent in older folders
            detector._restore(saved["state"], arrays, folder)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
            raise UserError(f"corrupt {cls.name} detector: {folder / ARRAYS_FILE} and {folder / SETTINGS_FILE} "
                            f"do not fit together ({type(err).__name__}: {err}); {hint}") from None
        return detector


class LayerDetector(Detector):
    """A detector with one score per layer (over the fitted ``layers_``), combined into the
    final score."""

    per_layer = True

    def layer_scores(self, model, feats: FeatureSet) -> np.ndarray:
        raise NotImplementedError

    def combine(self, layer_scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, model, feats: FeatureSet) -> np.ndarray:
        return self.combine(self.layer_scores(model, feats))

    def score_with_layers(self, model, feats: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        layer_scores = self.layer_scores(model, feats)
        return self.combine(layer_scores), layer_scores

    def layer_weights(self) -> dict[str, float]:
        """The combination's weight of each layer's z-scored score, by layer name ({} when the
        layers are not combined by one logistic regression). A negative weight means that, other
        layers equal, a *higher* (more adversarial-looking) score at that layer lowers the final
        score: features pulled further towards the clean class than clean images are can then
        raise the detector's score."""
        logistic, layers = getattr(self, "logistic_", None), getattr(self, "layers_", None)
        if logistic is None or layers is None or len(logistic.coef_) != len(layers):
            return {}
        return {self.layer_names_[layer]: float(w) for layer, w in zip(layers, logistic.coef_)}


# --------------------------------------------------------------------------- KD
def gaussian_kde_log_density(points: np.ndarray, samples: np.ndarray, bandwidth: float,
                             chunk: int = 512) -> np.ndarray:
    """log of (1/M) Σ_j N(x; s_j, h² I) for every row x (float64, log-sum-exp; the same
    normalised density as ``sklearn.neighbors.KernelDensity(kernel="gaussian")``)."""
    samples = np.asarray(samples, np.float64)
    m, dim = samples.shape
    norm = -math.log(m) - 0.5 * dim * math.log(2.0 * math.pi * bandwidth ** 2)
    out = np.empty(len(points))
    for part in batches(len(points), chunk):
        sq = squared_distances(points[part], samples)
        out[part] = logsumexp(-sq / (2.0 * bandwidth ** 2), axis=1) + norm
    return out


class KD(LayerDetector):
    """Kernel density (Feinman et al., "Detecting adversarial samples from artifacts", 2017).

    Per class c and layer l a Gaussian kernel density over the pooled training-set features
    of class c (true labels); score = −log density under the *predicted* class. Defaults:
    bandwidth 1.0 (the HFC code's value; Feinman et al. tuned it per data set), score layer =
    the last pooled feature; ``layers`` ("all" by default) are kept for per-layer scores.
    """

    name = "KD"

    def __init__(self, bandwidth: float = 1.0, layers="all", score_layer: int = -1, seed: int = 0):
        self.bandwidth = bandwidth
        self.layers = layers
        self.score_layer = score_layer
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_real(self, "bandwidth")
        _check_layer_choice(self)
        _check_integer(self, "score_layer")

    def _fit(self, model, train, benign=None, adv=None):
        if train.labels is None:
            raise ValueError("KD needs the training labels")
        num_layers = len(train.pooled)
        if not -num_layers <= self.score_layer < num_layers:
            raise UserError(f"KD detector: score_layer {self.score_layer} is out of range for {num_layers} layers")
        self.score_layer_ = self.score_layer % num_layers
        self.layers_ = sorted(set(resolve_layers(self.layers, model, num_layers)) | {self.score_layer_})
        self.num_classes_ = int(train.logits.shape[1])
        missing = sorted(set(range(self.num_classes_)) - set(np.unique(train.labels).tolist()))
        if missing:
            raise ValueError(f"KD: classes {missing} have no training samples")
        self.train_labels_ = train.labels.astype(np.int64)
        self.train_features_ = {i: train.pooled[i].astype(np.float32) for i in self.layers_}

    def _layer_score(self, feats: FeatureSet, layer: int) -> np.ndarray:
        predicted = feats.predictions
        points = np.asarray(feats.pooled[layer], np.float64)
        out = np.empty(len(feats))
        for c in range(self.num_classes_):
            rows = predicted == c
            if rows.any():
                samples = self.train_features_[layer][self.train_labels_ == c]
                out[rows] = -gaussian_kde_log_density(points[rows], samples, self.bandwidth)
        return out

    def layer_scores(self, model, feats):
        self._check(feats)
        return np.stack([self._layer_score(feats, layer) for layer in self.layers_], axis=1)

    def combine(self, layer_scores):
        return layer_scores[:, self.layers_.index(self.score_layer_)]

    def score(self, model, feats):
        # Only the score layer: the same per-layer function, so equal to combine(layer_scores).
        self._check(feats)
        return self._layer_score(feats, self.score_layer_)

    def _state(self):
        arrays = {"train_labels": self.train_labels_,
                  **{f"train_{i}": f for i, f in self.train_features_.items()}}
        return {"layers": self.layers_, "score_layer": self.score_layer_, "num_classes": self.num_classes_}, arrays

    def _restore(self, state, arrays, folder):
        self.layers_, self.score_layer_ = list(state["layers"]), int(state["score_layer"])
        self.num_classes_ = int(state["num_classes"])
        self.train_labels_ = arrays["train_labels"]
        self.train_features_ = {i: arrays[f"train_{i}"] for i in self.layers_}


# --------------------------------------------------------------------------- BU
class BU(Detector):
    """Bayesian uncertainty (Feinman et al., 2017).

    T = 50 stochastic passes with dropout on through ``model.stochastic_head`` -- only the part
    of the network after the dropout, from the cached feature at ``model.head_input_index``;
    score = the mean over classes of the variance (ddof 0) of the softmax outputs. The dropout
    masks come from a generator seeded with ``seed`` at every call, so the same inputs always
    get the same scores. Nothing is fitted.
    """

    name = "BU"

    def __init__(self, passes: int = 50, batch_size: int = 256, seed: int = 0):
        self.passes = passes
        self.batch_size = batch_size
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_integer(self, "passes", 1)
        _check_integer(self, "batch_size", 1)

    def _fit(self, model, train, benign=None, adv=None):
        pass  # nothing to learn but the layer names

    @torch.no_grad()
    def score(self, model, feats):
        self._check(feats)
        device = feature_lib.model_device(model)
        head_input = torch.from_numpy(feats.pooled[model.head_input_index])
        out = np.empty(len(feats))
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            for part in batches(len(feats), self.batch_size):
                x = head_input[part].to(device)
                repeated = x.unsqueeze(0).expand(self.passes, *x.shape).reshape(-1, *x.shape[1:])
                probs = F.softmax(model.stochastic_head(repeated).double(), dim=1)
                probs = probs.reshape(self.passes, len(x), -1)
                out[part] = probs.var(dim=0, unbiased=False).mean(dim=1).cpu().numpy()
        return out


# --------------------------------------------------------------------------- KD+BU
class KDBU(Detector):
    """KD+BU (Feinman et al., 2017): logistic regression on the z-scored pair (KD of the last
    pooled layer, BU), fitted on the A_fit scores only. Defaults: those of KD and BU
    (bandwidth 1.0, T = 50). Holds its own last-layer KD and its own BU."""

    name = "KD+BU"

    def __init__(self, bandwidth: float = 1.0, passes: int = 50, seed: int = 0):
        self.bandwidth = bandwidth
        self.passes = passes
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_real(self, "bandwidth")
        _check_integer(self, "passes", 1)

    def _parts(self) -> tuple[KD, BU]:
        return KD(bandwidth=self.bandwidth, layers=[-1], seed=self.seed), BU(passes=self.passes, seed=self.seed)

    def _pair(self, model, feats):
        return np.stack([self.kd_.score(model, feats), self.bu_.score(model, feats)], axis=1)

    def _fit(self, model, train, benign, adv):
        kd, bu = self._parts()
        self.kd_, self.bu_ = kd.fit(model, train), bu.fit(model, train)
        inputs = np.concatenate([self._pair(model, benign), self._pair(model, adv)])
        self.logistic_ = StandardisedLogistic().fit(inputs, _labels01(len(benign), len(adv)), self.seed)

    def score(self, model, feats):
        self._check(feats)
        return self.logistic_.decision(self._pair(model, feats))

    def _state(self):
        kd_state, kd_arrays = self.kd_._state()
        return ({"kd": kd_state},
                {**{f"kd__{k}": v for k, v in kd_arrays.items()}, **self.logistic_.arrays("lr__")})

    def _restore(self, state, arrays, folder):
        self.kd_, self.bu_ = self._parts()
        for part in (self.kd_, self.bu_):
            part.layer_names_, part.fit_seconds_ = list(self.layer_names_), float("nan")
        self.kd_._restore(state["kd"], {k[4:]: v for k, v in arrays.items() if k.startswith("kd__")}, folder)
        self.logistic_ = StandardisedLogistic.from_arrays(arrays, "lr__")


# --------------------------------------------------------------------------- LID
def lid_mle(query: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Ma et al.'s maximum-likelihood LID of every query row, from its k nearest reference rows:
    ``−((1/k) Σ_i log(d_i / d_k))^(−1)``. ``exclude_self``: query row i *is* reference row i,
    which is then not counted as its own neighbour. Zero distances (duplicates) are clamped to
    1e-12 and the mean log to at most −1e-12, so the estimate stays finite."""
    dist = np.sqrt(squared_distances(query, reference))
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    available = dist.shape[1] - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"LID needs 1 <= k <= {available} neighbours, got k={k}")
    nearest = np.sort(np.partition(dist, k - 1, axis=1)[:, :k], axis=1)
    nearest = np.maximum(nearest, 1e-12)
    mean_log = np.minimum(np.log(nearest / nearest[:, -1:]).mean(axis=1), -1e-12)
    return -1.0 / mean_log


class LID(LayerDetector):
    """Local intrinsic dimensionality (Ma et al., ICLR 2018).

    Per layer the MLE LID of the pooled feature from its k = 20 nearest neighbours in a clean
    reference minibatch of 100; logistic regression over the layers on the z-scored LIDs,
    fitted on A_fit. Reference batch: drawn once at fit (seeded) from the clean *training*
    features and saved with the detector, so every set (A_fit, A_eval, any later AE set) is
    scored against the same clean batch by the same code, and no scored (test) image can be
    in it -- a sample is never its own neighbour. (Ma et al. draw a fresh clean minibatch per
    test minibatch, containing the clean sample itself; the HFC code's batch of 10 silently
    made k = 9 -- docs/PROTOCOL.md §8.) Defaults: k = 20, batch 100, all layers.
    """

    name = "LID"

    def __init__(self, k: int = 20, reference_size: int = 100, layers="all", seed: int = 0):
        self.k = k
        self.reference_size = reference_size
        self.layers = layers
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_integer(self, "k", 1)
        _check_integer(self, "reference_size", 1)
        _check_layer_choice(self)

    def _fit(self, model, train, benign, adv):
        if len(train) < self.k:
            raise ValueError(f"LID needs at least k={self.k} clean reference samples, got {len(train)}")
        self.layers_ = resolve_layers(self.layers, model, len(train.pooled))
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(len(train), size=min(self.reference_size, len(train)), replace=False))
        self.reference_ = {i: train.pooled[i][chosen].astype(np.float32) for i in self.layers_}
        inputs = np.concatenate([self.layer_scores(model, benign), self.layer_scores(model, adv)])
        self.logistic_ = StandardisedLogistic().fit(inputs, _labels01(len(benign), len(adv)), self.seed)

    def layer_scores(self, model, feats):
        self._check(feats)
        return np.stack([lid_mle(feats.pooled[i], self.reference_[i], self.k) for i in self.layers_], axis=1)

    def combine(self, layer_scores):
        return self.logistic_.decision(layer_scores)

    def _state(self):
        return ({"layers": self.layers_},
                {**{f"reference_{i}": r for i, r in self.reference_.items()}, **self.logistic_.arrays("lr__")})

    def _restore(self, state, arrays, folder):
        self.layers_ = list(state["layers"])
        self.reference_ = {i: arrays[f"reference_{i}"] for i in self.layers_}
        self.logistic_ = StandardisedLogistic.from_arrays(arrays, "lr__")


# --------------------------------------------------------------------------- MAHA
def tied_gaussian(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K×C) and the precision (C×C) of one covariance shared by all classes.

    The covariance of the class-centred features is shrunk towards a scaled identity with the
    Ledoit-Wolf coefficient, then inverted through its eigendecomposition. Lee et al. invert the
    empirical covariance with a pseudo-inverse; with fewer training images than channels
    (ResNet-50: 2048) that precision is blind to every direction the training features do not
    span -- exactly where AEs may move -- whereas the shrunk one is full rank, and for many more
    samples than channels the shrinkage vanishes and both agree.
    """
    features = np.asarray(features, np.float64)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = features - means[labels]
    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    try:  # positive definite whenever the shrinkage is > 0: invert through Cholesky (fast)
        inverse_factor = solve_triangular(np.linalg.cholesky(covariance), np.eye(len(covariance)), lower=True)
        precision = inverse_factor.T @ inverse_factor
    except np.linalg.LinAlgError:  # no shrinkage and singular: a clipped eigen-inverse
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = np.maximum(eigenvalues, 1e-10 * max(float(eigenvalues.max()), 1e-30))
        precision = (eigenvectors / eigenvalues) @ eigenvectors.T
    return means, (precision + precision.T) / 2


def half_mahalanobis(points: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """½ (x − μ_c)ᵀ P (x − μ_c) for every point and class: N×K (float64)."""
    points = np.asarray(points, np.float64)
    precision = np.asarray(precision, np.float64)
    out = np.empty((len(points), len(means)))
    for c, mean in enumerate(np.asarray(means, np.float64)):
        diff = points - mean
        out[:, c] = 0.5 * np.einsum("nc,nc->n", diff @ precision, diff)
    return out


class MAHA(LayerDetector):
    """Mahalanobis confidence (Lee et al., NeurIPS 2018).

    Per layer: class means and one tied covariance of the pooled training-set features
    (Ledoit-Wolf shrinkage, see ``tied_gaussian``); layer score = the smallest
    ½·Mahalanobis² distance over classes (the negated Gaussian score of Lee et al.). Input
    pre-processing (magnitude m, default 0.0005 in [0, 1] pixel units): x' = x − m·sign(∇_x d),
    with d the distance to the closest class mean, i.e. the step that *decreases* the distance
    (as Lee et al.; the HFC code increases it -- docs/PROTOCOL.md §8), then the layer is
    re-scored on x' (not clipped, as Lee et al.). Logistic regression over the layers, fitted on
    A_fit. Default layers: ``"stages"`` -- the last tap of each stage, where Lee et al. take
    their features (ResNet-50: 4 taps; VGG: 5 conv taps + the FC features); ``"all"`` or indices
    selectable. Cost of pre-processing: one forward with input gradients per batch, then per
    layer one backward (summing the per-sample distances over the batch is valid because
    samples are independent in eval mode) and one forward truncated at the layer.
    """

    name = "MAHA"

    def __init__(self, magnitude: float = 0.0005, layers="stages", batch_size: int = 16, seed: int = 0):
        self.magnitude = magnitude
        self.layers = layers
        self.batch_size = batch_size
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_real(self, "magnitude", inclusive=True)
        _check_layer_choice(self)
        _check_integer(self, "batch_size", 1)

    def _fit(self, model, train, benign, adv):
        if train.labels is None:
            raise ValueError("MAHA needs the training labels")
        self.layers_ = resolve_layers(self.layers, model, len(train.pooled))
        num_classes = int(train.logits.shape[1])
        self.means_, self.precisions_ = {}, {}
        for i in self.layers_:
            means, precision = tied_gaussian(train.pooled[i], train.labels, num_classes)
            # Stored (and always read) as float32: a loaded detector scores bit-identically.
            self.means_[i], self.precisions_[i] = means.astype(np.float32), precision.astype(np.float32)
        inputs = np.concatenate([self.layer_scores(model, benign), self.layer_scores(model, adv)])
        self.logistic_ = StandardisedLogistic().fit(inputs, _labels01(len(benign), len(adv)), self.seed)

    def _distance(self, layer: int, pooled: np.ndarray) -> np.ndarray:
        return half_mahalanobis(pooled, self.means_[layer], self.precisions_[layer]).min(axis=1)

    def layer_scores(self, model, feats):
        self._check(feats)
        if self.magnitude == 0.0:
            return np.stack([self._distance(i, feats.pooled[i]) for i in self.layers_], axis=1)
        return self._preprocessed_scores(model, feats)

    def _preprocessed_scores(self, model, feats: FeatureSet) -> np.ndarray:
        device = feature_lib.model_device(model)
        model.eval()
        means = {i: torch.from_numpy(self.means_[i]).to(device) for i in self.layers_}
        precisions = {i: torch.from_numpy(self.precisions_[i]).to(device) for i in self.layers_}
        moved_features = {layer: [] for layer in self.layers_}
        for part in tqdm(list(batches(len(feats), self.batch_size)), desc="MAHA pre-processing", leave=False):
            x = feats.images[part].to(device).requires_grad_(True)
            with torch.enable_grad():
                _, maps = model.forward_maps(x)
                for column, layer in enumerate(self.layers_):
                    feature = network.pooled(maps[layer])
                    diff = feature.unsqueeze(1) - means[layer].unsqueeze(0)           # N×K×C
                    dist = 0.5 * torch.einsum("nkc,cd,nkd->nk", diff, precisions[layer], diff)
                    closest = dist.detach().argmin(dim=1, keepdim=True)
                    loss = dist.gather(1, closest).sum()
                    (grad,) = torch.autograd.grad(loss, x, retain_graph=column < len(self.layers_) - 1)
                    moved = x.detach() - self.magnitude * grad.sign()
                    with torch.no_grad():
                        moved_features[layer].append(network.pooled(model.forward_to(moved, layer)).float().cpu())
        # The distances once, after the loop: a NumPy BLAS call between the network's passes
        # leaves its threads competing with torch's for the cores (README: Time).
        if not len(feats):
            return np.empty((0, len(self.layers_)))
        return np.stack([self._distance(layer, torch.cat(moved_features[layer]).numpy())
                         for layer in self.layers_], axis=1)

    def combine(self, layer_scores):
        return self.logistic_.decision(layer_scores)

    def _state(self):
        arrays = {**{f"means_{i}": m for i, m in self.means_.items()},
                  **{f"precision_{i}": p for i, p in self.precisions_.items()}, **self.logistic_.arrays("lr__")}
        return {"layers": self.layers_}, arrays

    def _restore(self, state, arrays, folder):
        self.layers_ = list(state["layers"])
        self.means_ = {i: arrays[f"means_{i}"] for i in self.layers_}
        self.precisions_ = {i: arrays[f"precision_{i}"] for i in self.layers_}
        self.logistic_ = StandardisedLogistic.from_arrays(arrays, "lr__")


# --------------------------------------------------------------------------- SVM
class SVM(Detector):
    """RBF support vector machine on the z-scored last pooled feature (the HFC papers' SVM
    baseline, docs/PROTOCOL.md §6), trained on A_fit benign vs. AEs with scikit-learn's SVC
    (C = 1, gamma = "scale"); score = the SVM decision value, computed here from the saved
    support vectors, dual coefficients, intercept and gamma."""

    name = "SVM"

    def __init__(self, c: float = 1.0, gamma="scale", layer: int = -1, seed: int = 0):
        self.c = c
        self.gamma = gamma
        self.layer = layer
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_real(self, "c")
        if self.gamma not in ("scale", "auto"):
            _check_real(self, "gamma")
        _check_integer(self, "layer")

    def _standardised(self, feats: FeatureSet) -> np.ndarray:
        return (np.asarray(feats.pooled[self.layer_], np.float64) - self.mean_) / self.scale_

    def _fit(self, model, train, benign, adv):
        num_layers = len(train.pooled)
        if not -num_layers <= self.layer < num_layers:
            raise UserError(f"SVM detector: layer {self.layer} is out of range for {num_layers} layers")
        self.layer_ = self.layer % num_layers
        inputs = np.concatenate([benign.pooled[self.layer_], adv.pooled[self.layer_]]).astype(np.float64)
        self.mean_ = inputs.mean(axis=0)
        scale = inputs.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        svc = SVC(C=self.c, kernel="rbf", gamma=self.gamma, random_state=self.seed)
        svc.fit((inputs - self.mean_) / self.scale_, _labels01(len(benign), len(adv)))
        self.gamma_ = float(svc._gamma)  # the resolved value of "scale" / "auto"
        self.support_ = svc.support_vectors_.astype(np.float64)
        self.dual_coef_ = svc.dual_coef_[0].astype(np.float64)
        self.intercept_ = svc.intercept_.astype(np.float64)

    def score(self, model, feats):
        self._check(feats)
        z = self._standardised(feats)
        out = np.empty(len(z))
        for part in batches(len(z), 512):
            kernel = np.exp(-self.gamma_ * squared_distances(z[part], self.support_))
            out[part] = kernel @ self.dual_coef_ + self.intercept_[0]
        return out

    def _state(self):
        return ({"layer": self.layer_, "gamma": self.gamma_},
                {"mean": self.mean_, "scale": self.scale_, "support": self.support_,
                 "dual_coef": self.dual_coef_, "intercept": self.intercept_})

    def _restore(self, state, arrays, folder):
        self.layer_, self.gamma_ = int(state["layer"]), float(state["gamma"])
        for key in ("mean", "scale", "support", "dual_coef", "intercept"):
            setattr(self, key + "_", arrays[key])


# --------------------------------------------------------------------------- DNN
class MapHead(nn.Module):
    """A small convolutional detector on one feature map (channel-standardised input).

    Maps larger than 16×16 are first average-pooled to 16×16 (keeps the early, large maps
    cheap on a CPU); then a 1×1 conv to ``width`` channels, two 3×3 convs (a 2×2 max-pool
    between them on 16×16 maps), a 1×1 conv to one channel, global average -> one logit.
    On a 3D network's maps (``spatial_dims`` 3) the same head in 3D: 16³, 3×3×3, 2×2×2.
    """

    MAX_SIZE = 16

    def __init__(self, channels: int, width: int = 32, size: int = 16, spatial_dims: int = 2):
        super().__init__()
        conv, max_pool, average = ((nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d) if spatial_dims == 2 else
                                   (nn.Conv3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.shrink = average(self.MAX_SIZE) if size > self.MAX_SIZE else nn.Identity()
        self.body = nn.Sequential(
            conv(channels, width, 1), nn.ReLU(),
            conv(width, width, 3, padding=1), nn.ReLU(),
            max_pool(2) if min(size, self.MAX_SIZE) >= 16 else nn.Identity(),
            conv(width, width, 3, padding=1), nn.ReLU(),
            conv(width, 1, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        # Average pooling commutes with the per-channel standardisation: pool first (cheaper).
        shape = (1, -1) + (1,) * (feature_map.dim() - 2)
        z = (self.shrink(feature_map) - self.mean.view(shape)) / self.std.view(shape)
        return self.body(z).mean(dim=tuple(range(1, z.dim())))


class DNN(LayerDetector):
    """Detector subnetworks (Metzen et al., "On detecting adversarial perturbations", ICLR 2017).

    Per conv layer a small convolutional detector (``MapHead``) on the layer's feature map,
    trained with binary cross-entropy (positives weighted by #benign/#adv) on A_fit; final
    score = the mean over layers of the detectors' logits. Defaults, chosen to stay cheap on a
    CPU: layers ``"stages"`` (the last conv tap of each stage; "all" or indices selectable),
    width 32 (maps above 16×16 average-pooled to 16×16 first), Adam lr 1e-3, 10 epochs, batch
    32, seeded (Metzen et al.: one detector per
    position, Adam, 20 epochs). Maps come from the FeatureSet when it kept them
    (``features.extract(..., keep_maps=detector.layers_)``), else from one extra forward pass.
    """

    name = "DNN"

    def __init__(self, layers="stages", width: int = 32, epochs: int = 10, lr: float = 1e-3,
                 batch_size: int = 32, seed: int = 0):
        self.layers = layers
        self.width = width
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_layer_choice(self)
        _check_integer(self, "width", 1)
        _check_integer(self, "epochs", 0)
        _check_real(self, "lr")
        _check_integer(self, "batch_size", 1)

    def _maps(self, model, feats: FeatureSet) -> dict[int, torch.Tensor]:
        if all(i in feats.maps for i in self.layers_):
            return feats.maps
        return feature_lib.extract(model, feats.images, progress=False, keep_maps=self.layers_,
                                   desc="DNN maps").maps

    def _fit(self, model, train, benign, adv):
        self.layers_ = resolve_layers(self.layers, model, len(train.pooled), conv_only=True)
        device = feature_lib.model_device(model)
        benign_maps, adv_maps = self._maps(model, benign), self._maps(model, adv)
        targets = torch.from_numpy(_labels01(len(benign), len(adv))).float()
        pos_weight = torch.tensor([len(benign) / max(len(adv), 1)], device=device)
        self.shapes_, self.heads_ = {}, {}
        for layer in tqdm(self.layers_, desc="DNN detectors", leave=False):
            inputs = torch.cat([benign_maps[layer], adv_maps[layer]])
            self.shapes_[layer] = list(inputs.shape[1:])
            self.heads_[layer] = self._train_head(layer, inputs, targets, pos_weight, device)

    def _new_head(self, layer: int) -> MapHead:
        channels, *spatial = self.shapes_[layer]
        return MapHead(channels, self.width, size=min(spatial), spatial_dims=len(spatial))

    def _train_head(self, layer, inputs, targets, pos_weight, device) -> MapHead:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1000 + layer)
            head = self._new_head(layer)
            over = (0, *range(2, inputs.dim()))  # every sample and position of a channel
            head.mean.copy_(inputs.mean(dim=over))
            head.std.copy_(inputs.std(dim=over).clamp_min(1e-6))
            head = head.to(device).train()
            optimiser = torch.optim.Adam(head.parameters(), lr=self.lr)
            order_gen = torch.Generator().manual_seed(self.seed * 1000 + layer)
            for _ in range(self.epochs):
                order = torch.randperm(len(inputs), generator=order_gen)
                for part in batches(len(inputs), self.batch_size):
                    rows = order[part]
                    loss = F.binary_cross_entropy_with_logits(
                        head(inputs[rows].to(device)), targets[rows].to(device), pos_weight=pos_weight)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        return head.eval()

    @torch.no_grad()
    def layer_scores(self, model, feats):
        self._check(feats)
        device = feature_lib.model_device(model)
        maps = self._maps(model, feats)
        out = np.empty((len(feats), len(self.layers_)))
        for column, layer in enumerate(self.layers_):
            head = self.heads_[layer].to(device).eval()
            for part in batches(len(feats), 256):
                out[part, column] = head(maps[layer][part].to(device)).double().cpu().numpy()
        return out

    def combine(self, layer_scores):
        return layer_scores.mean(axis=1)

    def _state(self):
        return {"layers": self.layers_, "shapes": {str(i): s for i, s in self.shapes_.items()}}, {}

    def save(self, folder):
        super().save(folder)
        buffer = io.BytesIO()
        torch.save({str(i): {k: v.cpu() for k, v in head.state_dict().items()} for i, head in self.heads_.items()},
                   buffer)
        atomic_write_bytes(Path(folder) / HEADS_FILE, buffer.getvalue())

    def _restore(self, state, arrays, folder):
        self.layers_ = list(state["layers"])
        self.shapes_ = {int(i): list(s) for i, s in state["shapes"].items()}
        path = folder / HEADS_FILE
        if not path.is_file():
            raise UserError(f"missing DNN detector weights {path}; run extract_features.py first")
        self.heads_ = {}
        try:
            states = torch.load(path, map_location="cpu", weights_only=True)
            for layer in self.layers_:
                head = self._new_head(layer)
                head.load_state_dict(states[str(layer)])
                self.heads_[layer] = head.eval()
        except Exception as err:  # noqa: BLE001 - an unreadable or foreign file is bad input
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path} holds no DNN heads for layers {self.layers_} ({first})") from None


# --------------------------------------------------------------------------- registry and the one path
DETECTORS: dict[str, type[Detector]] = {"KD": KD, "BU": BU, "KD+BU": KDBU, "LID": LID, "MAHA": MAHA,
                                        "SVM": SVM, "DNN": DNN}


def parse_names(text: str | Sequence[str] | None) -> list[str]:
    """"KD,LID" (case-insensitive) or a list -> registry names in registry order; None = all."""
    if text is None:
        return list(DETECTORS)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    known = {name.lower(): name for name in DETECTORS}
    unknown = [t for t in items if t.lower() not in known]
    if unknown or not items:
        raise UserError(f"unknown detector(s) {', '.join(unknown) or '(none given)'}; "
                        f"expected a comma list of {', '.join(DETECTORS)}")
    chosen = {known[t.lower()] for t in items}
    return [name for name in DETECTORS if name in chosen]


def folder_name(name: str) -> str:
    return name.replace("+", "_")


def fit_all(model, train: FeatureSet, benign: FeatureSet, adv: FeatureSet, names=None,
            options: dict[str, dict[str, Any]] | None = None, seed: int = 0,
            progress: bool = True) -> dict[str, Detector]:
    """Fit the named detectors (default all) with per-detector ``options`` (each records
    ``fit_seconds_``). Every detector's parameters are checked before the first is fitted."""
    options = options or {}
    chosen = {name: DETECTORS[name](seed=seed, **options.get(name, {})) for name in parse_names(names)}
    for detector in chosen.values():
        detector._check_params()
    for detector in tqdm(chosen.values(), desc="fit detectors", disable=not progress, leave=False):
        detector.fit(model, train, benign, adv)
    return chosen


def save_detectors(folder: str | Path, detectors: dict[str, Detector]) -> None:
    folder = Path(folder)
    for name, detector in detectors.items():
        detector.save(folder / folder_name(name))
    write_json(folder / "detectors.json", {"detectors": list(detectors)})


def load_detectors(folder: str | Path, names=None, hint: str = "run extract_features.py first") -> dict[str, Detector]:
    """Load the detectors saved in ``folder`` (all of them, or the named ones)."""
    folder = Path(folder)
    index = read_json(folder / "detectors.json", "detector index", hint)
    saved = index.get("detectors") if isinstance(index, dict) else None
    if not isinstance(saved, list) or not all(isinstance(name, str) for name in saved):
        raise UserError(f"{folder / 'detectors.json'} is not a detector index; {hint}")
    wanted = parse_names(names) if names is not None else [n for n in DETECTORS if n in saved]
    missing = [n for n in wanted if n not in saved]
    if missing:
        raise UserError(f"no fitted {', '.join(missing)} detector in {folder}; {hint}")
    return {name: DETECTORS[name].load(folder / folder_name(name), hint) for name in wanted}


def evaluate_rows(detectors: dict[str, Detector], model, benign: FeatureSet, adv_rows: dict[str, FeatureSet],
                  per_layer: bool = False, progress: bool = False,
                  scores: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Score one benign set once, and each named adversarial set, with every detector:
    {detector: {row: report}}. The report is ``metrics.detection_report`` plus ``score_seconds``
    (benign and that row) and, with ``per_layer`` for per-layer detectors, ``layer_auc`` {layer
    name: AUC}. The one scoring path for base and HFC rows. A ``scores`` dict, when given, is
    filled with the final scores: {detector: {"benign": ..., "adv": {row: ...}}} (the bootstrap's input)."""
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for name, detector in tqdm(detectors.items(), desc="score detectors", disable=not progress, leave=False):
        layered = per_layer and detector.per_layer
        score = detector.score_with_layers if layered else (lambda m, f, d=detector: (d.score(m, f), None))
        start = time.perf_counter()
        benign_scores, benign_layers = score(model, benign)
        benign_seconds = time.perf_counter() - start
        reports[name] = {}
        if scores is not None:
            scores[name] = {"benign": np.asarray(benign_scores), "adv": {}}
        for row, adv in adv_rows.items():
            start = time.perf_counter()
            adv_scores, adv_layers = score(model, adv)
            if scores is not None:
                scores[name]["adv"][row] = np.asarray(adv_scores)
            report: dict[str, Any] = {**metrics.detection_report(benign_scores, adv_scores),
                                      "score_seconds": benign_seconds + time.perf_counter() - start}
            if layered:
                report["layer_auc"] = {detector.layer_names_[layer]: metrics.roc_auc(benign_layers[:, j],
                                                                                      adv_layers[:, j])
                                       for j, layer in enumerate(detector.layers_)}
            reports[name][row] = report
    return reports


def evaluate(detectors: dict[str, Detector], model, benign: FeatureSet, adv: FeatureSet,
             per_layer: bool = False, progress: bool = False) -> dict[str, dict[str, Any]]:
    """``evaluate_rows`` for a single adversarial set: {detector: report}."""
    rows = evaluate_rows(detectors, model, benign, {"adv": adv}, per_layer, progress)
    return {name: by_row["adv"] for name, by_row in rows.items()}


# --------------------------------------------------------------------------- TYP (the arms race)
class TYP(LayerDetector):
    """Two-sided typicality (docs/PROTOCOL.md §10): the defender's answer to HFC, which hides AEs
    by making their features *more* typical of the target class than clean images are.

    Per kept layer l, ℓ_l(x) is the log-likelihood of the pooled feature under the Gaussian
    mixture of the *predicted* class at l. The training set is split in two halves (seeded,
    within each class): the mixtures are fitted on one (``gmm.fit_mixtures``: not the
    attacker's mixtures, which use every training image), and the benign median m_{l,c} and
    median absolute deviation s_{l,c} of ℓ_l are measured on the other, held-apart half, per
    class c (each image under its own class's mixture), so that they describe unseen clean
    images rather than the mixtures' own samples. With z_l = (ℓ_l − m_{l,c})/s_{l,c} for the
    predicted class c, a logistic regression (``StandardisedLogistic``) over the features |z_l|
    and z_l of every layer is fitted on A_fit's benign samples against the base AEs it is given
    (never HFC AEs, when used as the protocol's typicality defender).

    ``mirror`` (default on) makes the score two-sided: the fit also sees every AE reflected to
    the other tail (z → −z at every layer, |z| unchanged). Base AEs lie in the lower tail only,
    so without it the regression learns a one-sided score (it weighs the signed feature against
    |z|, and a feature at a mixture's mode scores like a typical one or lower); the reflection is
    the defender's prior that an over-typical deviation is as suspicious as an atypical one.

    Per-layer scores (``layer_scores``, hence the per-layer AUCs): the signed atypicality
    (m − ℓ)/s = −z, one-sided by construction (high for base AEs, low for HFC AEs). Parameters:
    ``layers`` (None = the conv taps with at most ``max_channels`` channels, HFC's rule
    ``gmm.select_layers``; or "all", "stages", indices), ``num_components``, ``kind``,
    ``reg_covar`` (as get_GMM.py's), ``mirror``, ``seed`` (the split, the mixtures, the
    regression's folds). Saved: the mixtures as a ``mixtures/`` folder (``Mixtures.save``), the
    medians, deviations and regression in ``arrays.npz``.
    """

    name = "TYP"
    MIXTURES_DIR = "mixtures"
    MAD_FLOOR = 1e-6

    def __init__(self, layers=None, max_channels: int = gmm.DEFAULT_MAX_CHANNELS,
                 num_components: int = gmm.DEFAULT_NUM_COMPONENTS, kind: str = "bayesian",
                 reg_covar: float = gmm.DEFAULT_REG_COVAR, mirror: bool = True, seed: int = 0):
        self.layers = layers
        self.max_channels = max_channels
        self.num_components = num_components
        self.kind = kind
        self.reg_covar = reg_covar
        self.mirror = mirror
        self.seed = seed

    def _check_params(self):
        super()._check_params()
        _check_layer_choice(self)
        _check_integer(self, "max_channels", 1)
        _check_integer(self, "num_components", 1)
        if self.kind not in gmm.KINDS:
            raise UserError(f"TYP detector: kind must be one of {', '.join(gmm.KINDS)}, got {self.kind!r}")
        _check_real(self, "reg_covar")
        if not isinstance(self.mirror, bool):
            raise UserError(f"TYP detector: mirror must be True or False, got {self.mirror!r}")

    def _resolve(self, model, train: FeatureSet) -> list[int]:
        num_layers = len(train.pooled)
        if self.layers is not None:
            return resolve_layers(self.layers, model, num_layers)
        channels = [int(p.shape[1]) for p in train.pooled]
        conv = list(getattr(model, "conv_layers", range(num_layers)))
        layers = gmm.select_layers(channels, conv, self.max_channels)
        if not layers:
            raise UserError(f"TYP detector: no conv layer has at most {self.max_channels} channels")
        return layers

    def halves(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the training samples (seeded, within each class): the half that fits the
        mixtures and the held-apart half that gives the medians and deviations."""
        labels = np.asarray(labels, np.int64)
        rng = np.random.default_rng([self.seed, 1])
        fit, held = [], []
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cut = (len(members) + 1) // 2
            fit.append(members[:cut])
            held.append(members[cut:])
        return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))

    def log_likelihoods(self, feats: FeatureSet, classes: np.ndarray | None = None) -> np.ndarray:
        """N×L: ℓ_l of every sample under the mixture of its class (default: the predicted one)."""
        classes = feats.predictions if classes is None else np.asarray(classes, np.int64)
        out = np.empty((len(feats), len(self.layers_)))
        for j, layer in enumerate(self.layers_):
            points = np.asarray(feats.pooled[layer], np.float64)
            for c in np.unique(classes):
                rows = classes == c
                out[rows, j] = self.mixtures_.log_likelihood(layer, int(c), points[rows])
        return out

    def _inputs(self, atypical: np.ndarray) -> np.ndarray:
        z = -atypical
        return np.concatenate([np.abs(z), z], axis=1)

    def _fit(self, model, train, benign, adv):
        if train.labels is None:
            raise ValueError("TYP needs the training labels")
        self.layers_ = self._resolve(model, train)
        num_classes = int(train.logits.shape[1])
        labels = np.asarray(train.labels, np.int64)
        fit_rows, held_rows = self.halves(labels)
        for part, rows in (("mixture", fit_rows), ("held-apart", held_rows)):
            counts = np.bincount(labels[rows], minlength=num_classes)
            if counts.min() < 2:
                raise UserError(f"TYP detector: the {part} half of the training set has {counts.tolist()} images "
                                "per class; every class needs at least 2 (use more training images)")
        self.mixtures_ = gmm.fit_mixtures(
            [p[fit_rows] for p in train.pooled], labels[fit_rows], self.layers_, self.num_components,
            kind=self.kind, seed=self.seed, n_jobs=1, classes=range(num_classes), reg_covar=self.reg_covar,
            layer_names=self.layer_names_, layer_channels=[int(p.shape[1]) for p in train.pooled],
            progress=False)
        held = train.subset(held_rows)
        values = self.log_likelihoods(held, held.labels)
        self.median_ = np.empty((len(self.layers_), num_classes))
        self.mad_ = np.empty_like(self.median_)
        for c in range(num_classes):
            rows = held.labels == c
            self.median_[:, c] = np.median(values[rows], axis=0)
            mad = np.median(np.abs(values[rows] - self.median_[:, c]), axis=0)
            self.mad_[:, c] = np.maximum(mad, self.MAD_FLOOR)
        benign_x, adv_x = self._inputs(self.layer_scores(model, benign)), self._inputs(self.layer_scores(model, adv))
        inputs, targets = np.concatenate([benign_x, adv_x]), _labels01(len(benign), len(adv))
        if self.mirror:
            mirrored = adv_x.copy()
            mirrored[:, len(self.layers_):] *= -1.0
            inputs, targets = np.concatenate([inputs, mirrored]), np.concatenate([targets, np.ones(len(adv), np.int64)])
        self.logistic_ = StandardisedLogistic().fit(inputs, targets, self.seed)

    def layer_scores(self, model, feats):
        """N×L signed atypicality (m − ℓ)/s under the predicted class."""
        self._check(feats)
        predicted = feats.predictions
        values = self.log_likelihoods(feats, predicted)
        return (self.median_.T[predicted] - values) / self.mad_.T[predicted]

    def combine(self, layer_scores):
        return self.logistic_.decision(self._inputs(layer_scores))

    def _state(self):
        return {"layers": self.layers_}, {"median": self.median_, "mad": self.mad_, **self.logistic_.arrays("lr__")}

    def save(self, folder):
        super().save(folder)
        self.mixtures_.save(Path(folder) / self.MIXTURES_DIR)

    def _restore(self, state, arrays, folder):
        self.layers_ = list(state["layers"])
        self.median_, self.mad_ = arrays["median"], arrays["mad"]
        self.logistic_ = StandardisedLogistic.from_arrays(arrays, "lr__")
        self.mixtures_ = gmm.load_mixtures(folder / self.MIXTURES_DIR, hint=f"fit the {self.name} detector again")
        if self.mixtures_.layers != self.layers_:
            raise ValueError(f"mixtures for layers {self.mixtures_.layers}, detector layers {self.layers_}")


# Detectors beyond the protocol's seven (docs/PROTOCOL.md §10): not fitted by extract_features.py,
# nor loaded by ``load_detectors``; the arms race (arms_race.py) fits and saves them itself.
EXTRA_DETECTORS: dict[str, type[Detector]] = {"TYP": TYP}
ALL_DETECTORS: dict[str, type[Detector]] = {**DETECTORS, **EXTRA_DETECTORS}
