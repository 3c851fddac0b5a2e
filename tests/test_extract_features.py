"""extract_features.py: the protocol end to end on a tiny run, and its error paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aesets
import datasets
import detectors
import extract_features
import features
import network
import evaluation
import saver
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "extract_features.py"
ATTACK = "I_FGSM_Linf_64"
FAST = ["--bu-passes", "10", "--lid-k", "5", "--lid-batch", "20", "--dnn-epochs", "5", "--train-limit", "30",
        "--device", "cpu", "-b", "8"]


def _make_run(root: Path, with_aes: bool = True, n: int = 20) -> Path:
    """A synthetic run (untrained resnet18, 32 px) with a hand-made AE set: the AEs are the clean
    images moved by ±64/256 (outliers), two of them marked unsuccessful."""
    run = root / "runs_synthetic" / "resnet18"
    split = datasets.prepare_split("synthetic", image_size=32, seed=0, synthetic_train=40, synthetic_test=n)
    datasets.write_split(run, split)
    torch.manual_seed(0)
    saver.save_checkpoint(run / saver.CHECKPOINT_NAME, network.build_model("resnet18", 2),
                          {"dataset": "synthetic", "image_size": 32})
    if with_aes:
        images, labels = datasets.load_part(run, "test")
        clean = images.numpy()
        rng = np.random.default_rng(0)
        adv = np.clip(clean + rng.choice([-1.0, 1.0], clean.shape) * 64 / 256, 0, 1).astype(np.float32)
        success = np.ones(n, bool)
        success[[3, n - 2]] = False
        aesets.save_ae_set(run / ATTACK, clean=clean, adv=adv, labels=labels, targets=1 - labels, success=success,
                           index=np.arange(n)[::-1].copy(), eps=64 / 256, meta={"attack": ATTACK},
                           provenance=("attack", {}, {"checkpoint": run / saver.CHECKPOINT_NAME}))
    return run


def _cli(cwd, *argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_missing_checkpoint_names_train_py(tmp_path):
    _one_line_error(_cli(tmp_path, "-a", "resnet18", "--device", "cpu"), "train.py")


def test_cli_missing_aes_names_gen_base_adv(tmp_path):
    _make_run(tmp_path, with_aes=False)
    _one_line_error(_cli(tmp_path, "-a", "resnet18", "--attack", ATTACK, "--device", "cpu"), "gen_base_adv.py", ATTACK)


def test_bad_flags_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unknown detector"):
        extract_features.main(["--detectors", "KD,FOO"])
    with pytest.raises(UserError, match="unknown attack"):
        extract_features.main(["--attack", "FOO_Linf_1"])
    _make_run(tmp_path)
    with pytest.raises(UserError, match="layer choice"):
        extract_features.main(["-a", "resnet18", "--attack", ATTACK, "--dnn-layers", "16", *FAST])  # flatten
    with pytest.raises(UserError, match="layer choice"):
        extract_features.main(["-a", "resnet18", "--attack", ATTACK, "--maha-layers", "first", *FAST])
    with pytest.raises(UserError, match="Noise_Linf"):
        extract_features.main(["-a", "resnet18", "--attack", ATTACK, "--noise", "PGD_Linf_2", *FAST])


def test_end_to_end_protocol_and_reload(tmp_path, monkeypatch):
    run = _make_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = extract_features.main(["-a", "resnet18", "--attack", ATTACK, *FAST])

    # the noise set was made for exactly the images of A, in A's order
    ae, noise = aesets.load_ae_set(run / ATTACK), aesets.load_ae_set(run / "Noise_Linf_2")
    assert np.array_equal(noise["index"], ae["index"]) and np.array_equal(noise["clean"], ae["clean"])
    assert 0 < np.abs(noise["adv"] - noise["clean"]).max() <= 2 / 256 + 1e-6

    # the protocol: 70/30 split of A; benign = clean + noise; adversarial = successful AEs only
    fit_pos, eval_pos = evaluation.fit_eval_split(20)
    assert summary["A_fit"] == {"images": 14, "benign": 28, "adv": int(ae["success"][fit_pos].sum())}
    assert summary["A_eval"] == {"images": 6, "benign": 12, "adv": int(ae["success"][eval_pos].sum())}
    assert summary["train_images"] == 30

    out = run / ATTACK / "detectors"
    written = (out / "summary.json").read_text()
    assert list(summary["detectors"]) == list(detectors.DETECTORS)
    for name, row in summary["detectors"].items():
        assert {"auc", "tnr90", "tnr_at_tpr95", "detection_acc", "fit_seconds", "seconds"} <= set(row)
        assert (name in ("KD", "LID", "MAHA", "DNN")) == ("layer_auc" in row)
        assert f'"{name}"' in written
    for name in ("KD", "MAHA", "SVM", "DNN"):  # ±64/256 AEs are gross outliers
        assert summary["detectors"][name]["auc"] > 0.8, name

    # the saved detectors, loaded back and scored on A_eval rebuilt independently (each set
    # extracted on its own, same batch size): exactly the same numbers
    model, _ = saver.load_model(run, "cpu")
    loaded = detectors.load_detectors(out)
    success = ae["success"][eval_pos]
    benign, adv = features.benign_and_adv(model, ae["clean"][eval_pos], noise["adv"][eval_pos],
                                          ae["adv"][eval_pos], success, "cpu", 8, loaded["DNN"].layers_, False)
    assert len(benign) == 2 * len(eval_pos) and len(adv) == success.sum()
    reports = detectors.evaluate(loaded, model, benign, adv)
    for name, report in reports.items():
        for key in ("auc", "tnr90", "tnr_at_tpr95", "detection_acc"):
            assert report[key] == summary["detectors"][name][key], (name, key)


def test_noise_set_for_other_images_is_refused(tmp_path, monkeypatch):
    run = _make_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    ae = aesets.load_ae_set(run / ATTACK)
    keep = slice(0, 5)
    aesets.save_ae_set(run / "Noise_Linf_2", clean=ae["clean"][keep], adv=ae["clean"][keep],
                       labels=ae["labels"][keep], targets=ae["targets"][keep], success=ae["success"][keep],
                       index=ae["index"][keep], eps=2 / 256, meta={},
                       provenance=("noise", {}, {"checkpoint": run / saver.CHECKPOINT_NAME}))
    with pytest.raises(UserError, match="lacks 15 images"):
        extract_features.main(["-a", "resnet18", "--attack", ATTACK, *FAST])
