"""The seven feature-space detectors behind one interface (PROTOCOL section 6).

Every detector has the same contract:

- ``fit(model, train, benign, adv)``: ``train`` = training-set FeatureSet with labels (class
  statistics for KD, MAHA; LID's reference batch), ``benign`` = A_fit clean + noise versions,
  ``adv`` = the successful A_fit AEs;
- ``score(model, feats) -> np.ndarray`` (N,), higher = more adversarial;
- per-layer detectors (KD, LID, MAHA, DNN) also give ``layer_scores(model, feats)`` (N×L over
  ``detector.layers``) and ``combine(layer_scores)``; ``score == combine(layer_scores)``;
- ``save(folder)`` / ``Class.load(folder)`` without pickle: ``settings.json`` (constructor
  settings and small state), ``arrays.npz`` (every fitted array, in the dtype the scoring code
  reads, so a loaded detector gives bit-identical scores), and for DNN ``heads.pt`` (state
  dicts, loaded with ``weights_only=True``). scikit-learn is used for fitting only; scores are
  computed here from the saved arrays (logistic regression, standardisation, RBF SVM).

``evaluate`` is the one scoring path for every row of every table (base and HFC AEs alike).
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.linalg import solve_triangular
from scipy.special import logsumexp
from sklearn.covariance import ledoit_wolf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC
from tqdm import tqdm

import features as feature_lib
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
    """

    def __init__(self):
        self.mean = self.scale = self.coef = None
        self.intercept = np.zeros(1)

    def fit(self, inputs: np.ndarray, is_adv: np.ndarray, seed: int) -> "StandardisedLogistic":
        inputs = np.asarray(inputs, np.float64)
        is_adv = np.asarray(is_adv, np.int64)
        counts = np.bincount(is_adv, minlength=2)
        if counts.min() == 0:
            raise ValueError("logistic regression needs benign and adversarial samples")
        self.mean = inputs.mean(axis=0)
        scale = inputs.std(axis=0)
        self.scale = np.where(scale > 1e-12, scale, 1.0)
        z = (inputs - self.mean) / self.scale
        best_c = 1.0
        folds = int(min(5, counts.min()))
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            losses = [cross_val_score(LogisticRegression(C=c, max_iter=5000), z, is_adv, cv=cv,
                                      scoring="neg_log_loss").mean() for c in LOGISTIC_CS]
            best_c = LOGISTIC_CS[int(np.argmax(losses))]
        model = LogisticRegression(C=best_c, max_iter=5000).fit(z, is_adv)
        self.coef = model.coef_[0].astype(np.float64)
        self.intercept = model.intercept_.astype(np.float64)
        return self

    def decision(self, inputs: np.ndarray) -> np.ndarray:
        z = (np.asarray(inputs, np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept[0]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale,
                f"{prefix}coef": self.coef, f"{prefix}intercept": self.intercept}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "StandardisedLogistic":
        out = cls()
        out.mean, out.scale = arrays[f"{prefix}mean"], arrays[f"{prefix}scale"]
        out.coef, out.intercept = arrays[f"{prefix}coef"], arrays[f"{prefix}intercept"]
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


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances in float64 (clipped at 0 against rounding)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(sq, 0.0)


# --------------------------------------------------------------------------- the base class
class Detector:
    """Common plumbing: settings, fitted layer names, save/load."""

    name = ""
    per_layer = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.layer_names: list[str] = []
        self.fit_seconds = float("nan")

    # -- to implement
    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def fit(self, model, train: FeatureSet, benign: FeatureSet, adv: FeatureSet) -> "Detector":
        raise NotImplementedError

    def score(self, model, feats: FeatureSet) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {}

    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> None:
        pass

    # -- shared
    def _start_fit(self, model, feats: FeatureSet) -> None:
        self.layer_names = _layer_names(model, feats)

    def _check(self, feats: FeatureSet) -> None:
        if not self.layer_names:
            raise ValueError(f"{self.name} is not fitted")
        if len(feats.pooled) != len(self.layer_names):
            raise ValueError(f"{self.name} was fitted on {len(self.layer_names)} layers, "
                             f"the features have {len(feats.pooled)}")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        state, arrays = self._state()
        save_npz(folder / ARRAYS_FILE, **arrays)
        write_json(folder / SETTINGS_FILE, {"name": self.name, "settings": self.settings(),
                                            "layer_names": self.layer_names, "state": state})

    @classmethod
    def load(cls, folder: str | Path) -> "Detector":
        folder = Path(folder)
        hint = "run extract_features.py first"
        saved = read_json(folder / SETTINGS_FILE, f"{cls.name} detector settings", hint)
        if saved.get("name") != cls.name:
            raise UserError(f"{folder} holds a {saved.get('name')!r} detector, not {cls.name}")
        detector = cls(**saved["settings"])
        detector.layer_names = list(saved["layer_names"])
        detector._restore(saved["state"], load_npz(folder / ARRAYS_FILE, f"{cls.name} detector arrays", hint),
                          folder)
        return detector


class LayerDetector(Detector):
    """A detector with one score per layer, combined into the final score."""

    per_layer = True

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.layers: list[int] = []

    def layer_scores(self, model, feats: FeatureSet) -> np.ndarray:
        raise NotImplementedError

    def combine(self, layer_scores: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score(self, model, feats: FeatureSet) -> np.ndarray:
        return self.combine(self.layer_scores(model, feats))

    def score_with_layers(self, model, feats: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        layer_scores = self.layer_scores(model, feats)
        return self.combine(layer_scores), layer_scores


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
        sq = _squared_distances(points[part], samples)
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
        super().__init__(seed)
        self.bandwidth = float(bandwidth)
        self.layers_spec = layers
        self.score_layer_spec = int(score_layer)
        self.score_layer = -1
        self.train_features: dict[int, np.ndarray] = {}
        self.train_labels = np.zeros(0, np.int64)
        self.num_classes = 0

    def settings(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "layers": self.layers_spec, "score_layer": self.score_layer_spec,
                "seed": self.seed}

    def fit(self, model, train, benign=None, adv=None) -> "KD":
        if train.labels is None:
            raise ValueError("KD needs the training labels")
        self._start_fit(model, train)
        num_layers = len(train.pooled)
        self.score_layer = self.score_layer_spec % num_layers
        layers = set(resolve_layers(self.layers_spec, model, num_layers)) | {self.score_layer}
        self.layers = sorted(layers)
        self.num_classes = int(train.logits.shape[1])
        missing = sorted(set(range(self.num_classes)) - set(np.unique(train.labels).tolist()))
        if missing:
            raise ValueError(f"KD: classes {missing} have no training samples")
        self.train_labels = train.labels.astype(np.int64)
        self.train_features = {i: train.pooled[i].astype(np.float32) for i in self.layers}
        return self

    def _layer_score(self, feats: FeatureSet, layer: int) -> np.ndarray:
        predicted = feats.predictions
        points = np.asarray(feats.pooled[layer], np.float64)
        out = np.empty(len(feats))
        for c in range(self.num_classes):
            rows = predicted == c
            if rows.any():
                samples = self.train_features[layer][self.train_labels == c]
                out[rows] = -gaussian_kde_log_density(points[rows], samples, self.bandwidth)
        return out

    def layer_scores(self, model, feats):
        self._check(feats)
        return np.stack([self._layer_score(feats, layer) for layer in self.layers], axis=1)

    def combine(self, layer_scores):
        return layer_scores[:, self.layers.index(self.score_layer)]

    def score(self, model, feats):
        # Only the score layer: the same per-layer function, so equal to combine(layer_scores).
        self._check(feats)
        return self._layer_score(feats, self.score_layer)

    def _state(self):
        arrays = {"train_labels": self.train_labels,
                  **{f"train_{i}": f for i, f in self.train_features.items()}}
        return {"layers": self.layers, "score_layer": self.score_layer, "num_classes": self.num_classes}, arrays

    def _restore(self, state, arrays, folder):
        self.layers, self.score_layer = list(state["layers"]), int(state["score_layer"])
        self.num_classes = int(state["num_classes"])
        self.train_labels = arrays["train_labels"]
        self.train_features = {i: arrays[f"train_{i}"] for i in self.layers}


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
        super().__init__(seed)
        self.passes = int(passes)
        self.batch_size = int(batch_size)

    def settings(self):
        return {"passes": self.passes, "batch_size": self.batch_size, "seed": self.seed}

    def fit(self, model, train, benign=None, adv=None) -> "BU":
        self._start_fit(model, train)
        return self

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
        super().__init__(seed)
        self.kd = KD(bandwidth=bandwidth, layers=[-1], seed=seed)
        self.bu = BU(passes=passes, seed=seed)
        self.logistic = StandardisedLogistic()

    def settings(self):
        return {"bandwidth": self.kd.bandwidth, "passes": self.bu.passes, "seed": self.seed}

    def _pair(self, model, feats):
        return np.stack([self.kd.score(model, feats), self.bu.score(model, feats)], axis=1)

    def fit(self, model, train, benign, adv) -> "KDBU":
        self._start_fit(model, train)
        self.kd.fit(model, train)
        self.bu.fit(model, train)
        inputs = np.concatenate([self._pair(model, benign), self._pair(model, adv)])
        self.logistic.fit(inputs, _labels01(len(benign), len(adv)), self.seed)
        return self

    def score(self, model, feats):
        self._check(feats)
        return self.logistic.decision(self._pair(model, feats))

    def _state(self):
        kd_state, kd_arrays = self.kd._state()
        return ({"kd": kd_state},
                {**{f"kd__{k}": v for k, v in kd_arrays.items()}, **self.logistic.arrays("lr__")})

    def _restore(self, state, arrays, folder):
        self.kd._restore(state["kd"], {k[4:]: v for k, v in arrays.items() if k.startswith("kd__")}, folder)
        self.kd.layer_names = self.bu.layer_names = list(self.layer_names)
        self.logistic = StandardisedLogistic.from_arrays(arrays, "lr__")


# --------------------------------------------------------------------------- LID
def lid_mle(query: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Ma et al.'s maximum-likelihood LID of every query row, from its k nearest reference rows:
    ``−((1/k) Σ_i log(d_i / d_k))^(−1)``. ``exclude_self``: query row i *is* reference row i,
    which is then not counted as its own neighbour. Zero distances (duplicates) are clamped to
    1e-12 and the mean log to at most −1e-12, so the estimate stays finite."""
    dist = np.sqrt(_squared_distances(query, reference))
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
    made k = 9 -- PROTOCOL section 8.) Defaults: k = 20, batch 100, all layers.
    """

    name = "LID"

    def __init__(self, k: int = 20, reference_size: int = 100, layers="all", seed: int = 0):
        super().__init__(seed)
        self.k, self.reference_size, self.layers_spec = int(k), int(reference_size), layers
        self.reference: dict[int, np.ndarray] = {}
        self.logistic = StandardisedLogistic()

    def settings(self):
        return {"k": self.k, "reference_size": self.reference_size, "layers": self.layers_spec, "seed": self.seed}

    def fit(self, model, train, benign, adv) -> "LID":
        self._start_fit(model, train)
        if len(train) < self.k:
            raise ValueError(f"LID needs at least k={self.k} clean reference samples, got {len(train)}")
        self.layers = resolve_layers(self.layers_spec, model, len(train.pooled))
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(len(train), size=min(self.reference_size, len(train)), replace=False))
        self.reference = {i: train.pooled[i][chosen].astype(np.float32) for i in self.layers}
        inputs = np.concatenate([self.layer_scores(model, benign), self.layer_scores(model, adv)])
        self.logistic.fit(inputs, _labels01(len(benign), len(adv)), self.seed)
        return self

    def layer_scores(self, model, feats):
        self._check(feats)
        return np.stack([lid_mle(feats.pooled[i], self.reference[i], self.k) for i in self.layers], axis=1)

    def combine(self, layer_scores):
        return self.logistic.decision(layer_scores)

    def _state(self):
        return ({"layers": self.layers},
                {**{f"reference_{i}": r for i, r in self.reference.items()}, **self.logistic.arrays("lr__")})

    def _restore(self, state, arrays, folder):
        self.layers = list(state["layers"])
        self.reference = {i: arrays[f"reference_{i}"] for i in self.layers}
        self.logistic = StandardisedLogistic.from_arrays(arrays, "lr__")


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
    (as Lee et al.; the HFC code increases it -- PROTOCOL section 8), then the layer is
    re-scored on x' (not clipped, as Lee et al.). Logistic regression over the layers, fitted on
    A_fit. Default layers: ``"stages"`` -- the last tap of each stage, where Lee et al. take
    their features (ResNet-50: 4 taps; VGG: 5 conv taps + the FC features); ``"all"`` or indices
    selectable. Cost of pre-processing: one forward with input gradients per batch, then per
    layer one backward (summing the per-sample distances over the batch is valid because
    samples are independent in eval mode) and one forward truncated at the layer.
    """

    name = "MAHA"

    def __init__(self, magnitude: float = 0.0005, layers="stages", batch_size: int = 16, seed: int = 0):
        super().__init__(seed)
        self.magnitude, self.layers_spec, self.batch_size = float(magnitude), layers, int(batch_size)
        self.means: dict[int, np.ndarray] = {}
        self.precisions: dict[int, np.ndarray] = {}
        self.logistic = StandardisedLogistic()

    def settings(self):
        return {"magnitude": self.magnitude, "layers": self.layers_spec, "batch_size": self.batch_size,
                "seed": self.seed}

    def fit(self, model, train, benign, adv) -> "MAHA":
        if train.labels is None:
            raise ValueError("MAHA needs the training labels")
        self._start_fit(model, train)
        self.layers = resolve_layers(self.layers_spec, model, len(train.pooled))
        num_classes = int(train.logits.shape[1])
        for i in self.layers:
            means, precision = tied_gaussian(train.pooled[i], train.labels, num_classes)
            # Stored (and always read) as float32: a loaded detector scores bit-identically.
            self.means[i], self.precisions[i] = means.astype(np.float32), precision.astype(np.float32)
        inputs = np.concatenate([self.layer_scores(model, benign), self.layer_scores(model, adv)])
        self.logistic.fit(inputs, _labels01(len(benign), len(adv)), self.seed)
        return self

    def _distance(self, layer: int, pooled: np.ndarray) -> np.ndarray:
        return half_mahalanobis(pooled, self.means[layer], self.precisions[layer]).min(axis=1)

    def layer_scores(self, model, feats):
        self._check(feats)
        if self.magnitude == 0.0:
            return np.stack([self._distance(i, feats.pooled[i]) for i in self.layers], axis=1)
        return self._preprocessed_scores(model, feats)

    def _preprocessed_scores(self, model, feats: FeatureSet) -> np.ndarray:
        device = feature_lib.model_device(model)
        model.eval()
        means = {i: torch.from_numpy(self.means[i]).to(device) for i in self.layers}
        precisions = {i: torch.from_numpy(self.precisions[i]).to(device) for i in self.layers}
        out = np.empty((len(feats), len(self.layers)))
        for part in tqdm(list(batches(len(feats), self.batch_size)), desc="MAHA pre-processing", leave=False):
            x = feats.images[part].to(device).requires_grad_(True)
            with torch.enable_grad():
                _, maps = model.forward_maps(x)
                for column, layer in enumerate(self.layers):
                    feature = network.pooled(maps[layer])
                    diff = feature.unsqueeze(1) - means[layer].unsqueeze(0)           # N×K×C
                    dist = 0.5 * torch.einsum("nkc,cd,nkd->nk", diff, precisions[layer], diff)
                    closest = dist.detach().argmin(dim=1, keepdim=True)
                    loss = dist.gather(1, closest).sum()
                    (grad,) = torch.autograd.grad(loss, x, retain_graph=column < len(self.layers) - 1)
                    moved = x.detach() - self.magnitude * grad.sign()
                    with torch.no_grad():
                        feature = network.pooled(model.forward_to(moved, layer))
                    out[part, column] = self._distance(layer, feature.float().cpu().numpy())
        return out

    def combine(self, layer_scores):
        return self.logistic.decision(layer_scores)

    def _state(self):
        arrays = {**{f"means_{i}": m for i, m in self.means.items()},
                  **{f"precision_{i}": p for i, p in self.precisions.items()}, **self.logistic.arrays("lr__")}
        return {"layers": self.layers}, arrays

    def _restore(self, state, arrays, folder):
        self.layers = list(state["layers"])
        self.means = {i: arrays[f"means_{i}"] for i in self.layers}
        self.precisions = {i: arrays[f"precision_{i}"] for i in self.layers}
        self.logistic = StandardisedLogistic.from_arrays(arrays, "lr__")


# --------------------------------------------------------------------------- SVM
class SVM(Detector):
    """RBF support vector machine on the z-scored last pooled feature (the HFC papers' SVM
    baseline, PROTOCOL section 6), trained on A_fit benign vs. AEs with scikit-learn's SVC
    (C = 1, gamma = "scale"); score = the SVM decision value, computed here from the saved
    support vectors, dual coefficients, intercept and gamma."""

    name = "SVM"

    def __init__(self, c: float = 1.0, gamma="scale", layer: int = -1, seed: int = 0):
        super().__init__(seed)
        self.c, self.gamma_spec, self.layer_spec = float(c), gamma, int(layer)
        self.layer = -1
        self.gamma = 0.0
        self.mean = self.scale = self.support = self.dual_coef = None
        self.intercept = np.zeros(1)

    def settings(self):
        return {"c": self.c, "gamma": self.gamma_spec, "layer": self.layer_spec, "seed": self.seed}

    def _standardised(self, feats: FeatureSet) -> np.ndarray:
        return (np.asarray(feats.pooled[self.layer], np.float64) - self.mean) / self.scale

    def fit(self, model, train, benign, adv) -> "SVM":
        self._start_fit(model, train)
        self.layer = self.layer_spec % len(train.pooled)
        inputs = np.concatenate([benign.pooled[self.layer], adv.pooled[self.layer]]).astype(np.float64)
        self.mean = inputs.mean(axis=0)
        scale = inputs.std(axis=0)
        self.scale = np.where(scale > 1e-12, scale, 1.0)
        svc = SVC(C=self.c, kernel="rbf", gamma=self.gamma_spec, random_state=self.seed)
        svc.fit((inputs - self.mean) / self.scale, _labels01(len(benign), len(adv)))
        self.gamma = float(svc._gamma)  # the resolved value of "scale" / "auto"
        self.support = svc.support_vectors_.astype(np.float64)
        self.dual_coef = svc.dual_coef_[0].astype(np.float64)
        self.intercept = svc.intercept_.astype(np.float64)
        return self

    def score(self, model, feats):
        self._check(feats)
        z = self._standardised(feats)
        out = np.empty(len(z))
        for part in batches(len(z), 512):
            kernel = np.exp(-self.gamma * _squared_distances(z[part], self.support))
            out[part] = kernel @ self.dual_coef + self.intercept[0]
        return out

    def _state(self):
        return ({"layer": self.layer, "gamma": self.gamma},
                {"mean": self.mean, "scale": self.scale, "support": self.support,
                 "dual_coef": self.dual_coef, "intercept": self.intercept})

    def _restore(self, state, arrays, folder):
        self.layer, self.gamma = int(state["layer"]), float(state["gamma"])
        for key in ("mean", "scale", "support", "dual_coef", "intercept"):
            setattr(self, key, arrays[key])


# --------------------------------------------------------------------------- DNN
class MapHead(nn.Module):
    """A small convolutional detector on one feature map (channel-standardised input).

    Maps larger than 16×16 are first average-pooled to 16×16 (keeps the early, large maps
    cheap on a CPU); then a 1×1 conv to ``width`` channels, two 3×3 convs (a 2×2 max-pool
    between them on 16×16 maps), a 1×1 conv to one channel, global average -> one logit.
    """

    MAX_SIZE = 16

    def __init__(self, channels: int, width: int = 32, size: int = 16):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.shrink = nn.AdaptiveAvgPool2d(self.MAX_SIZE) if size > self.MAX_SIZE else nn.Identity()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2) if min(size, self.MAX_SIZE) >= 16 else nn.Identity(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        # Average pooling commutes with the per-channel standardisation: pool first (cheaper).
        z = (self.shrink(feature_map) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.body(z).mean(dim=(1, 2, 3))


class DNN(LayerDetector):
    """Detector subnetworks (Metzen et al., "On detecting adversarial perturbations", ICLR 2017).

    Per conv layer a small convolutional detector (``MapHead``) on the layer's feature map,
    trained with binary cross-entropy (positives weighted by #benign/#adv) on A_fit; final
    score = the mean over layers of the detectors' logits. Defaults, chosen to stay cheap on a
    CPU: layers ``"stages"`` (the last conv tap of each stage; "all" or indices selectable),
    width 32 (maps above 16×16 average-pooled to 16×16 first), Adam lr 1e-3, 10 epochs, batch
    32, seeded (Metzen et al.: one detector per
    position, Adam, 20 epochs). Maps come from the FeatureSet when it kept them
    (``features.extract(..., keep_maps=detector.layers)``), else from one extra forward pass.
    """

    name = "DNN"

    def __init__(self, layers="stages", width: int = 32, epochs: int = 10, lr: float = 1e-3,
                 batch_size: int = 32, seed: int = 0):
        super().__init__(seed)
        self.layers_spec, self.width, self.epochs = layers, int(width), int(epochs)
        self.lr, self.batch_size = float(lr), int(batch_size)
        self.heads: dict[int, MapHead] = {}
        self.shapes: dict[int, list[int]] = {}

    def settings(self):
        return {"layers": self.layers_spec, "width": self.width, "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "seed": self.seed}

    def _maps(self, model, feats: FeatureSet) -> dict[int, torch.Tensor]:
        if all(i in feats.maps for i in self.layers):
            return feats.maps
        return feature_lib.extract(model, feats.images, progress=False, keep_maps=self.layers,
                                   desc="DNN maps").maps

    def fit(self, model, train, benign, adv) -> "DNN":
        self._start_fit(model, train)
        self.layers = resolve_layers(self.layers_spec, model, len(train.pooled), conv_only=True)
        device = feature_lib.model_device(model)
        benign_maps, adv_maps = self._maps(model, benign), self._maps(model, adv)
        targets = torch.from_numpy(_labels01(len(benign), len(adv))).float()
        pos_weight = torch.tensor([len(benign) / max(len(adv), 1)], device=device)
        for layer in tqdm(self.layers, desc="DNN detectors", leave=False):
            inputs = torch.cat([benign_maps[layer], adv_maps[layer]])
            self.shapes[layer] = list(inputs.shape[1:])
            self.heads[layer] = self._train_head(layer, inputs, targets, pos_weight, device)
        return self

    def _new_head(self, layer: int) -> MapHead:
        channels, height, width = self.shapes[layer]
        return MapHead(channels, self.width, size=min(height, width))

    def _train_head(self, layer, inputs, targets, pos_weight, device) -> MapHead:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1000 + layer)
            head = self._new_head(layer)
            head.mean.copy_(inputs.mean(dim=(0, 2, 3)))
            head.std.copy_(inputs.std(dim=(0, 2, 3)).clamp_min(1e-6))
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
        out = np.empty((len(feats), len(self.layers)))
        for column, layer in enumerate(self.layers):
            head = self.heads[layer].to(device).eval()
            for part in batches(len(feats), 256):
                out[part, column] = head(maps[layer][part].to(device)).double().cpu().numpy()
        return out

    def combine(self, layer_scores):
        return layer_scores.mean(axis=1)

    def _state(self):
        return {"layers": self.layers, "shapes": {str(i): s for i, s in self.shapes.items()}}, {}

    def save(self, folder):
        super().save(folder)
        buffer = io.BytesIO()
        torch.save({str(i): {k: v.cpu() for k, v in head.state_dict().items()} for i, head in self.heads.items()},
                   buffer)
        atomic_write_bytes(Path(folder) / HEADS_FILE, buffer.getvalue())

    def _restore(self, state, arrays, folder):
        self.layers = list(state["layers"])
        self.shapes = {int(i): list(s) for i, s in state["shapes"].items()}
        path = folder / HEADS_FILE
        if not path.is_file():
            raise UserError(f"missing DNN detector weights {path}; run extract_features.py first")
        states = torch.load(path, map_location="cpu", weights_only=True)
        for layer in self.layers:
            head = self._new_head(layer)
            head.load_state_dict(states[str(layer)])
            self.heads[layer] = head.eval()


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
    """Fit the named detectors (default all) with per-detector ``options``; records
    ``detector.fit_seconds``."""
    options = options or {}
    fitted: dict[str, Detector] = {}
    for name in tqdm(parse_names(names), desc="fit detectors", disable=not progress, leave=False):
        detector = DETECTORS[name](seed=seed, **options.get(name, {}))
        start = time.perf_counter()
        detector.fit(model, train, benign, adv)
        detector.fit_seconds = time.perf_counter() - start
        fitted[name] = detector
    return fitted


def save_detectors(folder: str | Path, detectors: dict[str, Detector]) -> None:
    folder = Path(folder)
    for name, detector in detectors.items():
        detector.save(folder / folder_name(name))
    write_json(folder / "detectors.json", {"detectors": list(detectors)})


def load_detectors(folder: str | Path, names=None) -> dict[str, Detector]:
    """Load the detectors saved in ``folder`` (all of them, or the named ones)."""
    folder = Path(folder)
    hint = "run extract_features.py first"
    saved = read_json(folder / "detectors.json", "detector index", hint)["detectors"]
    wanted = parse_names(names) if names is not None else [n for n in DETECTORS if n in saved]
    missing = [n for n in wanted if n not in saved]
    if missing:
        raise UserError(f"no fitted {', '.join(missing)} detector in {folder}; {hint}")
    return {name: DETECTORS[name].load(folder / folder_name(name)) for name in wanted}


def evaluate_rows(detectors: dict[str, Detector], model, benign: FeatureSet, adv_rows: dict[str, FeatureSet],
                  per_layer: bool = False, progress: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """Score one benign set once, and each named adversarial set, with every detector:
    {detector: {row: report}}. The report is ``metrics.detection_report`` plus ``score_seconds``
    (benign and that row) and, with ``per_layer`` for per-layer detectors, ``layer_auc`` {layer
    name: AUC}. The one scoring path for base and HFC rows."""
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    for name, detector in tqdm(detectors.items(), desc="score detectors", disable=not progress, leave=False):
        layered = per_layer and detector.per_layer
        score = detector.score_with_layers if layered else (lambda m, f, d=detector: (d.score(m, f), None))
        start = time.perf_counter()
        benign_scores, benign_layers = score(model, benign)
        benign_seconds = time.perf_counter() - start
        reports[name] = {}
        for row, adv in adv_rows.items():
            start = time.perf_counter()
            adv_scores, adv_layers = score(model, adv)
            report: dict[str, Any] = {**metrics.detection_report(benign_scores, adv_scores),
                                      "score_seconds": benign_seconds + time.perf_counter() - start}
            if layered:
                report["layer_auc"] = {detector.layer_names[layer]: metrics.roc_auc(benign_layers[:, j],
                                                                                     adv_layers[:, j])
                                       for j, layer in enumerate(detector.layers)}
            reports[name][row] = report
    return reports


def evaluate(detectors: dict[str, Detector], model, benign: FeatureSet, adv: FeatureSet,
             per_layer: bool = False, progress: bool = False) -> dict[str, dict[str, Any]]:
    """``evaluate_rows`` for a single adversarial set: {detector: report}."""
    rows = evaluate_rows(detectors, model, benign, {"adv": adv}, per_layer, progress)
    return {name: by_row["adv"] for name, by_row in rows.items()}
