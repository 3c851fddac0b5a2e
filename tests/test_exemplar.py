"""The exemplar form of the HFC term (exemplar.py): one real clean image of the target class as the
goal at every layer, normalised so that held-out clean images score 1 per layer."""
import numpy as np
import pytest
import torch

import exemplar
from utils import UserError

CHANNELS = (3, 5)


def _bank(seed=0, n=30):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    # an unused layer in the middle (None), as forward_features' list may hold
    return [rng.normal(size=(n, CHANNELS[0])) + 2.0 * labels[:, None], None,
            rng.normal(size=(n, CHANNELS[1])) * 3.0 - labels[:, None]], labels


def _held_out(seed=1, n=24):
    pooled, labels = _bank(seed, n)
    return pooled, labels


def _term():
    pooled, labels = _bank()
    return exemplar.ExemplarTerm(pooled, labels, [0, 2], 2, dtype=torch.float64)


def test_exemplar_scales_make_the_clean_median_one_per_layer():
    term = _term()
    with pytest.raises(RuntimeError, match="fit_scales"):
        term(None, [torch.zeros(2, 3, dtype=torch.float64), None, torch.zeros(2, 5, dtype=torch.float64)],
             torch.tensor([0, 1]))
    pooled, labels = _held_out()
    scales = term.fit_scales(pooled, labels)
    assert scales.shape == (2, 2) and (scales > 0).all()
    feats = [None if p is None else torch.tensor(p) for p in pooled]
    values = term.layer_values(feats, torch.as_tensor(labels)).numpy()
    for c in (0, 1):
        np.testing.assert_allclose(np.median(values[labels == c], axis=0), 1.0, rtol=1e-9)
    # the layers' raw scales differ (the second layer's features are spread 3× wider), the normalised do not
    assert scales[0, 1] > 3 * scales[0, 0]


def test_exemplar_goal_is_a_bank_image_of_the_target_class():
    """The chosen exemplar is always of the target class; at a bank image the term is 0 with a
    zero gradient; an image of the other class scores above a held-out one of the target."""
    term = _term()
    term.fit_scales(*_held_out())
    pooled, labels = _bank()
    bank_labels = term.bank_labels.numpy()
    probe = [None if p is None else torch.tensor(p[:6], requires_grad=True) for p in pooled]
    for target in (0, 1):
        targets = torch.full((6,), target)
        assert (bank_labels[term.nearest(probe, targets).numpy()] == target).all()
    own = torch.as_tensor(labels[:6])
    value = term(None, probe, own)
    assert float(value.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(value, [probe[0], probe[2]]))
    assert float(term(None, probe, 1 - own).detach()) > 1.0


def test_exemplar_gradient_matches_finite_differences():
    term = _term()
    term.fit_scales(*_held_out())
    rng = np.random.default_rng(5)
    points = [torch.tensor(rng.normal(size=(3, c)) + 0.5, dtype=torch.float64, requires_grad=True) for c in CHANNELS]
    targets = torch.tensor([0, 1, 0])
    chosen = term.nearest([points[0], None, points[1]], targets)  # fixed: the choice is piecewise constant
    assert torch.autograd.gradcheck(
        lambda a, b: term.layer_values([a, None, b], targets, chosen).mean(1).mean(), points, eps=1e-6, atol=1e-6)
    value = term(None, [points[0], None, points[1]], targets)
    expected = term.layer_values([points[0], None, points[1]], targets, chosen).mean()
    np.testing.assert_allclose(float(value.detach()), float(expected.detach()), rtol=1e-12)


def test_exemplar_term_refuses_a_class_without_exemplars():
    pooled, labels = _bank()
    with pytest.raises(UserError, match="class"):
        exemplar.ExemplarTerm(pooled, np.zeros_like(labels), [0, 2], 2)
    with pytest.raises(UserError, match="layers"):
        exemplar.ExemplarTerm(pooled, labels, [1], 2)


def test_exemplar_scales_leave_each_bank_image_out_of_its_own_choice():
    """With the held-out images as the bank (``bank="val"``), an image may not choose itself: its
    scale is the distance to its nearest *other* image of the class, never 0."""
    pooled, labels = _held_out()
    term = exemplar.ExemplarTerm(pooled, labels, [0, 2], 2, dtype=torch.float64)
    scales = term.fit_scales(pooled, labels, leave_out=np.arange(len(labels)))
    assert (scales > 1e-6).all()
    feats = [None if p is None else torch.tensor(p) for p in pooled]
    chosen = term.nearest(feats, torch.as_tensor(labels), torch.arange(len(labels)))
    assert (chosen.numpy() != np.arange(len(labels))).all()
    assert (labels[chosen.numpy()] == labels).all()
    # without leave-out every image chooses itself and the scale collapses to the floor
    assert (term.fit_scales(pooled, labels) <= exemplar.SCALE_FLOOR).all()


def test_hinged_exemplar_term_stops_pulling_a_layer_at_the_clean_level():
    """With floor 1 each layer contributes max(d_l − 1, 0): zero (and no gradient) for a layer
    already as close to its exemplar as the median held-out clean image, d_l − 1 otherwise."""
    pooled, labels = _bank()
    hinged = exemplar.ExemplarTerm(pooled, labels, [0, 2], 2, dtype=torch.float64, floor=1.0)
    plain = exemplar.ExemplarTerm(pooled, labels, [0, 2], 2, dtype=torch.float64)
    for term in (hinged, plain):
        term.fit_scales(*_held_out())
    probe_pooled, probe_labels = _held_out(seed=5)
    probe = [None if p is None else torch.tensor(p, requires_grad=True) for p in probe_pooled]
    targets = torch.as_tensor(probe_labels)
    values = plain.layer_values(probe, targets).detach()
    assert (values < 1).any() and (values > 1).any()  # the probe has layers on both sides of the hinge
    value = hinged(None, probe, targets)
    assert float(value.detach()) == pytest.approx(float((values - 1).clamp_min(0).mean()))
    value.backward()
    below = (values < 1).numpy()
    for column, layer in enumerate((0, 2)):
        grad = probe[layer].grad.abs().sum(1).numpy()
        assert (grad[below[:, column]] == 0).all() and (grad[~below[:, column]] > 0).all()
    with pytest.raises(ValueError, match="floor"):
        exemplar.ExemplarTerm(pooled, labels, [0, 2], 2, floor=-1.0)
