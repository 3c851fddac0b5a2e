"""Orthogonal PGD (opgd.py, attacks.run_attack(orthogonal=...), compare.py's OPGD rows).

The projection is orthogonal; one engine step is the signed step on the projected gradient of
the rule's choice, within α and ε; the differentiable MAHA, KD and DNN scores equal the fitted
detectors' own ``score``; the threshold lets 90% of the benign samples pass; and on the tiny
synthetic run the OPGD rows of compare.py lower their detector's AUC.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import compare
import detectors
import features
import metrics
import network
import opgd
from attacks import AttackSpec, run_attack
from features import FeatureSet
from test_attacks import TinyNet, _batch
from test_hfc import ATTACK, pipeline  # noqa: F401 - the tiny run with its base attack and detectors
from utils import UserError


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


# --------------------------------------------------------------------------- the scores
CHANNELS = (3, 4)


def _feature_set(n: int, seed: int, shift: float = 0.0) -> FeatureSet:
    """Two layers of 4×4 maps (pooled = their mean), random logits (mixed predictions)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    maps = [torch.tensor(rng.normal(size=(n, c, 4, 4)) + 2.0 * labels[:, None, None, None] + shift,
                         dtype=torch.float32) for c in CHANNELS]
    logits = rng.normal(size=(n, 2)).astype(np.float32)
    return FeatureSet(images=torch.zeros(n, 3, 2, 2), logits=logits, pooled=[m.mean(dim=(2, 3)).numpy() for m in maps],
                      labels=labels, maps=dict(enumerate(maps)))


@pytest.fixture(scope="module")
def fitted():
    train, benign, adv = _feature_set(40, 0), _feature_set(16, 1), _feature_set(16, 2, shift=3.0)
    return {"KD": detectors.KD(bandwidth=1.5, layers="all", score_layer=-1).fit(None, train),
            "MAHA": detectors.MAHA(magnitude=0.0, layers="all").fit(None, train, benign, adv),
            "DNN": detectors.DNN(layers="all", width=4, epochs=1, batch_size=8).fit(None, train, benign, adv)}


@pytest.mark.parametrize("name", opgd.DETECTORS)
def test_scores_equal_the_detectors_own(fitted, name):
    detector = fitted[name]
    feats = _feature_set(12, 5, shift=1.0)
    assert len(set(feats.predictions)) == 2  # KD: both predicted classes occur
    dtype = torch.float32 if name == "DNN" else torch.float64
    score = opgd.build(detector, dtype=dtype)
    inputs = list(feats.maps.values()) if score.uses_maps else [torch.from_numpy(p) for p in feats.pooled]
    got = score.scores(torch.from_numpy(feats.logits), inputs).detach().numpy()
    np.testing.assert_allclose(got, detector.score(None, feats), rtol=1e-5 if name == "DNN" else 1e-9, atol=1e-6)
    # differentiable with respect to the features it reads
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    score(torch.from_numpy(feats.logits), leaves, None).backward()
    assert any(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in leaves)


def test_only_maha_kd_dnn_have_a_score():
    with pytest.raises(UserError, match="LID"):
        opgd.build(detectors.LID())


def test_threshold_lets_ninety_percent_of_benign_pass_on_a_real_network():
    """On a (random) HierarchicalNet: score_images equals each detector's score on the extracted
    features (DNN reads the network's maps), and calibrate is metrics' TNR@90 threshold."""
    torch.manual_seed(0)
    model = network.build_model("resnet18", 2).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(30, 3, 16, 16, generator=gen)
    train = features.extract(model, images, batch_size=16, progress=False, labels=np.arange(30) % 2)
    clean, noisy = torch.rand(10, 3, 16, 16, generator=gen), torch.rand(10, 3, 16, 16, generator=gen)
    benign = features.benign_set(model, clean, noisy, batch_size=16, progress=False)
    adv = features.extract(model, (clean + 0.3).clamp(0, 1), batch_size=16, progress=False)
    fitted = {"MAHA": detectors.MAHA(magnitude=0.0).fit(model, train, benign, adv),
              "KD": detectors.KD().fit(model, train),
              "DNN": detectors.DNN(width=4, epochs=1).fit(model, train, benign, adv)}
    for name, detector in fitted.items():
        score = opgd.build(detector)
        values = opgd.score_images(model, score, torch.cat([clean, noisy]), batch_size=7)
        np.testing.assert_allclose(values, detector.score(model, benign), rtol=1e-4, atol=1e-4, err_msg=name)
        threshold = opgd.calibrate(score, model, clean, noisy, batch_size=7)
        assert score.threshold == threshold == metrics.benign_pass_threshold(values, 0.9)
        assert np.mean(values <= threshold) >= 0.9 and np.mean(values < threshold) < 0.9


# --------------------------------------------------------------------------- the stage
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--attack", ATTACK]
OPGD_ROWS = list(compare.OPGD_ROWS)


def test_opgd_rows_on_the_tiny_run(pipeline, monkeypatch):  # noqa: F811
    monkeypatch.chdir(pipeline)
    result = compare.main(COMMON + ["--rows", ",".join(["base_same_schedule", *OPGD_ROWS])])
    rows = result["rows"]
    assert list(rows) == ["base_same_schedule", *OPGD_ROWS]
    folder = pipeline / "runs_synthetic" / "resnet18" / ATTACK / "compare"
    same = rows["base_same_schedule"]
    for row in OPGD_ROWS:
        info = rows[row]
        assert info["lamda"] is None and info["detector"] == compare.OPGD_ROWS[row] and info["opgd_rule"] == "success"
        assert (info["step_size_256"], info["steps"]) == (same["step_size_256"], same["steps"])
        assert info["seconds_per_image"] > 0 and np.isfinite(info["threshold"])
        assert 0.0 <= info["undetected_success"] <= info["success"]
        saved = json.loads((folder / row / compare.ROW_FILE).read_text())
        assert saved["result"] == json.loads(json.dumps(info)) and saved["record"]["settings"]["opgd_rule"] == "success"
    print("\n" + (folder / "compare.md").read_text())
    for row in OPGD_ROWS:
        name = compare.OPGD_ROWS[row]
        print(f"{row}: success {rows[row]['success']:.3f}, {name} AUC {rows[row]['detectors'][name]['auc']:.3f} "
              f"(base_same_schedule: success {same['success']:.3f}, AUC {same['detectors'][name]['auc']:.3f}), "
              f"undetected success {rows[row]['undetected_success']:.3f}")
    # the attack that sees MAHA hides from it better than the same schedule without it
    assert rows["OPGD_MAHA"]["detectors"]["MAHA"]["auc"] < same["detectors"]["MAHA"]["auc"] - 0.1
    assert rows["OPGD_MAHA"]["success"] >= 0.5
    # resumable: a second call recomputes nothing
    monkeypatch.setattr(compare.opgd, "attack", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = compare.main(COMMON + ["--rows", ",".join(OPGD_ROWS)])
    assert again["rows"] == {row: json.loads(json.dumps(rows[row])) for row in OPGD_ROWS}
    monkeypatch.undo()
    monkeypatch.chdir(pipeline)
    # The other rule (detector steps while flagged at the A_fit TNR@90 threshold) replaces the rows
    # (other settings); its aim is success below the threshold, which it reaches here as well.
    flagged = compare.main(COMMON + ["--rows", ",".join(OPGD_ROWS), "--opgd-rule", "flagged"])["rows"]
    for row in OPGD_ROWS:
        name = compare.OPGD_ROWS[row]
        print(f"flagged {row}: success {flagged[row]['success']:.3f}, {name} AUC "
              f"{flagged[row]['detectors'][name]['auc']:.3f}, undetected success {flagged[row]['undetected_success']:.3f}")
        assert flagged[row]["opgd_rule"] == "flagged" and flagged[row]["undetected_success"] >= 0.5
    assert flagged["OPGD_MAHA"]["detectors"]["MAHA"]["auc"] < same["detectors"]["MAHA"]["auc"] - 0.1
