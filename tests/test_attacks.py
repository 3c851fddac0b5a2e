"""The L∞ attack engine: names, budget/range, determinism, success, extra terms, torchattacks parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import hfc
from attacks import AttackSpec, parse_attack, run_attack
from utils import UserError

ALL_METHODS = ("FGSM", "I_FGSM", "PGD", "MI_FGSM", "DI_FGSM", "TI_FGSM", "CW", "Noise")


class TinyNet(nn.Module):
    """A small conv net with the engine's interface: ``forward`` and ``forward_features``."""

    def __init__(self, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.calls = {"forward": 0, "forward_features": 0}
        self.modes_seen: list[bool] = []

    def _run(self, x):
        self.modes_seen.append(self.training)
        h1 = F.relu(self.conv1(x))
        h2 = F.relu(self.conv2(h1))
        pooled = [h1.mean(dim=(2, 3)), h2.mean(dim=(2, 3))]
        return self.fc(pooled[-1]), pooled

    def forward(self, x):
        self.calls["forward"] += 1
        return self._run(x)[0]

    def forward_features(self, x):
        self.calls["forward_features"] += 1
        return self._run(x)


def _batch(n=8, size=16, seed=0, num_classes=3):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen)
    images[0, :, :4] = 0.0  # saturated pixels exercise the [0, 1] clip
    images[1, :, :4] = 1.0
    return images, torch.randint(0, num_classes, (n,), generator=gen)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, method, eps_256, canonical", [
    ("I_FGSM_Linf_1", "I_FGSM", 1.0, "I_FGSM_Linf_1"),
    ("BIM_Linf_0.5", "I_FGSM", 0.5, "I_FGSM_Linf_0.5"),
    ("pgd_linf_4", "PGD", 4.0, "PGD_Linf_4"),
    ("MI_FGSM_Linf_0.25", "MI_FGSM", 0.25, "MI_FGSM_Linf_0.25"),
    ("DI_FGSM_Linf_2", "DI_FGSM", 2.0, "DI_FGSM_Linf_2"),
    ("TI_FGSM_Linf_8", "TI_FGSM", 8.0, "TI_FGSM_Linf_8"),
    ("CW_Linf_1.50", "CW", 1.5, "CW_Linf_1.5"),
    ("FGSM_Linf_16", "FGSM", 16.0, "FGSM_Linf_16"),
    ("Noise_Linf_2", "Noise", 2.0, "Noise_Linf_2"),
])
def test_parse_attack_names(name, method, eps_256, canonical):
    spec = parse_attack(name)
    assert (spec.method, spec.eps_256, spec.name) == (method, eps_256, canonical)
    assert spec.eps == pytest.approx(eps_256 / 256)
    assert parse_attack(spec.name) == spec
    with pytest.raises(Exception):
        spec.eps_256 = 3.0  # frozen


@pytest.mark.parametrize("name", ["", "I_FGSM", "I_FGSM_Linf_", "I_FGSM_Linf_0", "I_FGSM_Linf_-1",
                                  "I_FGSM_Linf_abc", "I_FGSM_Linf_nan", "I_FGSM_Linf_inf",
                                  "FOO_Linf_1", "I_FGSM_L2_1", "Noise_Linf_0"])
def test_parse_attack_rejects_with_one_line_listing_forms(name):
    with pytest.raises(UserError) as err:
        parse_attack(name)
    message = str(err.value)
    assert "\n" not in message
    for form in ("FGSM", "I_FGSM (alias BIM)", "PGD", "MI_FGSM", "DI_FGSM", "TI_FGSM", "CW",
                 "Noise_Linf_<k>", "<ATTACK>_Linf_<k>"):
        assert form in message


def test_schedule_defaults_and_overrides():
    spec = parse_attack("I_FGSM_Linf_1")
    settings = attacks.resolve_settings(spec)
    assert settings["steps"] == 10 and settings["alpha"] == pytest.approx(spec.eps / 5)
    fgsm = attacks.resolve_settings(parse_attack("FGSM_Linf_2"))
    assert fgsm["steps"] == 1 and fgsm["alpha"] == pytest.approx(2 / 256)
    assert attacks.resolve_settings(spec, steps=3, step_size=0.01)["steps"] == 3
    assert attacks.resolve_settings(parse_attack("MI_FGSM_Linf_1"))["decay"] == attacks.MI_DECAY
    assert attacks.resolve_settings(parse_attack("MI_FGSM_Linf_1"), options={"decay": 0.5})["decay"] == 0.5
    assert attacks.resolve_settings(parse_attack("PGD_Linf_1"))["random_start"] is True
    assert attacks.resolve_settings(parse_attack("DI_FGSM_Linf_1"))["di_prob"] == 0.5
    assert attacks.resolve_settings(parse_attack("TI_FGSM_Linf_1"))["ti_kernel"] == 7
    assert attacks.resolve_settings(parse_attack("CW_Linf_1"))["loss"] == "cw"
    with pytest.raises(TypeError):
        attacks.resolve_settings(spec, options={"momentum": 1.0})
    for bad in ({"ti_kernel": 4}, {"di_prob": 1.5}, {"kappa": -1.0}):
        with pytest.raises(ValueError):
            attacks.resolve_settings(spec, options=bad)


def test_gaussian_kernel():
    kernel = attacks.gaussian_kernel(7)
    assert kernel.shape == (7, 7) and float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(kernel, kernel.T) and kernel.argmax() == 24  # symmetric, peak in the centre


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("method", ALL_METHODS)
def test_budget_and_range_hold(method):
    for seed, eps_256 in enumerate((0.5, 2.0, 8.0, 64.0)):
        model = TinyNet(seed=seed)
        images, targets = _batch(seed=seed)
        spec = AttackSpec(method, eps_256)
        adv, success = run_attack(model, images, targets, spec, seed=seed, batch_size=5, progress=False)
        assert adv.dtype == torch.float32 and adv.device.type == "cpu" and adv.shape == images.shape
        assert success.dtype == torch.bool and success.shape == (len(images),)
        assert float((adv - images).abs().max()) <= spec.eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert not torch.equal(adv, images), "the attack must move the images"


def test_fgsm_with_zero_budget_returns_the_input():
    images, targets = _batch()
    adv, _ = run_attack(TinyNet(), images, targets, AttackSpec("FGSM", 0.0), progress=False)
    assert torch.equal(adv, images)


def test_fgsm_is_one_full_step():
    images, targets = _batch()
    images = images.clamp(0.1, 0.9)  # away from the clip
    spec = AttackSpec("FGSM", 8.0)
    adv, _ = run_attack(TinyNet(), images, targets, spec, progress=False)
    moved = (adv - images).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], spec.eps), atol=1e-6)


def test_noise_set_is_real_uniform_noise():
    images = torch.full((4, 3, 32, 32), 0.5)
    spec = AttackSpec("Noise", 16.0)
    adv, _ = run_attack(TinyNet(), images, torch.zeros(4, dtype=torch.long), spec, progress=False)
    noise = adv - images
    assert float(noise.abs().max()) <= spec.eps + 1e-6
    assert float(noise.abs().mean()) == pytest.approx(spec.eps / 2, rel=0.05)  # E|U(-ε, ε)| = ε/2
    assert abs(float(noise.mean())) < spec.eps * 0.05


@pytest.mark.parametrize("method", ["PGD", "DI_FGSM", "Noise", "MI_FGSM"])
def test_same_seed_same_bytes_other_seed_differs(method):
    images, targets = _batch()
    spec = AttackSpec(method, 8.0)
    first, s1 = run_attack(TinyNet(), images, targets, spec, seed=3, batch_size=3, progress=False)
    second, s2 = run_attack(TinyNet(), images, targets, spec, seed=3, batch_size=3, progress=False)
    assert torch.equal(first, second) and torch.equal(s1, s2)
    if method in ("PGD", "Noise"):
        other, _ = run_attack(TinyNet(), images, targets, spec, seed=4, batch_size=3, progress=False)
        assert not torch.equal(first, other)


def test_model_state_is_eval_during_attack_and_restored_after():
    model = TinyNet().train()
    model.conv2.eval()  # mixed modes must come back exactly
    model.fc.weight.requires_grad_(False)
    images, targets = _batch()
    run_attack(model, images, targets, AttackSpec("I_FGSM", 4.0), progress=False)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and model.conv1.training and not model.conv2.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def colour_model():
    """A small model trained to tell the dominant colour channel, and its 256 training images."""
    torch.manual_seed(0)
    model = TinyNet(seed=1)
    colour = torch.randint(0, 3, (256,))
    images = torch.rand(256, 3, 16, 16) * 0.5
    images[torch.arange(256), colour] += 0.4
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        F.cross_entropy(model(images), colour).backward()
        optimiser.step()
    model.eval()
    return model, images, colour


def test_success_flags_match_predictions_on_a_trained_model(colour_model):
    # Targeted attacks flip the trained colour model.
    model, images, colour = colour_model
    with torch.no_grad():
        assert (model(images).argmax(1) == colour).float().mean() > 0.95
    clean, labels = images[:24], colour[:24]
    targets = (labels + 1) % 3
    for method in ("I_FGSM", "PGD", "MI_FGSM", "CW"):
        adv, success = run_attack(model, clean, targets, AttackSpec(method, 64.0), seed=0, progress=False)
        with torch.no_grad():
            predicted = model(adv).argmax(1)
        assert torch.equal(success, predicted == targets)
        assert success.float().mean() >= 0.9, method
    weak, weak_success = run_attack(model, clean, targets, AttackSpec("I_FGSM", 0.25), progress=False)
    assert weak_success.float().mean() < success.float().mean()


def test_extra_term_gets_features_only_when_given():
    model = TinyNet()
    images, targets = _batch()
    spec = AttackSpec("I_FGSM", 8.0)
    plain, _ = run_attack(model, images, targets, spec, progress=False)
    assert model.calls["forward_features"] == 0
    seen = {}

    def extra(logits, features, extra_targets):
        seen.update(logits=logits.shape, shapes=[f.shape for f in features], targets=extra_targets.clone())
        return features[0].pow(2).mean()

    zero_weight, _ = run_attack(model, images, targets, spec, extra=extra, lam=0.0, batch_size=8, progress=False)
    assert model.calls["forward_features"] == 10
    assert seen["shapes"] == [(8, 8), (8, 8)] and seen["logits"] == (8, 3)
    assert torch.equal(seen["targets"], targets)
    assert torch.equal(zero_weight, plain)  # λ = 0: same gradient, same AEs
    weighted, _ = run_attack(model, images, targets, spec, extra=extra, lam=100.0, progress=False)
    assert not torch.equal(weighted, plain)
    assert float((weighted - images).abs().max()) <= spec.eps + 1e-6


@pytest.mark.parametrize("di_prob", [0.0, 1.0])
def test_keep_successful_returns_the_latest_hit_when_the_last_iterate_misses(colour_model, di_prob):
    # An extra term that pushes the target's margin down once it is positive makes the iterates
    # oscillate around the decision boundary, so some last iterates miss after having hit.
    model, images, colour = colour_model
    images, targets = images[:24], (colour[:24] + 1) % 3
    spec = AttackSpec("I_FGSM", 64.0)

    def repel(logits, features, extra_targets):
        target_logit = logits.gather(1, extra_targets[:, None]).squeeze(1)
        others = logits.scatter(1, extra_targets[:, None], float("-inf")).amax(dim=1)
        return F.relu(target_logit - others).mean()

    kwargs = dict(extra=repel, lam=20.0, steps=15, step_size=spec.eps / 8, di_prob=di_prob, seed=0, progress=False)
    last, last_success = run_attack(model, images, targets, spec, **kwargs)
    kept, kept_success = run_attack(model, images, targets, spec, keep_successful=True, **kwargs)
    with torch.no_grad():
        assert torch.equal(kept_success, model(kept).argmax(1) == targets)
    assert bool((kept_success >= last_success).all())
    assert int(kept_success.sum()) > int(last_success.sum())  # some last iterates missed after a hit
    assert torch.equal(kept[last_success], last[last_success])  # a successful last iterate is kept as is
    assert float((kept - images).abs().max()) <= spec.eps + 1e-6 and 0.0 <= float(kept.min()) <= float(kept.max()) <= 1.0
    # stopping a batch once all its images have hit gives the full run's success vector, sooner
    steps_before = model.calls["forward_features"]
    _, full = run_attack(model, images, targets, spec, keep_successful=True, batch_size=4, **kwargs)
    full_steps = model.calls["forward_features"] - steps_before
    steps_before = model.calls["forward_features"]
    _, early = run_attack(model, images, targets, spec, keep_successful=True, stop_when_all_hit=True,
                          batch_size=4, **kwargs)
    assert torch.equal(early, full) and model.calls["forward_features"] - steps_before < full_steps
    with pytest.raises(ValueError):
        run_attack(model, images, targets, spec, stop_when_all_hit=True, **kwargs)


def test_term_after_hit_keeps_the_lambda_zero_success(colour_model):
    """term_after_hit: the term gives an image no gradient until it first reaches its target, so
    an image that never hits follows the λ = 0 path exactly, every image that the λ = 0 attack
    makes hit also hits, and a term strong enough to block the attack from the start no longer
    does; after the hit the term acts."""
    model, images, colour = colour_model
    images, targets = images[:24], (colour[:24] + 1) % 3
    spec = AttackSpec("I_FGSM", 32.0)  # about a third of these images hit at λ = 0

    def anchor(logits, features, extra_targets):  # pulls every feature back to the clean image's
        return sum((f - f0).pow(2).sum(1).mean() for f, f0 in zip(features, clean_features))

    with torch.no_grad():
        clean_features = [f.detach() for f in model.forward_features(images)[1]]
    kwargs = dict(steps=20, step_size=spec.eps / 8, seed=0, progress=False, keep_successful=True, batch_size=24)
    plain, plain_success = run_attack(model, images, targets, spec, **kwargs)
    blocked, blocked_success = run_attack(model, images, targets, spec, extra=anchor, lam=1e3, **kwargs)
    gated, gated_success = run_attack(model, images, targets, spec, extra=anchor, lam=1e3, term_after_hit=True,
                                      **kwargs)
    assert 0 < int(plain_success.sum()) < len(images), "some images must hit and some miss"
    assert int(blocked_success.sum()) < int(plain_success.sum())  # the term blocks the attack
    assert bool((gated_success >= plain_success).all())
    assert torch.equal(gated[~gated_success], plain[~gated_success])  # never hit: the λ = 0 path
    assert not torch.equal(gated[gated_success], plain[gated_success])  # after the hit, the term acts
    assert float((gated - images).abs().max()) <= spec.eps + 1e-6
    with pytest.raises(ValueError, match="term_after_hit"):
        run_attack(model, images, targets, spec, extra=anchor, loss="none", term_after_hit=True, **kwargs)


def test_lamda_fallback_attacks_again_only_the_images_that_missed(colour_model):
    """hfc.hfc_attack_with_fallback: an image the term keeps from its target is attacked again at
    λ·f for each factor in turn; an image that hit at λ keeps its AE and its λ. The term here turns
    the cross-entropy around for the images of target 1 only (−λ·CE_i): at λ = 2 it drives them
    away from their target, at λ = 0.6 it leaves 0.4·CE_i, whose signed steps are the λ = 0
    attack's, and it never touches the others."""
    model, images, colour = colour_model
    images, targets = images[:24], ((colour[:24] + 1) % 3).numpy()
    spec = AttackSpec("I_FGSM", 40.0)  # every image of target 0 hits at λ = 0, 4 of 7 of target 1, none of 2

    def against_target_1(logits, features, extra_targets):
        per_image = F.cross_entropy(logits, extra_targets, reduction="none")
        return -(per_image * (extra_targets == 1)).mean()

    kwargs = dict(step_size_256=5.0, steps=20, seed=0, batch_size=24, device="cpu", progress=False)
    plain, plain_success = hfc.hfc_attack(model, None, images, targets, spec, lam=0.0, **kwargs)
    to_1 = torch.from_numpy(targets == 1)
    assert bool((plain_success & to_1).any()) and bool((plain_success & ~to_1).any())
    assert bool((~plain_success & to_1).any()) and not bool(plain_success.all())
    blocked, blocked_success, blocked_lamdas = hfc.hfc_attack_with_fallback(
        model, against_target_1, images, targets, spec, lam=2.0, **kwargs)
    assert not bool((blocked_success & to_1).any()) and np.all(blocked_lamdas == 2.0)  # no fallback: one λ
    adv, success, lamdas = hfc.hfc_attack_with_fallback(model, against_target_1, images, targets, spec, lam=2.0,
                                                        fallback=[0.3, 0.0], **kwargs)
    assert torch.equal(success, plain_success) and torch.equal(adv[success], plain[success])
    assert torch.equal(adv[~success], blocked[~success])  # no weight helped: the AE at λ stays
    retried = (plain_success & to_1).numpy()
    assert np.allclose(lamdas, np.where(retried, 0.6, 2.0))
    with torch.no_grad():
        assert torch.equal(success, model(adv).argmax(1) == torch.from_numpy(targets))
    assert hfc.lamda_fallback_factors("0.3, 0.1,0") == [0.3, 0.1, 0.0] and hfc.lamda_fallback_factors("") == []
    for bad in ("0.1,0.3", "1", "-0.1", "0.1,0.1", "lots"):
        with pytest.raises(UserError, match="--lamda-fallback"):
            hfc.lamda_fallback_factors(bad)


@pytest.mark.parametrize("method", ["I_FGSM", "PGD", "MI_FGSM", "DI_FGSM", "TI_FGSM", "CW"])
def test_success_only_attack_drops_images_at_their_first_hit(colour_model, method):
    # The λ search needs only the success vector: each image leaves its batch at its first hit, so
    # the engine processes fewer image-steps and every image's verdict is the full run's.
    model, images, colour = colour_model
    images, targets = images[:24], (colour[:24] + 1) % 3
    rows = []

    def counting(logits, features, extra_targets):
        rows.append(len(extra_targets))
        return features[0].pow(2).mean()

    spec = AttackSpec(method, 48.0)
    kwargs = dict(extra=counting, lam=5.0, steps=12, step_size=spec.eps / 10, seed=0, progress=False,
                  keep_successful=True, batch_size=12)
    _, full = run_attack(model, images, targets, spec, **kwargs)
    full_rows, rows[:] = sum(rows), []
    adv, early = run_attack(model, images, targets, spec, stop_when_all_hit=True, **kwargs)
    assert torch.equal(early, full)
    assert 0 < int(full.sum()) < len(full), "some images must hit and some miss for the check to mean anything"
    assert sum(rows) < full_rows
    with torch.no_grad():  # a returned image is the iterate that hit (or the last one)
        assert torch.equal(model(adv).argmax(1) == targets, early)
    assert float((adv - images).abs().max()) <= spec.eps + 1e-6


def test_cw_margin_loss():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    targets = torch.tensor([1, 1])
    # sample 0: max other 2.0 - 0.5 = 1.5; sample 1: max(1.0 - 3.0, -κ)
    assert float(attacks.classification_loss(logits, targets, "cw", kappa=0.0)) == pytest.approx((1.5 + 0.0) / 2)
    assert float(attacks.classification_loss(logits, targets, "cw", kappa=5.0)) == pytest.approx((1.5 - 2.0) / 2)


def test_bad_inputs_are_refused():
    images, targets = _batch()
    with pytest.raises(ValueError):
        run_attack(TinyNet(), images * 2, targets, AttackSpec("I_FGSM", 1.0), progress=False)
    with pytest.raises(ValueError):
        run_attack(TinyNet(), images, targets[:3], AttackSpec("I_FGSM", 1.0), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_budget_and_cpu_noise():
    images, targets = _batch()
    for method in ALL_METHODS:
        spec = AttackSpec(method, 4.0)
        adv, _ = run_attack(TinyNet().cuda(), images, targets, spec, seed=1, progress=False)
        assert adv.device.type == "cpu" and float((adv - images).abs().max()) <= spec.eps + 1e-6
    spec = AttackSpec("Noise", 4.0)
    on_cpu, _ = run_attack(TinyNet(), images, targets, spec, seed=1, progress=False)
    on_gpu, _ = run_attack(TinyNet().cuda(), images, targets, spec, seed=1, progress=False)
    assert torch.allclose(on_cpu, on_gpu, atol=1e-6)


# --------------------------------------------------------------------------- parity
# torchattacks ascends the negated CE in targeted mode and draws from the global RNG; seeding
# that RNG with our seed gives the same random start and the same DI draws. Our projection is
# one clamp to [max(x0-ε, 0), min(x0+ε, 1)]; torchattacks' PGD-style (x0 + clamp(x - x0)) can
# round differently by one ulp, hence the tolerance.
def _torchattacks_cases(model, eps):
    ta = pytest.importorskip("torchattacks")
    alpha = eps / 5
    return [
        ("FGSM", {}, ta.FGSM(model, eps=eps)),
        ("I_FGSM", {}, ta.BIM(model, eps=eps, alpha=alpha, steps=10)),
        ("PGD", {}, ta.PGD(model, eps=eps, alpha=alpha, steps=10, random_start=True)),
        ("MI_FGSM", {}, ta.MIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=1.0)),
        ("MI_FGSM", {"decay": 0.5}, ta.MIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=0.5)),
        ("DI_FGSM", {}, ta.DIFGSM(model, eps=eps, alpha=alpha, steps=10)),
        ("TI_FGSM", {}, ta.TIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=0.0, len_kernel=7, nsig=3,
                                  diversity_prob=0.0)),
        ("MI_FGSM", {"di_prob": 0.5, "ti_kernel": 7, "random_start": True},
         ta.TIFGSM(model, eps=eps, alpha=alpha, steps=10, decay=1.0, len_kernel=7, nsig=3,
                   diversity_prob=0.5, random_start=True)),
    ]


def test_parity_with_torchattacks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    torch.manual_seed(0)
    for layer in model:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    images, targets = _batch(n=12, size=32, seed=2)
    eps = 8 / 256
    for method, options, reference in _torchattacks_cases(model, eps):
        reference.set_mode_targeted_by_label(quiet=True)
        torch.manual_seed(5)
        theirs = reference(images, targets)
        ours, _ = run_attack(model, images, targets, AttackSpec(method, 8.0), seed=5, progress=False, **options)
        assert not torch.equal(ours, images)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=f"{method} {options} vs {reference}")


def test_extra_on_a_hierarchical_net():
    import network
    torch.manual_seed(0)
    model = network.build_model("resnet18", 2)
    images, targets = _batch(n=2, size=32, num_classes=2)
    counts = []

    def extra(logits, features, extra_targets):
        counts.append(len(features))
        return sum(f.mean() for f in features)

    spec = AttackSpec("PGD", 4.0)
    adv, _ = run_attack(model, images, targets, spec, extra=extra, steps=2, progress=False)
    assert counts == [len(model.layer_names)] * 2
    assert float((adv - images).abs().max()) <= spec.eps + 1e-6
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_loss_is_an_option_of_every_method():
    spec = parse_attack("I_FGSM_Linf_1")
    assert attacks.resolve_settings(spec)["loss"] == "ce"
    assert attacks.resolve_settings(spec, options={"loss": "cw", "kappa": 2.0})["loss"] == "cw"
    assert attacks.resolve_settings(parse_attack("CW_Linf_1"), options={"loss": "ce"})["loss"] == "ce"
    with pytest.raises(ValueError, match="loss"):
        attacks.resolve_settings(spec, options={"loss": "hinge"})
    with pytest.raises(ValueError, match="loss"):
        attacks.classification_loss(torch.zeros(2, 3), torch.tensor([0, 1]), "hinge")


def test_cw_margin_gradient_vanishes_beyond_kappa():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.rand(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    target = logits.argmax(1)
    lead = float((logits[0, target] - logits[0].scatter(0, target, float("-inf")).max()).detach())
    assert lead > 0

    def grad(kappa):
        loss = attacks.classification_loss(model(x), target, "cw", kappa=kappa)
        return torch.autograd.grad(loss, x)[0]

    assert torch.count_nonzero(grad(0.5 * lead)) == 0  # margin -lead < -κ: clamped, exactly zero
    assert torch.count_nonzero(grad(0.0)) == 0
    assert torch.count_nonzero(grad(2.0 * lead)) > 0  # within κ of the boundary: the margin pulls
    # Cross-entropy keeps a gradient at any lead.
    ce = attacks.classification_loss(model(x), target, "ce")
    assert torch.count_nonzero(torch.autograd.grad(ce, x)[0]) > 0


@pytest.mark.parametrize("method", ["I_FGSM", "MI_FGSM", "TI_FGSM"])
def test_cw_loss_in_a_base_attack(method):
    images, _ = _batch()
    with torch.no_grad():
        predicted = TinyNet()(images).argmax(1)
    targets = predicted.clone()
    targets[4:] = (predicted[4:] + 1) % 3  # the first four are already classified as their target
    spec = AttackSpec(method, 8.0)
    adv, success = run_attack(TinyNet(), images, targets, spec, loss="cw", kappa=0.0, progress=False)
    assert float((adv - images).abs().max()) <= spec.eps + 1e-6
    assert 0.0 <= float(adv.min()) <= float(adv.max()) <= 1.0
    # Already past the (κ = 0) margin: zero gradient, no step; cross-entropy moves them.
    assert torch.equal(adv[:4], images[:4]) and bool(success[:4].all())
    assert not torch.equal(adv[4:], images[4:])
    moved, _ = run_attack(TinyNet(), images, targets, spec, progress=False)
    assert not torch.equal(moved[:4], images[:4])


def test_first_order_reach_is_exact_on_a_linear_model():
    # For two classes and a linear model the margin is linear in x, so one signed step of ε lowers
    # it by exactly the reach; a budget whose reach is below the margin cannot flip the image.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).train()
    images = 0.3 + 0.4 * torch.rand(6, 3, 8, 8)
    targets = torch.ones(6, dtype=torch.long)
    eps = 2 / 256
    margins, reach = attacks.first_order_reach(model, images, targets, eps)
    assert model.training  # its mode is restored
    weights = model[1].weight.detach().double()
    assert reach == pytest.approx(eps * (weights[0] - weights[1]).abs().sum().item() * torch.ones(6).numpy())
    with torch.no_grad():
        logits = model(images).double()
        assert margins == pytest.approx((logits[:, 0] - logits[:, 1]).numpy())
        stepped = images - eps * torch.sign(weights[0] - weights[1]).float().view(1, 3, 8, 8)
        after = model(stepped).double()
    assert margins - (after[:, 0] - after[:, 1]).numpy() == pytest.approx(reach, rel=1e-4)
