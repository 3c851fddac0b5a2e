"""Shared fixtures: a tiny trained synthetic run that the later stages' tests build on."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"



@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test: the models are tiny, and on a 2-core machine shared with other
    work, oversubscribed threads made attacks 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def moved_aside(path: Path, parking: Path):
    """``path`` is absent inside the block (parked under ``parking``) and back after it, even when the
    block fails: for testing a stage's error when an input artifact is missing."""
    parked = parking / f"parked_{path.name}"
    path.rename(parked)
    try:
        yield
    finally:
        parked.rename(path)


# The tiny run's training settings (train.Config fields): reproduce.py composed with these finds
# the fixture's training up to date.
TINY_TRAIN = {"arch": "resnet18", "dataset": "synthetic", "image_size": 32, "synthetic_train": 400,
              "synthetic_test": 60, "epochs": 3, "batch_size": 16, "seed": 0}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A ResNet-18 trained briefly on 32 px synthetic images; returns runs_synthetic/resnet18.

    400 training images, batch 16, 3 epochs (about 70 steps, ~20 s on one core): the smallest
    setting measured to clear chance reliably (test accuracy 0.90 and 0.78 on seeds 0 and 1);
    the former 120 images at batch 32 for 2 epochs (6 steps) stayed at chance (0.48, 0.43).

    The folder holds split.json, checkpoint.pt and train_summary.json, as a real run does.
    """
    import train

    base = tmp_path_factory.mktemp("tiny")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        train.run(train.Config(**TINY_TRAIN, device="cpu", threads=1))
    finally:
        os.chdir(cwd)
    return base / "runs_synthetic" / "resnet18"
