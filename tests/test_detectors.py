"""Detectors (detectors.py) and the feature pass (features.py).

Synthetic feature clouds with a known shift (AUC well above 0.5 when the AEs are outliers,
about 0.5 when they are not), the estimators against scipy / scikit-learn, and
save -> load -> identical scores on a tiny real network.
"""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.spatial.distance import mahalanobis
from sklearn.base import clone
from sklearn.covariance import LedoitWolf
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KernelDensity

import detectors as D
import features
import metrics
import network
from features import FeatureSet
from utils import UserError

DIMS = (6, 12)


def make_set(pooled, predicted, labels=None, maps=None):
    n = len(predicted)
    logits = np.zeros((n, 2), np.float32)
    logits[np.arange(n), predicted] = 1.0
    return FeatureSet(images=torch.zeros(n, 3, 4, 4), logits=logits,
                      pooled=[np.asarray(p, np.float32) for p in pooled], labels=labels, maps=maps or {})


def clouds(rng, n, shift):
    """Two classes (mean 0 / 2 per dimension), optionally shifted; the class is predicted."""
    labels = rng.integers(0, 2, n)
    return make_set([rng.normal(size=(n, d)) + 2.0 * labels[:, None] + shift for d in DIMS], labels, labels)


def protocol_sets(shift, seed=0):
    rng = np.random.default_rng(seed)
    train = clouds(rng, 300, 0.0)
    fit_benign, fit_adv = clouds(rng, 160, 0.0), clouds(rng, 80, shift)
    eval_benign, eval_adv = clouds(rng, 160, 0.0), clouds(rng, 80, shift)
    return train, fit_benign, fit_adv, eval_benign, eval_adv


CLOUD_DETECTORS = {"KD": {}, "LID": {"k": 10, "reference_size": 100}, "MAHA": {"magnitude": 0.0, "layers": "all"},
                   "SVM": {}}


@pytest.mark.parametrize("name", sorted(CLOUD_DETECTORS))
def test_detectors_flag_outlying_clouds_and_not_identical_ones(name):
    for shift, low, high in ((4.0, 0.9, 1.0), (0.0, 0.35, 0.65)):
        train, fit_benign, fit_adv, eval_benign, eval_adv = protocol_sets(shift)
        detector = D.DETECTORS[name](**CLOUD_DETECTORS[name]).fit(None, train, fit_benign, fit_adv)
        auc = metrics.roc_auc(detector.score(None, eval_benign), detector.score(None, eval_adv))
        assert low <= auc <= high, (name, shift, auc)


class FakeHeadModel(nn.Module):
    """Only what BU needs: a cached head input (tap 0) and a dropout head."""

    head_input_index = 0

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(DIMS[0], 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0] * DIMS[0], [-1.0] * DIMS[0]]))
            self.linear.bias.zero_()

    def stochastic_head(self, feature):
        return self.linear(nn.functional.dropout(feature, 0.5, training=True))


def test_bu_flags_features_that_make_dropout_uncertain():
    rng = np.random.default_rng(0)
    model = FakeHeadModel()
    # Large but balanced activations: dropout flips the prediction from pass to pass.
    def sets(scale, n):
        feats = rng.normal(size=(n, DIMS[0])) * scale
        return make_set([feats, np.zeros((n, 1))], np.zeros(n, np.int64))
    quiet, loud, also_quiet = sets(0.05, 100), sets(3.0, 50), sets(0.05, 50)
    bu = D.BU(passes=30).fit(model, quiet)
    assert metrics.roc_auc(bu.score(model, quiet), bu.score(model, loud)) > 0.9
    assert 0.3 < metrics.roc_auc(bu.score(model, quiet), bu.score(model, also_quiet)) < 0.7
    # seeded masks: the same inputs give the same scores, call after call
    np.testing.assert_array_equal(bu.score(model, loud), bu.score(model, loud))


def test_dnn_learns_a_map_pattern():
    rng = np.random.default_rng(0)

    def sets(n, bump):
        maps = rng.normal(size=(n, 4, 8, 8)).astype(np.float32)
        maps[:, 1, 2:5, 2:5] += bump
        pooled = maps.mean(axis=(2, 3))
        return make_set([pooled], np.zeros(n, np.int64), maps={0: torch.from_numpy(maps)})
    dnn = D.DNN(layers="all", epochs=15, seed=0).fit(None, sets(10, 0.0), sets(120, 0.0), sets(60, 1.5))
    assert metrics.roc_auc(dnn.score(None, sets(80, 0.0)), dnn.score(None, sets(40, 1.5))) > 0.9


# Every detector with non-default parameters, and what its fit learns (besides layer_names_
# and fit_seconds_, which every fit records).
CONTRACT = {
    "KD": ({"bandwidth": 0.7, "layers": [0], "score_layer": 0, "seed": 3},
           {"layers_", "score_layer_", "num_classes_", "train_labels_", "train_features_"}),
    "BU": ({"passes": 7, "batch_size": 16, "seed": 3}, set()),
    "KD+BU": ({"bandwidth": 0.7, "passes": 7, "seed": 3}, {"kd_", "bu_", "logistic_"}),
    "LID": ({"k": 5, "reference_size": 20, "layers": [0, 1], "seed": 3}, {"layers_", "reference_", "logistic_"}),
    "MAHA": ({"magnitude": 0.0, "layers": "all", "batch_size": 4, "seed": 3},
             {"layers_", "means_", "precisions_", "logistic_"}),
    "SVM": ({"c": 0.5, "gamma": 0.1, "layer": 0, "seed": 3},
            {"layer_", "gamma_", "mean_", "scale_", "support_", "dual_coef_", "intercept_"}),
    "DNN": ({"layers": "all", "width": 4, "epochs": 1, "lr": 0.01, "batch_size": 8, "seed": 3},
            {"layers_", "shapes_", "heads_"}),
    "TYP": ({"layers": [0, 1], "max_channels": 64, "num_components": 2, "kind": "em", "reg_covar": 0.01,
             "mirror": False, "seed": 3}, {"layers_", "mixtures_", "median_", "mad_", "logistic_"}),
}


def learned(detector):
    return {name for name in vars(detector) if name.endswith("_") and not name.startswith("__")}


def map_clouds(rng, n, shift):
    """Two classes of 4×4 maps (6 and 12 channels); pooled = their spatial means (for DNN)."""
    labels = rng.integers(0, 2, n)
    maps = [(rng.normal(size=(n, d, 4, 4)) + 2.0 * labels[:, None, None, None] + shift).astype(np.float32)
            for d in DIMS]
    return make_set([m.mean(axis=(2, 3)) for m in maps], labels, labels,
                    maps={i: torch.from_numpy(m) for i, m in enumerate(maps)})


@pytest.mark.parametrize("name", list(CONTRACT))
def test_detector_follows_the_estimator_contract(name, tmp_path, monkeypatch):
    """scikit-learn's conventions: parameters stored verbatim (get_params / clone round trip),
    validated at fit, learned state only in trailing-underscore attributes, a clear error when
    scoring unfitted, and save -> load -> identical scores."""
    monkeypatch.setattr(D, "LOGISTIC_CS", (0.1, 10.0))  # a shorter cross-validated C search: fast
    cls, (params, fitted_attrs) = D.ALL_DETECTORS[name], CONTRACT[name]
    assert set(params) == set(cls().get_params())  # every constructor parameter is exercised
    detector = cls(**params)
    assert detector.get_params(deep=False) == params == detector.get_params()
    assert all(detector.get_params()[key] is value for key, value in params.items())
    assert type(detector)(**detector.get_params()).get_params() == params
    assert clone(detector).get_params() == params  # sklearn's clone checks identity of each parameter
    assert learned(detector) == set() and name[:2] in repr(detector)
    assert detector.set_params(seed=4) is detector and detector.get_params()["seed"] == 4
    detector.set_params(seed=params["seed"])
    with pytest.raises(ValueError, match="Invalid parameter"):
        detector.set_params(nonsense=1)

    rng = np.random.default_rng(0)
    model = FakeHeadModel()
    train, benign, adv, query = map_clouds(rng, 40, 0.0), map_clouds(rng, 20, 0.0), map_clouds(rng, 10, 3.0), \
        map_clouds(rng, 12, 1.0)
    with pytest.raises(NotFittedError, match=re.escape(f"{name} detector is not fitted: call fit")):
        detector.score(model, query)
    with pytest.raises(UserError, match="seed must be an integer >= 0"):  # checked at fit, not before
        cls(**{**params, "seed": -1}).fit(model, train, benign, adv)

    assert detector.fit(model, train, benign, adv) is detector
    assert learned(detector) == fitted_attrs | {"layer_names_", "fit_seconds_"}
    assert detector.get_params() == params  # fit changes no parameter
    scores = detector.score(model, query)
    assert scores.shape == (len(query),) and np.isfinite(scores).all()

    detector.save(tmp_path)
    loaded = cls.load(tmp_path)
    assert loaded.get_params() == params and learned(loaded) == learned(detector)
    assert loaded.fit_seconds_ == detector.fit_seconds_
    np.testing.assert_array_equal(loaded.score(model, query), scores)
    with pytest.raises(NotFittedError):
        cls(**params).save(tmp_path / "unfitted")


def test_kd_matches_sklearn_kernel_density():
    rng = np.random.default_rng(1)
    samples, points = rng.normal(size=(200, 5)), rng.normal(size=(30, 5)) * 1.5
    for bandwidth in (0.5, 1.0):
        expected = KernelDensity(bandwidth=bandwidth, kernel="gaussian").fit(samples).score_samples(points)
        np.testing.assert_allclose(D.gaussian_kde_log_density(points, samples, bandwidth), expected, rtol=1e-6)
    # the detector: -log density under the *predicted* class, per layer
    train = clouds(rng, 120, 0.0)
    query = clouds(rng, 20, 1.0)
    kd = D.KD(bandwidth=0.8).fit(None, train, None, None)
    layer = 1
    expected = np.empty(len(query))
    for c in (0, 1):
        rows = query.predictions == c
        density = KernelDensity(bandwidth=0.8).fit(train.pooled[layer][train.labels == c].astype(np.float64))
        expected[rows] = -density.score_samples(query.pooled[layer][rows].astype(np.float64))
    np.testing.assert_allclose(kd.score(None, query), expected, rtol=1e-6)
    np.testing.assert_array_equal(kd.layer_scores(None, query)[:, 1], kd.score(None, query))


@pytest.mark.parametrize("d", [2, 5])
def test_lid_recovers_subspace_dimension(d):
    rng = np.random.default_rng(d)
    basis = np.linalg.qr(rng.normal(size=(30, d)))[0]            # a d-dim subspace of R^30
    reference = rng.normal(size=(1000, d)) @ basis.T
    query = rng.normal(size=(200, d)) @ basis.T
    assert D.lid_mle(query, reference, k=20).mean() == pytest.approx(d, rel=0.2)


def test_lid_never_counts_a_sample_as_its_own_neighbour():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(30, 4))
    with_self = D.lid_mle(batch, batch, k=5, exclude_self=True)
    for i in (0, 17):
        others = np.delete(batch, i, axis=0)
        assert with_self[i] == pytest.approx(D.lid_mle(batch[i:i + 1], others, k=5)[0])
    d = np.sort(np.linalg.norm(np.delete(batch, 0, axis=0) - batch[0], axis=1))[:5]
    assert with_self[0] == pytest.approx(-1.0 / np.mean(np.log(d / d[-1])))
    with pytest.raises(ValueError):
        D.lid_mle(batch, batch, k=30, exclude_self=True)


def test_lid_reference_batch_is_fixed_training_subset():
    train, fit_benign, fit_adv, eval_benign, _ = protocol_sets(4.0)
    lid = D.LID(k=20, reference_size=100, seed=3).fit(None, train, fit_benign, fit_adv)
    assert lid.reference_[0].shape == (100, DIMS[0])
    rows = {tuple(r) for r in train.pooled[0]}
    assert all(tuple(r) in rows for r in lid.reference_[0])
    again = D.LID(k=20, reference_size=100, seed=3).fit(None, train, fit_benign, fit_adv)
    np.testing.assert_array_equal(lid.score(None, eval_benign), again.score(None, eval_benign))


def test_maha_distances_match_scipy_and_ledoit_wolf():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 150)
    feats = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + labels[:, None]
    means, precision = D.tied_gaussian(feats, labels, 3)
    for c in range(3):
        np.testing.assert_allclose(means[c], feats[labels == c].mean(axis=0))
    centred = feats - means[labels]
    shrunk = LedoitWolf(assume_centered=True).fit(centred).covariance_
    np.testing.assert_allclose(precision, np.linalg.inv(shrunk), rtol=1e-6, atol=1e-9)
    points = rng.normal(size=(10, 6))
    distances = D.half_mahalanobis(points, means, precision)
    for i in (0, 4, 9):
        for c in range(3):
            assert distances[i, c] == pytest.approx(0.5 * mahalanobis(points[i], means[c], precision) ** 2)
    # the layer score is the distance to the closest class
    train = make_set([feats], labels % 2, labels)
    train.logits = np.eye(3, dtype=np.float32)[labels]
    maha = D.MAHA(magnitude=0.0, layers="all").fit(None, train, make_set([points[:5]], np.zeros(5, np.int64)),
                                                     make_set([points[5:] + 5], np.zeros(5, np.int64)))
    np.testing.assert_allclose(maha.layer_scores(None, make_set([points], np.zeros(10, np.int64)))[:, 0],
                               distances.min(axis=1), rtol=1e-5)


def test_parse_names_and_missing_folder(tmp_path):
    assert D.parse_names(None) == ["KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"]
    assert D.parse_names("dnn, kd") == ["KD", "DNN"]
    with pytest.raises(UserError, match="unknown detector"):
        D.parse_names("KD,XYZ")
    with pytest.raises(UserError, match="extract_features.py"):
        D.load_detectors(tmp_path / "nowhere")


def test_feature_set_subset_and_concat():
    rng = np.random.default_rng(0)
    a = clouds(rng, 5, 0.0)
    b = clouds(rng, 3, 1.0)
    both = FeatureSet.concat([a, b])
    assert len(both) == 8 and both.labels.shape == (8,)
    np.testing.assert_array_equal(both.subset([5, 0]).pooled[1], np.stack([b.pooled[1][0], a.pooled[1][0]]))
    np.testing.assert_array_equal(both.subset(both.labels == 1).labels, np.ones((both.labels == 1).sum()))


# --------------------------------------------------------------------------- a tiny real network
@pytest.fixture(scope="module")
def tiny():
    """resnet18 (random weights) at 32 px: training set, A_fit / A_eval benign and AE sets."""
    torch.manual_seed(0)
    model = network.build_model("resnet18", 2).eval()
    gen = torch.Generator().manual_seed(0)
    train_x = torch.rand(60, 3, 32, 32, generator=gen)
    clean = torch.rand(30, 3, 32, 32, generator=gen)
    noise = (clean + (torch.rand(clean.shape, generator=gen) * 2 - 1) * 2 / 256).clamp(0, 1)
    adv = (clean + 0.25 * torch.sign(torch.randn(clean.shape, generator=gen))).clamp(0, 1)
    layers = model.stage_end_layers
    train = features.extract(model, train_x, progress=False, labels=np.arange(60) % 2)
    sets = {k: features.extract(model, v, batch_size=8, progress=False, keep_maps=layers)
            for k, v in {"clean": clean, "noise": noise, "adv": adv}.items()}
    fit, ev = np.arange(20), np.arange(20, 30)
    pick = lambda positions: (FeatureSet.concat([sets["clean"].subset(positions), sets["noise"].subset(positions)]),
                              sets["adv"].subset(positions))
    return model, train, *pick(fit), *pick(ev)


def test_extract_matches_forward_features(tiny):
    model, train = tiny[0], tiny[1]
    with torch.no_grad():
        logits, pooled = model.forward_features(train.images[:4])
    np.testing.assert_allclose(train.logits[:4], logits.numpy(), rtol=1e-5, atol=1e-6)
    assert len(train.pooled) == len(model.layer_names)
    for mine, theirs in zip(train.pooled, pooled):
        np.testing.assert_allclose(mine[:4], theirs.numpy(), rtol=1e-5, atol=1e-6)
    assert [model.layer_names[i] for i in model.stage_end_layers] == [
        "layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]
    assert [model.layer_names[i] for i in model.pooled_copy_layers] == ["flatten"]


def test_maha_preprocessing_decreases_the_distance(tiny):
    model, train, benign = tiny[0], tiny[1], tiny[2]
    raw = D.MAHA(magnitude=0.0, layers="stages").fit(model, train, benign, tiny[3])
    moved = D.MAHA(magnitude=0.002, layers="stages")
    moved.layer_names_, moved.layers_, moved.means_, moved.precisions_ = raw.layer_names_, raw.layers_, raw.means_, raw.precisions_
    before, after = raw.layer_scores(model, benign), moved.layer_scores(model, benign)
    assert before.shape == after.shape == (len(benign), 4)
    assert (after < before).mean() > 0.9
    # The distances are computed after the batch loop: each image's row must not depend on the
    # batch it was pre-processed in, nor on the images around it.
    moved.batch_size = 7
    np.testing.assert_allclose(moved.layer_scores(model, benign), after, rtol=1e-5)
    np.testing.assert_allclose(moved.layer_scores(model, benign.subset(np.arange(3, 9))), after[3:9], rtol=1e-5)
    assert moved.layer_scores(model, benign.subset(np.arange(0))).shape == (0, 4)


def test_all_detectors_save_load_score_identically(tiny, tmp_path):
    model, train, fit_benign, fit_adv, eval_benign, eval_adv = tiny
    options = {"LID": {"k": 10, "reference_size": 40}, "BU": {"passes": 20}, "KD+BU": {"passes": 20},
               "DNN": {"epochs": 3}}
    fitted = D.fit_all(model, train, fit_benign, fit_adv, options=options, seed=1, progress=False)
    assert list(fitted) == list(D.DETECTORS)
    reports = D.evaluate(fitted, model, eval_benign, eval_adv, per_layer=True)
    for name, report in reports.items():
        assert 0.0 <= report["auc"] <= 1.0 and report["n_benign"] == 20 and report["n_adv"] == 10
        assert ("layer_auc" in report) == fitted[name].per_layer
    assert list(reports["LID"]["layer_auc"]) == model.layer_names
    assert len(reports["MAHA"]["layer_auc"]) == len(reports["DNN"]["layer_auc"]) == 4
    # the outlying AEs (±0.25 noise) are found by the feature-space detectors
    assert min(reports[n]["auc"] for n in ("KD", "MAHA", "DNN")) > 0.8

    D.save_detectors(tmp_path, fitted)
    loaded = D.load_detectors(tmp_path)
    assert list(loaded) == list(fitted)
    for name in fitted:
        for feats in (eval_benign, eval_adv):
            np.testing.assert_array_equal(fitted[name].score(model, feats), loaded[name].score(model, feats))
    # without cached maps DNN recomputes them: same scores up to float rounding
    no_maps = FeatureSet(eval_adv.images, eval_adv.logits, eval_adv.pooled)
    np.testing.assert_allclose(loaded["DNN"].score(model, no_maps), loaded["DNN"].score(model, eval_adv),
                               rtol=1e-4, atol=1e-5)
    again = D.evaluate(loaded, model, eval_benign, eval_adv, per_layer=True)
    for name in fitted:
        assert again[name]["auc"] == reports[name]["auc"]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.joblib"))

    # a set without any AE (e.g. an attack that never succeeded) scores to NaN metrics, no crash
    empty = features.extract(model, torch.zeros(0, 3, 32, 32), progress=False, keep_maps=loaded["DNN"].layers_)
    assert len(empty) == 0 and empty.pooled[-1].shape == (0, 512)
    for name, report in D.evaluate(loaded, model, eval_benign, empty).items():
        assert report["n_adv"] == 0 and np.isnan(report["auc"]), name
