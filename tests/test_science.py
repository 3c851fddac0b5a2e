"""Regression tests of the science: training clears chance, normalisation by value, ε = 0 returns the clean images, and an
attack's result does not depend on the batch size it was run with."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import json

import attacks
import datasets
import network
import saver

# The ImageNet statistics, written out here on purpose: a change to network.IMAGENET_MEAN/STD
# must fail this file rather than move silently with it.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
ENGINE_METHODS = ("FGSM", "I_FGSM", "PGD", "MI_FGSM", "DI_FGSM", "TI_FGSM", "CW", "Noise")


# --------------------------------------------------------------------------- training
# Chance is 0.5 (balanced binary classes). 0.7 on 60 test images is 42 right: a model at chance
# gets there with probability about 0.1%. Measured with the fixture's settings: 0.90 (seed 0) and
# 0.78 (seed 1), so the bar keeps a margin on the weaker seed.
MIN_TEST_ACCURACY = 0.7


def test_tiny_training_clears_chance(tiny_run):
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["counts"]["test"] and sum(summary["counts"]["test"].values()) == 60
    assert summary["test_acc"] >= MIN_TEST_ACCURACY, summary["test_acc"]
    assert summary["test_auc"] > 0.5


# --------------------------------------------------------------------------- normalisation
def test_first_module_maps_mean_to_zero_and_mean_plus_std_to_one():
    model = network.build_model("resnet18", 2).eval()
    first = next(iter(model.backbone.children()))
    assert isinstance(first, network.Normalize)
    at_mean = MEAN.expand(2, 3, 8, 8)
    torch.testing.assert_close(first(at_mean), torch.zeros(2, 3, 8, 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(first(at_mean + STD), torch.ones(2, 3, 8, 8), atol=1e-6, rtol=0)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first(x), (x - MEAN) / STD)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_model_is_the_torchvision_backbone_on_the_normalised_input(arch):
    torch.manual_seed(0)
    model = network.build_model(arch, 2).eval()
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=2)
    if arch.startswith("resnet"):  # the BU dropout in front of the classifier (docs/PROTOCOL.md §4)
        reference.fc = nn.Sequential(nn.Dropout(0.3), reference.fc)
    reference.load_state_dict(model.backbone.net.state_dict())
    reference.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - MEAN) / STD), atol=1e-5, rtol=1e-5)
        logits, _ = model.forward_features(x)
        torch.testing.assert_close(logits, reference((x - MEAN) / STD), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    """The tiny run's model and 5 of its test images (batch sizes 1, 2 and 5 split them differently)."""
    model, _ = saver.load_model(tiny_run, "cpu")
    images, labels = datasets.load_part(tiny_run, "test")
    return model, images[:5], 1 - labels[:5]


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_zero_budget_returns_the_clean_images(tiny_model, method):
    model, images, targets = tiny_model
    spec = attacks.AttackSpec(method, 0.0)  # parse_attack refuses a zero budget; the engine takes it
    with torch.no_grad():
        predicted = model(images).argmax(1)
    # the default schedule (α = 0 too) and a real step, which only the ε-projection can undo
    for step_size in (None, 1 / 256):
        adv, success = attacks.run_attack(model, images, targets, spec, step_size=step_size, seed=1,
                                          batch_size=2, progress=False)
        assert torch.equal(adv, images), (method, step_size)
        assert torch.equal(success, predicted == targets)


BATCH_SIZES = (1, 2, 5)
# DI draws one transform per batch (as the reference code and torchattacks do; the parity test in
# test_attacks.py relies on it), so its AEs depend on how the images are batched.
DI_PER_BATCH = pytest.mark.xfail(strict=True, reason="DI_FGSM draws one resize/pad per batch (torchattacks parity)")


@pytest.mark.parametrize("method", [pytest.param("DI_FGSM", marks=DI_PER_BATCH) if m == "DI_FGSM" else m
                                    for m in ENGINE_METHODS])
def test_results_do_not_depend_on_the_batch_size(tiny_model, method):
    """Batch size 1, 2 and all give the same AEs and success, with the same seed.

    oneDNN picks its convolution kernels by batch size, and their rounding differs in the last
    bits; an iterated sign step turns a last-bit difference of a near-zero gradient into a
    difference of 2α at that pixel. The check therefore runs on PyTorch's native convolutions,
    which compute each image alone: what is left to differ is the engine's own doing (random
    draws consumed per batch, batch-mean losses, batch-wide normalisation)."""
    model, images, targets = tiny_model
    spec = attacks.AttackSpec(method, 4.0)
    with torch.backends.mkldnn.flags(enabled=False):
        runs = [attacks.run_attack(model, images, targets, spec, seed=3, batch_size=size, steps=5,
                                    progress=False)
                for size in BATCH_SIZES]
    whole_adv, whole_success = runs[-1]
    if method != "Noise":
        assert not torch.equal(whole_adv, images)
    for size, (adv, success) in zip(BATCH_SIZES, runs):
        torch.testing.assert_close(adv, whole_adv, atol=1e-6, rtol=0, msg=f"{method}, batch size {size}")
        assert torch.equal(success, whole_success), (method, size)
