"""The pipeline on volumes: the 3D ResNet's taps, the brain3d/brain2d sets through the split, every
stage of reproduce.py on a tiny 3D run, the 2D-vs-3D comparison, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attacks
import compare_2d3d
import datasets
import network
import reproduce
import train
import utils

# Tiny pools: 16³ volumes render in about 5 ms each and a 16³ r3d18 step costs a few ms.
POOLS = {"synthetic_train": 120, "synthetic_test": 40}
DETECTOR_OVERRIDES = {"bu_passes": 5, "lid_k": 5, "lid_batch": 20, "dnn_epochs": 2, "train_limit": 60, "batch_size": 16}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HFC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "brain_cache"))


def test_r3d18_has_the_hierarchical_taps_of_a_basic_block_resnet():
    model = network.build_model("r3d18", 2).eval()
    assert (model.input_channels, model.spatial_dims) == (1, 3)
    assert len(model.layer_names) == 17 and model.layer_names[-1] == "flatten"
    assert model.conv_layers == list(range(16)) and model.stage_end_layers == [3, 7, 11, 15]
    assert model.pooled_copy_layers == [16] and model.head_input_index == 16
    x = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    logits, pooled = model.forward_features(x)
    assert logits.shape == (2, 2) and [p.shape[1] for p in pooled] == model.layer_channels
    # the pooled tap is the spatial mean over D×H×W, with its gradient
    maps = model.forward_maps(x)[1]
    assert torch.allclose(pooled[5], maps[5].mean(dim=(2, 3, 4)), atol=1e-6)
    pooled[5].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(model.forward_to(x.detach(), 3), maps[3].detach())
    with pytest.raises(utils.UserError, match="no ImageNet weights"):
        model.load_imagenet("imagenet")


def test_brain_sets_share_subjects_and_load_channel_first(tmp_path):
    split3 = datasets.prepare_split("brain3d", image_size=16, seed=3, **POOLS)
    split2 = datasets.prepare_split("brain2d", image_size=32, seed=3, **POOLS)
    for part in datasets.PARTS:
        assert split3[part] == split2[part]
    datasets.write_split(tmp_path, split3)
    volumes, labels = datasets.load_part(tmp_path, "test")
    assert volumes.shape == (40, 1, 16, 16, 16) and volumes.is_contiguous()
    assert 0.0 <= float(volumes.min()) and float(volumes.max()) <= 1.0 and labels.sum() == 20
    (tmp_path / "2d").mkdir()
    datasets.write_split(tmp_path / "2d", split2)
    slices, labels2 = datasets.load_part(tmp_path / "2d", "test")
    assert slices.shape == (40, 3, 32, 32) and torch.equal(labels, labels2)
    with pytest.raises(utils.UserError, match="at least 16"):
        datasets.prepare_split("brain3d", image_size=12, **POOLS)


@pytest.mark.parametrize("arch,dataset,expected", [("resnet18", "brain3d", "r3d18"), ("r3d18", "synthetic", "resnet50")])
def test_an_arch_that_does_not_read_the_data_is_refused_before_training(tmp_path, monkeypatch, arch, dataset,
                                                                          expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match=expected):
        train.main(["-a", arch, "--dataset", dataset, "--image-size", "32", "--epochs", "1", "--device", "cpu",
                    "--synthetic-train", "40", "--synthetic-test", "10"])
    assert not (tmp_path / f"runs_{dataset}").exists()


def test_input_diversity_and_translation_invariance_are_refused_on_volumes():
    model = network.build_model("r3d18", 2).eval()
    volumes = torch.rand(2, 1, 16, 16, 16)
    for name in ("DI_FGSM_Linf_1", "TI_FGSM_Linf_1"):
        with pytest.raises(utils.UserError, match="not defined for volumes"):
            attacks.run_attack(model, volumes, np.array([0, 1]), attacks.parse_attack(name), progress=False)
    adv, _ = attacks.run_attack(model, volumes, np.array([0, 1]), attacks.parse_attack("PGD_Linf_2"), progress=False)
    assert adv.shape == volumes.shape and float((adv - volumes).abs().max()) <= 2 / 256 + 1e-6


@pytest.fixture(scope="module")
def runs_3d(tmp_path_factory):
    """reproduce.py on a tiny brain3d run (16³, 2 epochs), and a tiny brain2d model of the same subjects."""
    import os

    base = tmp_path_factory.mktemp("brain")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        config = reproduce.Config(arch="r3d18", dataset="brain3d", image_size=16, epochs=2, num_component=2,
                                  device="cpu", threads=1)
        overrides = {"train": dict(POOLS), "detectors": dict(DETECTOR_OVERRIDES), "hfc": {"tune_images": 8}}
        summary = reproduce.run(config, overrides)
        train.run(train.Config(arch="resnet18", dataset="brain2d", image_size=32, epochs=2, device="cpu", threads=1,
                               **POOLS))
    finally:
        os.chdir(cwd)
    return base, summary


def test_reproduce_runs_every_stage_on_volumes(runs_3d):
    base, summary = runs_3d
    run_dir = base / "runs_brain3d" / "r3d18"
    assert set(summary["stage_seconds"]) == {"train", "attack", "detectors", "mixtures", "hfc"}
    spec = attacks.parse_attack(datasets.get("brain3d").main_attack)
    [results_file] = list((run_dir / spec.name).glob("hfc_*/results.json"))
    results = json.loads(results_file.read_text())
    assert set(results["detectors"]) == {"KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"}
    for rows in results["detectors"].values():
        assert 0.0 <= rows["base"]["auc"] <= 1.0 and 0.0 <= rows["hfc"]["auc"] <= 1.0
    adv = np.load(results_file.parent / "adv.npz", allow_pickle=False)
    assert adv["adv"].ndim == 5 and float(np.abs(adv["adv"] - adv["clean"]).max()) <= spec.eps + 1e-6
    assert (base / "runs_brain3d" / "r3d18" / "report" / "table.md").is_file()


def test_compare_2d3d_measures_both_models_on_the_same_subjects(runs_3d, monkeypatch):
    base, _ = runs_3d
    monkeypatch.chdir(base)
    argv = ["--epsilons", "1,16", "--limit", "6", "--device", "cpu", "--threads", "1",
            "-b", "8"]
    result = compare_2d3d.main(argv)
    assert result["n_subjects"] >= 2 and set(result["sides"]) == {"3D", "2D"}
    for side in result["sides"].values():
        curve = side["success_by_eps"]
        assert set(curve) == {"1", "16"} and all(0.0 <= v <= 1.0 for v in curve.values())
        reached = [float(e) for e, v in curve.items() if v >= 0.95]
        assert side["smallest_eps_95"] == (min(reached) if reached else None)
        assert len(side["deviation_ratio_by_stage"]) == 4
        assert all(v > 0 for v in side["deviation_ratio_by_stage"].values())
        for eps, (low, high) in side["success_ci_by_eps"].items():
            assert low <= curve[eps] <= high
    for eps, paired in result["success_3d_minus_2d"].items():
        point = result["sides"]["3D"]["success_by_eps"][eps] - result["sides"]["2D"]["success_by_eps"][eps]
        assert paired["difference"] == pytest.approx(point) and paired["ci"][0] <= point + 1e-12
        assert point - 1e-12 <= paired["ci"][1]
    for stage, ratio in result["deviation_3d_over_2d"].items():
        sides = result["sides"]
        assert ratio == pytest.approx(sides["3D"]["deviation_ratio_by_stage"][stage]
                                      / sides["2D"]["deviation_ratio_by_stage"][stage])
    out = base / "runs_brain3d"
    assert json.loads((out / "compare_2d3d.json").read_text())["claim"] == result["claim"]
    assert (out / "compare_2d3d.png").stat().st_size > 0 and "| 3D / 2D |" in (out / "compare_2d3d.md").read_text()
    # every attack is a piece: asked again, nothing is attacked
    monkeypatch.setattr(attacks, "run_attack", lambda *a, **k: pytest.fail("a finished piece was recomputed"))
    again = compare_2d3d.main(argv)
    assert again["sides"]["3D"]["success_by_eps"] == result["sides"]["3D"]["success_by_eps"]


def test_compare_2d3d_refuses_a_2d_data_set_and_a_missing_model(runs_3d, monkeypatch):
    base, _ = runs_3d
    monkeypatch.chdir(base)
    with pytest.raises(utils.UserError, match="volumetric"):
        compare_2d3d.main(["--dataset", "synthetic", "--device", "cpu"])
    with pytest.raises(utils.UserError, match="train.py"):
        compare_2d3d.main(["--arch-2d", "resnet50", "--device", "cpu"])


def test_ood_lesions_are_refused_on_volumes(tmp_path, monkeypatch):
    import ood_lesion

    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match="holds volumes"):
        ood_lesion.main(["-a", "r3d18", "--dataset", "brain3d", "--device", "cpu"])
