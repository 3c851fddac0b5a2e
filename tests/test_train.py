"""train.py: a short synthetic run, its artifacts, checkpoint round trip, --resume, CLI errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datasets
import saver
import train
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_split_checkpoint_and_summary(tiny_run):
    assert tiny_run.name == "resnet18" and tiny_run.parent.name == "runs_synthetic"
    split = datasets.read_split(tiny_run)
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    meta = saver.read_checkpoint(tiny_run / saver.CHECKPOINT_NAME)["meta"]
    assert meta["arch"] == "resnet18" and meta["dataset"] == "synthetic" and meta["image_size"] == 32
    assert meta["class_names"] == split["class_names"] and meta["split"] == split
    assert len(meta["layer_names"]) == len(meta["layer_channels"]) > 0
    assert summary["settings"]["arch"] == "resnet18" and summary["settings"]["lr"] == 3e-4
    assert 0 <= summary["test_acc"] <= 1 and 0 <= summary["test_auc"] <= 1
    assert len(summary["history"]) == 3 and summary["best_epoch"] in (1, 2, 3)
    # The synthetic set's default schedule: a cosine decay that reaches 0 after the last epoch.
    assert summary["settings"]["lr_schedule"] == "cosine"
    rates = [h["lr"] for h in summary["history"]]
    assert rates == sorted(rates, reverse=True) and rates[0] < 3e-4 and rates[-1] == pytest.approx(0.0, abs=1e-12)
    best = summary["history"][summary["best_epoch"] - 1]
    assert summary["val_acc"] == best["val_acc"] == max(h["val_acc"] for h in summary["history"])
    # The three parts are disjoint and test is untouched by training and selection.
    ids = {part: set(split[part]["ids"]) for part in datasets.PARTS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert all(i.startswith("test/") for i in ids["test"])


def test_checkpoint_reproduces_test_accuracy_and_round_trips(tiny_run, tmp_path):
    """The saved weights are the ones evaluated at the end, and save -> load keeps the logits."""
    model, meta = saver.load_model(tiny_run, "cpu")
    images, labels = datasets.load_part(tiny_run, "test")
    with torch.no_grad():
        logits = model(images)
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(summary["test_acc"])
    saver.save_checkpoint(tmp_path / "copy.pt", model, {k: meta[k] for k in ("dataset", "image_size", "class_names")})
    again, _ = saver.load_model(tmp_path / "copy.pt", "cpu")
    with torch.no_grad():
        assert torch.equal(again(images), logits)


def test_resume_continues_from_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_run.parent, tmp_path / "runs_synthetic")
    monkeypatch.chdir(tmp_path)
    before = json.loads((tiny_run / "train_summary.json").read_text())
    best = before["best_epoch"]
    summary = train.main(["-a", "resnet18", "--dataset", "SYNTHETIC", "--epochs", str(best + 1), "--resume",
                          "-b", "32", "--device", "cpu", "--threads", "1"])
    # Resumed after the best epoch: its records are kept, one more epoch is trained.
    assert [h["epoch"] for h in summary["history"]] == list(range(1, best + 2))
    assert summary["history"][:best] == before["history"][:best]
    assert summary["image_size"] == 32          # the saved split, not the flag default
    assert datasets.read_split(tmp_path / "runs_synthetic" / "resnet18") == datasets.read_split(tiny_run)


def test_resume_with_another_lr_schedule_is_refused(tiny_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_run.parent, tmp_path / "runs_synthetic")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="lr-schedule cosine, not plateau"):
        train.main(["-a", "resnet18", "--dataset", "synthetic", "--epochs", "9", "--resume", "--lr-schedule",
                    "plateau", "--device", "cpu", "--threads", "1"])


def test_resume_without_checkpoint_names_train_py(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="train.py"):
        train.main(["-a", "resnet18", "--resume", "--device", "cpu", "--threads", "1"])


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_missing_aptos_root_is_one_line_naming_the_layout(tmp_path):
    result = _run_cli("--dataset", "APTOS", "--data-root", "/nonexistent", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "/nonexistent" in lines[0] and "train.csv" in lines[0] and "train_images" in lines[0]
    assert not (tmp_path / "runs_APTOS").exists()


def test_bad_flags_are_one_line_errors(tmp_path):
    result = _run_cli("--dataset", "CXR", "--num-classes", "5", "--data-root", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "num-classes" in result.stderr
