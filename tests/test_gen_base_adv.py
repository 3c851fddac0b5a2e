"""AE sets on disk (invariants) and gen_base_adv.py (end to end on a tiny run, error paths)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aesets
import datasets
import gen_base_adv
import network
import evaluation
import saver
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "gen_base_adv.py"


def _arrays(n=5, eps=2 / 256, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.random((n, 3, 8, 8), dtype=np.float32)
    adv = np.clip(clean + rng.uniform(-eps, eps, clean.shape).astype(np.float32), 0, 1)
    return dict(clean=clean, adv=adv, labels=np.arange(n) % 2, targets=1 - np.arange(n) % 2,
                success=np.ones(n, bool), index=np.arange(n)[::-1].copy())


# --------------------------------------------------------------------------- aesets
def test_save_and_load_round_trip(tmp_path):
    arrays = _arrays()
    summary = aesets.save_ae_set(tmp_path / "set", **arrays, eps=2 / 256, meta={"attack": "X"})
    assert summary["num_images"] == 5 and summary["success_rate"] == 1.0 and summary["attack"] == "X"
    assert 0 < summary["max_linf_256"] <= 2 + 1e-4 and summary["mean_l2"] > 0
    loaded = aesets.load_ae_set(tmp_path / "set")
    for key, value in arrays.items():
        assert np.array_equal(loaded[key], value)
    assert loaded["clean"].dtype == np.float32 and loaded["labels"].dtype == np.int64
    assert loaded["success"].dtype == bool and loaded["meta"]["eps"] == 2 / 256


@pytest.mark.parametrize("breakage", ["over_budget", "above_one", "below_zero", "nan", "shape",
                                      "labels_length", "duplicate_index"])
def test_save_refuses_a_broken_set(tmp_path, breakage):
    arrays = _arrays()
    if breakage == "over_budget":
        arrays["clean"][0, 0, 0, 0] = 0.5
        arrays["adv"][0, 0, 0, 0] = 0.5 + 3 / 256
    elif breakage == "above_one":
        arrays["adv"][1, 0, 0, 0] = 1.0 + 1e-3
        arrays["clean"][1, 0, 0, 0] = 1.0
    elif breakage == "below_zero":
        arrays["adv"][1, 0, 0, 0] = -1e-3
        arrays["clean"][1, 0, 0, 0] = 0.0
    elif breakage == "nan":
        arrays["adv"][2, 1, 1, 1] = np.nan
    elif breakage == "shape":
        arrays["adv"] = arrays["adv"][:4]
    elif breakage == "labels_length":
        arrays["labels"] = arrays["labels"][:4]
    elif breakage == "duplicate_index":
        arrays["index"][1] = arrays["index"][0]
    with pytest.raises(aesets.InvariantError):
        aesets.save_ae_set(tmp_path / "set", **arrays, eps=2 / 256, meta={})
    assert not (tmp_path / "set" / "adv.npz").exists()


def test_budget_tolerance_is_float_rounding_only(tmp_path):
    arrays = _arrays(eps=2 / 256)
    aesets.save_ae_set(tmp_path / "ok", **arrays, eps=2 / 256, meta={})
    with pytest.raises(aesets.InvariantError):
        aesets.save_ae_set(tmp_path / "tight", **arrays, eps=1.5 / 256, meta={})


def test_load_missing_names_gen_base_adv(tmp_path):
    with pytest.raises(UserError, match="gen_base_adv.py"):
        aesets.load_ae_set(tmp_path / "nothing")


def test_load_rechecks_the_budget(tmp_path):
    arrays = _arrays(eps=4 / 256, seed=1)
    aesets.save_ae_set(tmp_path / "set", **arrays, eps=4 / 256, meta={})
    summary = json.loads((tmp_path / "set" / "summary.json").read_text())
    (tmp_path / "set" / "summary.json").write_text(json.dumps({**summary, "eps": 1 / 256}))
    with pytest.raises(aesets.InvariantError):
        aesets.load_ae_set(tmp_path / "set")


# --------------------------------------------------------------------------- gen_base_adv
def _make_run(root: Path, arch: str = "resnet18") -> Path:
    """A run directory with a saved synthetic split and an untrained (but valid) checkpoint."""
    run = root / "runs_synthetic" / arch
    split = datasets.prepare_split("synthetic", image_size=32, seed=0, synthetic_train=40, synthetic_test=40)
    datasets.write_split(run, split)
    torch.manual_seed(0)
    model = network.build_model(arch, 2)
    saver.save_checkpoint(run / saver.CHECKPOINT_NAME, model, {"dataset": "synthetic", "image_size": 32})
    return run


def _cli(tmp_path, *argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_cli_unknown_attack_is_one_line_exit_2(tmp_path):
    result = _cli(tmp_path, "--attack", "FOO_Linf_1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FOO" in lines[0] and "I_FGSM (alias BIM)" in lines[0]


def test_cli_missing_checkpoint_names_train_py(tmp_path):
    result = _cli(tmp_path, "--dataset", "synthetic", "-a", "resnet18", "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.py" in lines[0] and "Traceback" not in result.stderr


def test_bad_flags_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        gen_base_adv.main(["--attack", "TI_FGSM_Linf_1", "--ti-kernel", "4"])
    with pytest.raises(UserError):
        gen_base_adv.main(["--attack", "I_FGSM_Linf_0"])
    _make_run(tmp_path)
    with pytest.raises(UserError, match="resnet18"):
        gen_base_adv.main(["-a", "resnet50", "-n", "resnet18", "--device", "cpu"])


def test_generates_a_checked_reproducible_set(tmp_path, monkeypatch):
    run = _make_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["-a", "resnet18", "--dataset", "SYNTHETIC", "--attack", "BIM_Linf_8", "--limit", "6",
            "-b", "4", "--seed", "3", "--device", "cpu"]
    summary = gen_base_adv.main(argv)
    folder = run / "I_FGSM_Linf_8"  # the alias is saved under the canonical name
    first = aesets.load_ae_set(folder)
    assert summary["num_images"] == 6 and summary["attack"] == "I_FGSM_Linf_8"
    assert summary["max_linf_256"] <= 8 + 1e-3 and summary["mean_l2"] > 0
    assert summary["settings"]["steps"] == 10 and summary["settings"]["step_size_256"] == pytest.approx(1.6)
    assert summary["seconds_per_image"] > 0 and 0 <= summary["success_rate"] <= 1

    # A = the correctly classified test images in the seeded order; targets: the other class.
    model, _ = saver.load_model(run, "cpu")
    images, labels = datasets.load_part(run, "test")
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).numpy()
    expected_index = evaluation.eligible_order(correct, 3)[:6]
    assert np.array_equal(first["index"], expected_index)
    assert np.array_equal(first["labels"], labels.numpy()[expected_index])
    assert np.array_equal(first["targets"], 1 - first["labels"])
    assert np.array_equal(first["clean"], images.numpy()[expected_index])
    with torch.no_grad():
        predicted = model(torch.from_numpy(first["adv"])).argmax(1).numpy()
    assert np.array_equal(first["success"], predicted == first["targets"])

    gen_base_adv.main(argv)
    second = aesets.load_ae_set(folder)
    for key in aesets.ARRAYS:
        assert np.array_equal(first[key], second[key]), key

    gen_base_adv.main(["-a", "resnet18", "--attack", "Noise_Linf_2", "--limit", "6", "--seed", "3",
                       "--device", "cpu"])
    noisy = aesets.load_ae_set(run / "Noise_Linf_2")
    assert np.array_equal(noisy["index"], first["index"])
    assert not np.array_equal(noisy["adv"], noisy["clean"])
    assert np.abs(noisy["adv"] - noisy["clean"]).max() <= 2 / 256 + 1e-6


def test_trained_tiny_run_is_attacked_successfully(request, tmp_path, monkeypatch):
    try:
        tiny_run = Path(request.getfixturevalue("tiny_run"))
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_run fixture in conftest.py yet")
    dataset = tiny_run.parent.name.removeprefix("runs_")
    arch = saver.read_checkpoint(tiny_run / saver.CHECKPOINT_NAME)["meta"]["arch"]
    run = tmp_path / tiny_run.parent.name / tiny_run.name  # work on a copy: never write into the fixture
    run.mkdir(parents=True)
    for name in (datasets.SPLIT_FILE, saver.CHECKPOINT_NAME):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    summary = gen_base_adv.main(["-a", arch, "-n", tiny_run.name, "--dataset", dataset, "--attack", "PGD_Linf_16",
                                 "--limit", "8", "--device", "cpu"])
    assert summary["num_images"] == 8 and summary["clean_accuracy"] > 0
    assert summary["success_rate"] >= 0.75
    assert summary["max_linf_256"] <= 16 + 1e-3
