"""gmm.py and get_GMM.py: mixtures against scikit-learn, save/load, the HFC term and its gradient."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

import datasets
import features
import get_GMM
import gmm
import hfc
import network
import saver

ROOT = Path(__file__).resolve().parents[1]


def _features(rng, n, channels, shift=0.0):
    """Non-negative, correlated, pooled-ReLU-like features (n × C per layer)."""
    out = []
    for C in channels:
        mix = rng.normal(size=(4, C))
        out.append(np.maximum(rng.normal(size=(n, 4)) @ mix + rng.normal(scale=0.5, size=(n, C)) + 1 + shift, 0))
    return out


def _numpy_term(mixtures, layers, feats, targets):
    """The HFC term and the chosen components, one sample and one component at a time."""
    total = np.zeros(len(targets))
    chosen = np.zeros((len(targets), len(layers)), dtype=np.int64)
    for j, layer in enumerate(layers):
        for i, t in enumerate(targets):
            p = mixtures[(layer, int(t))]
            f = feats[layer][i]
            scores = [p.log_prior[k] + np.log(np.diag(p.prec_chol[k])).sum()
                      - 0.5 * np.sum(((f - p.means[k]) @ p.prec_chol[k]) ** 2) for k in range(p.n_components)]
            k = int(np.argmax(scores))
            chosen[i, j] = k
            total[i] += np.sum(((f - p.means[k]) @ p.prec_chol[k]) ** 2) / len(f)
    return total.mean(), chosen


@pytest.mark.parametrize("make", [
    lambda: GaussianMixture(4, covariance_type="full", random_state=0),
    lambda: BayesianGaussianMixture(n_components=4, covariance_type="full", random_state=0),
    lambda: BayesianGaussianMixture(n_components=4, covariance_type="full", random_state=1,
                                    weight_concentration_prior_type="dirichlet_distribution"),
], ids=["em", "bayesian-dp", "bayesian-dirichlet"])
def test_component_scores_match_sklearn(make):
    rng = np.random.default_rng(0)
    X = _features(rng, 150, [12])[0]
    model = make().fit(X)
    params = gmm.params_from_sklearn(model, X)
    probe = _features(rng, 40, [12], shift=0.5)[0]
    np.testing.assert_allclose(params.component_log_prob(probe), model._estimate_weighted_log_prob(probe),
                               rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(params.log_likelihood(probe), model.score_samples(probe), rtol=1e-10, atol=1e-8)
    assert params.avg_log_likelihood == pytest.approx(model.score(X), rel=1e-10)
    assert not np.any(np.tril(params.prec_chol, -1)), "sklearn's precision Cholesky factors are upper triangular"


@pytest.mark.parametrize("kind", gmm.KINDS)
def test_fit_save_load_matches_sklearn(tmp_path, kind):
    rng = np.random.default_rng(1)
    channels = [6, 10, 40]
    labels = np.repeat([0, 1], [60, 45])
    pooled = _features(rng, len(labels), channels)
    layers = gmm.select_layers(channels, conv_layers=[0, 1, 2], max_channels=16)
    assert layers == [0, 1]
    mixtures = gmm.fit_mixtures(pooled, labels, layers, 3, kind=kind, seed=5, n_jobs=2, progress=False,
                                layer_names=["a", "b", "c"], layer_channels=channels)
    mixtures.save(tmp_path / "m", extra={"dataset": "test"})
    loaded = gmm.load_mixtures(tmp_path / "m")
    assert loaded.layers == layers and loaded.classes == [0, 1] and loaded.kind == kind
    probe = _features(rng, 30, channels, shift=0.3)
    for layer in layers:
        for cls in (0, 1):
            fitted = mixtures[(layer, cls)]
            np.testing.assert_array_equal(loaded.log_likelihood(layer, cls, probe[layer]),
                                          mixtures.log_likelihood(layer, cls, probe[layer]))
            np.testing.assert_array_equal(loaded.component_log_prob(layer, cls, probe[layer]),
                                          fitted.component_log_prob(probe[layer]))
            # The same seed and (recorded) regulariser refit the very same scikit-learn model.
            X = pooled[layer][labels == cls]
            model = gmm._make_estimator(kind, fitted.n_components, fitted.reg_covar, gmm.DEFAULT_MAX_ITER,
                                        gmm._fit_seed(5, layer, cls)).fit(X)
            np.testing.assert_allclose(loaded.log_likelihood(layer, cls, probe[layer]), model.score_samples(probe[layer]),
                                       rtol=1e-9, atol=1e-7)
            np.testing.assert_allclose(loaded.component_log_prob(layer, cls, probe[layer]),
                                       model._estimate_weighted_log_prob(probe[layer]), rtol=1e-9, atol=1e-7)
    summary = (tmp_path / "m" / "summary.json").read_text()
    assert '"dataset": "test"' in summary and '"layer_names"' in summary and '"converged"' in summary
    # Same seed -> same mixtures, independent of the parallel schedule.
    again = gmm.fit_mixtures(pooled, labels, layers, 3, kind=kind, seed=5, n_jobs=1, progress=False)
    np.testing.assert_array_equal(again[(1, 1)].means, mixtures[(1, 1)].means)


def test_clamping_and_non_convergence_are_reported():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], [40, 9])
    pooled = _features(rng, len(labels), [5])
    mixtures = gmm.fit_mixtures(pooled, labels, [0], 6, kind="em", max_iter=1, n_jobs=1, progress=False)
    assert mixtures[(0, 0)].n_components == 6 and mixtures[(0, 1)].n_components == 9 // 4
    summary = mixtures.summary()
    assert summary["n_clamped"] == 1
    assert summary["n_not_converged"] == len(summary["not_converged"]) >= 1  # one iteration: not converged
    assert {"layer": 0, "class": 0} in summary["not_converged"]


@pytest.mark.parametrize("kind", gmm.KINDS)
def test_channel_regulariser_does_not_depend_on_channel_units(kind, tmp_path):
    """reg_scale="channel": rescaling the channels leaves the term unchanged and shifts the
    log-density by the log-Jacobian (the fit is made in per-channel standard units); the mean-scaled
    regulariser does not have this property, and it weighs a low-variance channel less."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    X[100:] += 8.0  # two well-separated clusters: the same components whatever the units
    X[:, 0] *= 0.3  # a channel with a small clean variance (above the floor in either units)
    labels = np.zeros(len(X), dtype=np.int64)
    units = np.exp(rng.normal(scale=0.3, size=6))
    probe = rng.normal(size=(15, 6))
    terms, loglik = {}, {}
    for scale in gmm.REG_SCALES:
        plain = gmm.fit_mixtures([X], labels, [0], 2, kind=kind, reg_covar=1.0, reg_scale=scale, n_jobs=1,
                                 progress=False)
        rescaled = gmm.fit_mixtures([X * units], labels, [0], 2, kind=kind, reg_covar=1.0, reg_scale=scale,
                                    n_jobs=1, progress=False)
        terms[scale] = (plain[(0, 0)].chosen_term(probe), rescaled[(0, 0)].chosen_term(probe * units))
        loglik[scale] = (plain[(0, 0)].log_likelihood(probe),
                         rescaled[(0, 0)].log_likelihood(probe * units) + np.log(units).sum())
    np.testing.assert_allclose(*terms["channel"], rtol=1e-8)
    np.testing.assert_allclose(*loglik["channel"], rtol=1e-8)
    assert np.abs(terms["mean"][0] - terms["mean"][1]).max() > 1e-3
    # a step along the low-variance channel costs more under the per-channel regulariser
    step = np.zeros((1, 6))
    step[0, 0] = X[:, 0].std()
    rise = {}
    for scale in gmm.REG_SCALES:
        mixture = gmm.fit_mixtures([X], labels, [0], 1, kind=kind, reg_covar=1.0, reg_scale=scale, n_jobs=1,
                                   progress=False)[(0, 0)]
        centre = mixture.means[:1]
        rise[scale] = (mixture.chosen_term(centre + step) - mixture.chosen_term(centre))[0]
    assert rise["channel"] > 2 * rise["mean"], rise
    # recorded, and kept through save/load
    saved = gmm.fit_mixtures([X], labels, [0], 2, kind=kind, reg_covar=1.0, reg_scale="channel", n_jobs=1,
                             progress=False)
    saved.save(tmp_path)
    loaded = gmm.load_mixtures(tmp_path)
    assert loaded.reg_scale == "channel" and loaded.summary()["reg_scale"] == "channel"
    np.testing.assert_allclose(loaded[(0, 0)].chosen_term(probe), saved[(0, 0)].chosen_term(probe), rtol=1e-10)
    with pytest.raises(gmm.UserError, match="regulariser scale"):
        gmm.fit_mixtures([X], labels, [0], 2, reg_scale="median", n_jobs=1, progress=False)


@pytest.mark.parametrize("kind", gmm.KINDS)
def test_diagonal_mixture_scores_as_scikit_learn_and_its_term_is_the_mean_squared_z_score(kind, tmp_path):
    """covariance="diag": the stored (diagonal) factors reproduce scikit-learn's own log-density;
    with one EM component the term is the mean squared per-channel z-score to the class mean, which
    a held-out sample of the same distribution puts near 1 where the full covariance's does not."""
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    rng = np.random.default_rng(11)
    C = 40
    X = rng.normal(size=(60, C)) * np.exp(rng.normal(size=C))  # fewer samples than a full fit needs
    labels = np.zeros(len(X), dtype=np.int64)
    fitted = gmm.fit_mixtures([X], labels, [0], 2, kind=kind, covariance="diag", n_jobs=1, progress=False, seed=3)
    params = fitted[(0, 0)]
    assert params.prec_chol.shape == (2, C, C) and not np.any(params.prec_chol - np.stack(
        [np.diag(np.diagonal(m)) for m in params.prec_chol]))
    cls = BayesianGaussianMixture if kind == "bayesian" else GaussianMixture
    reference = cls(n_components=2, covariance_type="diag", reg_covar=params.reg_covar, max_iter=gmm.DEFAULT_MAX_ITER,
                    random_state=gmm._fit_seed(3, 0, 0)).fit(X)
    probe = rng.normal(size=(9, C))
    np.testing.assert_allclose(params.log_likelihood(probe), reference.score_samples(probe), rtol=1e-8)

    held_out = rng.normal(size=(400, C)) * X.std(0)  # the training distribution, new samples
    one = gmm.fit_mixtures([X], labels, [0], 1, kind="em", covariance="diag", n_jobs=1, progress=False)[(0, 0)]
    z2 = np.square((probe - X.mean(0)) / np.sqrt(X.var(0) + one.reg_covar)).mean(1)
    np.testing.assert_allclose(one.chosen_term(probe), z2, rtol=1e-8)
    full = gmm.fit_mixtures([X], labels, [0], 1, kind="em", n_jobs=1, progress=False)[(0, 0)]
    assert np.median(one.chosen_term(held_out)) < 1.5
    assert np.median(full.chosen_term(held_out)) > 1.5 * np.median(one.chosen_term(held_out))

    fitted.save(tmp_path)
    loaded = gmm.load_mixtures(tmp_path)
    assert loaded.covariance == "diag" and loaded.summary()["covariance"] == "diag"
    np.testing.assert_allclose(loaded[(0, 0)].chosen_term(probe), params.chosen_term(probe), rtol=1e-10)
    with pytest.raises(gmm.UserError, match="covariance"):
        gmm.fit_mixtures([X], labels, [0], 2, covariance="tied", n_jobs=1, progress=False)


@pytest.fixture(scope="module")
def fitted():
    """Mixtures of two layers and three classes (one with fewer components: padding)."""
    rng = np.random.default_rng(3)
    channels = [7, 9]
    labels = np.repeat([0, 1, 2], [48, 48, 12])
    pooled = _features(rng, len(labels), channels)
    mixtures = gmm.fit_mixtures(pooled, labels, [0, 1], 4, kind="bayesian", seed=1, n_jobs=1, progress=False)
    assert mixtures[(0, 2)].n_components == 3
    return mixtures, channels


@pytest.mark.parametrize("panel_width,backward", [(None, "loop"), (3, "gather"), (4, "loop"), (100, "gather")])
def test_hfc_term_matches_numpy(fitted, panel_width, backward):
    mixtures, channels = fitted
    rng = np.random.default_rng(4)
    feats = _features(rng, 11, channels, shift=0.4)
    targets = rng.integers(0, 3, size=11)
    expected, expected_k = _numpy_term(mixtures, [0, 1], feats, targets)
    term = hfc.HFCTerm(mixtures, dtype=torch.float64, panel_width=panel_width, backward=backward)
    tensors = [torch.tensor(f) for f in feats]
    values, chosen = term.layer_terms(tensors, torch.tensor(targets))
    assert term(None, tensors, torch.tensor(targets)).item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_array_equal(chosen.numpy(), expected_k)
    assert values.shape == (11, 2)
    # A batch with a single target class takes the un-indexed path.
    single = np.full(11, 2)
    assert term(None, tensors, torch.tensor(single)).item() == pytest.approx(
        _numpy_term(mixtures, [0, 1], feats, single)[0], rel=1e-10)
    # Only the requested layers count.
    only = hfc.HFCTerm(mixtures, layers=[1], dtype=torch.float64)
    assert only(None, tensors, torch.tensor(targets)).item() == pytest.approx(
        _numpy_term(mixtures, [1], feats, targets)[0], rel=1e-10)


def test_component_choice_matches_sklearn():
    rng = np.random.default_rng(5)
    params = {}
    models = {}
    for cls in (0, 1):
        X = _features(rng, 120, [8], shift=cls)[0]
        models[cls] = BayesianGaussianMixture(n_components=5, covariance_type="full", random_state=cls).fit(X)
        params[(0, cls)] = gmm.params_from_sklearn(models[cls], X)
    mixtures = gmm.Mixtures(params, [0], [0, 1], kind="bayesian", num_components=5)
    probe = np.concatenate([_features(rng, 30, [8], shift=s)[0] for s in (0.0, 1.0, 2.5)])
    targets = rng.integers(0, 2, size=len(probe))
    _, chosen = hfc.HFCTerm(mixtures, dtype=torch.float64).layer_terms([torch.tensor(probe)], torch.tensor(targets))
    expected = [models[t]._estimate_weighted_log_prob(probe[i:i + 1]).argmax() for i, t in enumerate(targets)]
    np.testing.assert_array_equal(chosen[:, 0].numpy(), expected)
    assert len(set(expected)) > 1, "the probe should exercise several components"


@pytest.mark.parametrize("backward", ["loop", "gather"])
def test_hfc_gradient(fitted, backward):
    mixtures, channels = fitted
    rng = np.random.default_rng(6)
    feats = [torch.tensor(f, requires_grad=True) for f in _features(rng, 6, channels, shift=0.8)]
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    term = hfc.HFCTerm(mixtures, dtype=torch.float64, panel_width=4, backward=backward)
    assert torch.autograd.gradcheck(lambda a, b: term(None, [a, b], targets), feats)
    # The same gradient as plain autograd through (f − μ_k*) L_k* with the chosen components.
    value = term(None, feats, targets)
    grads = torch.autograd.grad(value, feats)
    _, chosen = term.layer_terms([f.detach() for f in feats], targets)
    reference = 0
    for j, layer in enumerate([0, 1]):
        for i, t in enumerate(targets.tolist()):
            p = mixtures[(layer, t)]
            k = int(chosen[i, j])
            z = (feats[layer][i] - torch.tensor(p.means[k])) @ torch.tensor(p.prec_chol[k])
            reference = reference + z.square().sum() / channels[layer]
    reference_grads = torch.autograd.grad(reference / len(targets), feats)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # A small step along the negative gradient decreases the term.
    with torch.no_grad():
        stepped = [f - 1e-3 * g / g.norm() for f, g in zip(feats, grads)]
    assert term(None, stepped, targets).item() < value.item()


def _with_scales(mixtures, scales, info=None):
    """A copy of ``mixtures`` (a shared fixture: never mutated) carrying ``scales``."""
    return gmm.Mixtures(mixtures.params, mixtures.layers, mixtures.classes, kind=mixtures.kind,
                        num_components=mixtures.num_components, scales=scales, scale_info=info)


@pytest.fixture(scope="module")
def scaled(fitted):
    """The fitted mixtures with scales measured on other (held-out-like) features of each class."""
    mixtures, channels = fitted
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1, 2], [15, 14, 9])
    feats = _features(rng, len(labels), channels, shift=0.2)
    return _with_scales(mixtures, gmm.term_scales(mixtures, feats, labels), {"source": "test"}), feats, labels


def test_term_scales_are_the_median_term(scaled):
    mixtures, feats, labels = scaled
    for layer in mixtures.layers:
        for cls in mixtures.classes:
            X = feats[layer][labels == cls]
            # One sample at a time with the reference numpy term (its own k* rule).
            values = [_numpy_term(mixtures, [layer], {layer: X[i:i + 1]}, [cls])[0] for i in range(len(X))]
            assert mixtures.scales[(layer, cls)] == pytest.approx(np.median(values), rel=1e-10)
    report = mixtures.summary()["heldout_term"]
    assert [entry["layer"] for entry in report["per_layer"]] == mixtures.layers
    assert all(len(entry["median_term"]) == 3 for entry in report["per_layer"])
    values = list(mixtures.scales.values())
    assert report["median"] == pytest.approx(np.median(values)) and report["max"] == max(values)
    assert report["info"] == {"source": "test"}
    with pytest.raises(ValueError, match="class"):
        gmm.term_scales(mixtures, feats, np.zeros(len(labels)), classes=[0, 1])


def test_normalised_term_is_one_on_the_scale_images(scaled):
    mixtures, feats, labels = scaled
    term = hfc.HFCTerm(mixtures, dtype=torch.float64, normalise=True)
    values = term.layer_values([torch.tensor(f) for f in feats], torch.tensor(labels)).numpy()
    for cls in mixtures.classes:
        np.testing.assert_allclose(np.median(values[labels == cls], axis=0), 1.0, rtol=1e-10)
    raw, _ = term.layer_terms([torch.tensor(f) for f in feats], torch.tensor(labels))
    table = np.array([[mixtures.scales[(l, c)] for l in mixtures.layers] for c in labels])
    np.testing.assert_allclose(values, raw.numpy() / table, rtol=1e-12)


@pytest.mark.parametrize("normalise", [False, True])
def test_mean_reduction_is_sum_over_layers(scaled, normalise):
    mixtures, _, _ = scaled
    rng = np.random.default_rng(8)
    feats = [torch.tensor(f) for f in _features(rng, 7, [7, 9], shift=0.6)]
    targets = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    total = hfc.HFCTerm(mixtures, dtype=torch.float64, normalise=normalise)(None, feats, targets)
    mean = hfc.HFCTerm(mixtures, dtype=torch.float64, normalise=normalise, reduce="mean")(None, feats, targets)
    assert mean.item() == pytest.approx(total.item() / 2, rel=1e-12)
    with pytest.raises(ValueError, match="reduce"):
        hfc.HFCTerm(mixtures, reduce="max")


@pytest.mark.parametrize("backward", ["loop", "gather"])
def test_normalised_mean_term_gradient(scaled, backward):
    mixtures, _, _ = scaled
    rng = np.random.default_rng(9)
    feats = [torch.tensor(f, requires_grad=True) for f in _features(rng, 6, [7, 9], shift=0.8)]
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    term = hfc.HFCTerm(mixtures, dtype=torch.float64, panel_width=4, backward=backward, normalise=True,
                       reduce="mean")
    assert torch.autograd.gradcheck(lambda a, b: term(None, [a, b], targets), feats)


def test_hinged_term_stops_pulling_at_the_clean_median(scaled):
    mixtures, feats, labels = scaled
    normalised = hfc.HFCTerm(mixtures, dtype=torch.float64, **hfc.TERMS["normalised"])
    hinged = hfc.HFCTerm(mixtures, dtype=torch.float64, **hfc.TERMS["hinged"])
    inputs = [torch.tensor(f, requires_grad=True) for f in feats]
    targets = torch.tensor(labels)
    plain = normalised.layer_values(inputs, targets)
    clamped = hinged.layer_values(inputs, targets)
    torch.testing.assert_close(clamped, (plain - 1.0).clamp_min(0.0))
    below = plain.detach() <= 1.0
    assert below.any() and (~below).any()  # the scale images straddle their own median
    # A layer at or under the clean median has no gradient; one above pulls as the normalised term.
    for layer_column, layer in enumerate(mixtures.layers):
        for row in range(len(labels)):
            (grad,) = torch.autograd.grad(clamped[row, layer_column], inputs[layer], retain_graph=True)
            (reference,) = torch.autograd.grad(plain[row, layer_column], inputs[layer], retain_graph=True)
            if below[row, layer_column]:
                assert not grad.any()
            else:
                torch.testing.assert_close(grad, reference)
    with pytest.raises(ValueError, match="floor"):
        hfc.HFCTerm(mixtures, floor=1.0)


def test_scales_save_load_and_required(scaled, fitted, tmp_path):
    mixtures, _, _ = scaled
    mixtures.save(tmp_path / "with")
    loaded = gmm.load_mixtures(tmp_path / "with")
    assert loaded.scales == mixtures.scales and loaded.scale_info == {"source": "test"}
    assert loaded.summary()["heldout_term"] == mixtures.summary()["heldout_term"]
    plain, _ = fitted  # no scales: the file has none, loads, and cannot normalise
    plain.save(tmp_path / "without")
    old = gmm.load_mixtures(tmp_path / "without")
    assert old.scales is None and old.summary()["heldout_term"] is None
    assert not any(key.endswith("_scale") for key in np.load(tmp_path / "without" / "mixtures.npz").files)
    hfc.HFCTerm(old)  # the paper's term needs no scales
    with pytest.raises(gmm.UserError, match="get_GMM.py"):
        hfc.HFCTerm(old, normalise=True)


def test_hfc_term_float32_on_model_features():
    """The default float32 term on a real model's features: finite, and its choice agrees with float64."""
    torch.manual_seed(0)
    model = network.build_model("resnet18", 2).eval()
    with torch.no_grad():
        _, feats = model.forward_features(torch.rand(24, 3, 32, 32))
    layers = gmm.select_layers(model, max_channels=128)
    assert layers and all(model.layer_channels[i] <= 128 for i in layers)
    pooled = [f.numpy().astype(np.float64) for f in feats]
    labels = np.repeat([0, 1], 12)
    mixtures = gmm.fit_mixtures(pooled, labels, layers, 2, kind="em", n_jobs=1, progress=False)
    targets = torch.tensor(labels[::-1].copy())
    v32, k32 = hfc.HFCTerm(mixtures).layer_terms(feats, targets)
    v64, k64 = hfc.HFCTerm(mixtures, dtype=torch.float64).layer_terms(feats, targets)
    assert v32.dtype == torch.float32 and torch.isfinite(v32).all()
    assert (k32 == k64).float().mean() > 0.95
    torch.testing.assert_close(v32.double(), v64, rtol=1e-3, atol=1e-3)


def test_get_gmm_writes_artifacts(tiny_run, tmp_path, monkeypatch):
    # A copy of the shared trained run, so that this test writes only under tmp_path.
    run = tmp_path / "runs_synthetic" / "resnet18"
    run.mkdir(parents=True)
    for name in ("split.json", saver.CHECKPOINT_NAME):
        shutil.copy(tiny_run / name, run / name)
    monkeypatch.chdir(tmp_path)
    summary = get_GMM.main(["-a", "resnet18", "-y", "2", "--kind", "em", "--max-channels", "128",
                            "--device", "cpu", "--jobs", "2", "-b", "16"])
    folder = run / "gmm_M2"
    assert (folder / "mixtures.npz").is_file() and (folder / "summary.json").is_file()
    mixtures = gmm.load_mixtures(folder)
    model, _ = saver.load_model(run)
    assert mixtures.layers == gmm.select_layers(model, max_channels=128) == summary["layers"]
    assert len(mixtures.layers) == 8  # resnet18: the 64- and 128-channel block ReLUs
    assert mixtures.layer_names == model.layer_names and mixtures.classes == [0, 1]
    assert summary["n_fits"] == 2 * len(mixtures.layers) and summary["kind"] == "em"
    assert all(np.isfinite(f["avg_log_likelihood"]) and f["n_components"] == 2 for f in summary["fits"])
    images, labels = datasets.load_part(run, "train")
    assert summary["train_per_class"] == np.bincount(labels.numpy()).tolist()
    # The saved mixtures score the training features they were fitted on as reported.
    feats = features.extract(model, images, "cpu", progress=False)
    layer = mixtures.layers[0]
    fit = next(f for f in summary["fits"] if f["layer"] == layer and f["class"] == 1)
    X = feats.pooled[layer][labels.numpy() == 1]
    assert mixtures.log_likelihood(layer, 1, X).mean() == pytest.approx(fit["avg_log_likelihood"], rel=1e-4)
    # The term's scales were measured on the validation images (the fit report).
    val_images, val_labels = datasets.load_part(run, "val")
    assert min(np.bincount(val_labels.numpy(), minlength=2)) >= 2
    val = features.extract(model, val_images, "cpu", progress=False)
    expected = gmm.term_scales(mixtures, val.pooled, val_labels.numpy())
    assert mixtures.scales.keys() == expected.keys()
    for key, value in expected.items():
        assert mixtures.scales[key] == pytest.approx(value, rel=1e-4)
    report = summary["heldout_term"]
    assert report["info"]["train_fallback_classes"] == [] and len(report["per_layer"]) == len(mixtures.layers)
    assert report["max"] == pytest.approx(max(expected.values()), rel=1e-4)
    # A class with fewer than 2 validation images takes its scales from its training images.
    real_load_part = datasets.load_part

    def one_class_val(run_dir, part, *args, **kwargs):
        images, labels = real_load_part(run_dir, part, *args, **kwargs)
        return (images[labels == 0], labels[labels == 0]) if part == "val" else (images, labels)

    monkeypatch.setattr(datasets, "load_part", one_class_val)
    summary = get_GMM.main(["-a", "resnet18", "-y", "1", "--kind", "em", "--max-channels", "64",
                            "--device", "cpu", "--jobs", "1", "-b", "16"])
    assert summary["heldout_term"]["info"]["train_fallback_classes"] == [1]
    mixtures = gmm.load_mixtures(run / "gmm_M1")
    X = feats.pooled[mixtures.layers[0]][labels.numpy() == 1]
    assert mixtures.scales[(mixtures.layers[0], 1)] == pytest.approx(
        np.median(mixtures[(mixtures.layers[0], 1)].chosen_term(X)), rel=1e-4)


def test_get_gmm_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "get_GMM.py"), "-a", "resnet18", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.py" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs_synthetic").exists()


def test_load_mixtures_missing_folder(tmp_path):
    with pytest.raises(gmm.UserError, match="get_GMM.py"):
        gmm.load_mixtures(tmp_path / "nothing")
