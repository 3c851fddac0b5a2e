"""grid.py: the grid file, its expansion into shared stage tasks, and a tiny grid run on a local Ray."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import grid
from conftest import TINY_TRAIN
from utils import UserError

ATTACK = "I_FGSM_Linf_4"
TINY_STAGES = {
    "train": {key: TINY_TRAIN[key] for key in ("synthetic_train", "synthetic_test", "batch_size")},
    "detectors": {"bu_passes": 5, "lid_k": 5, "lid_batch": 20, "dnn_epochs": 2, "train_limit": 60,
                  "batch_size": 16, "maha_magnitude": 0.0},
}


def write_grid(path: Path, **settings) -> Path:
    body = {"datasets": [{"name": "synthetic", "image_size": TINY_TRAIN["image_size"],
                          "epochs": TINY_TRAIN["epochs"], "limit": 24}],
            "archs": ["resnet18"], "attacks": [ATTACK, "FGSM_Linf_4"], "detector_attack": ATTACK,
            "num_components": [2], "lamdas": ["0"], "stages": TINY_STAGES, **settings}
    path.write_text(json.dumps(body))
    return path


def test_grid_file_errors_name_the_bad_key(tmp_path):
    with pytest.raises(UserError, match="no such grid file"):
        grid.read_grid(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("archs = [")
    with pytest.raises(UserError, match="not a valid"):
        grid.read_grid(tmp_path / "bad.toml")
    with pytest.raises(UserError, match="unknown key.*colour"):
        grid.read_grid(write_grid(tmp_path / "g.json", colour="red"))
    with pytest.raises(UserError, match="datasets"):
        grid.read_grid(write_grid(tmp_path / "g.json", datasets=[]))
    with pytest.raises(UserError, match="unknown data set|mnist"):
        grid.read_grid(write_grid(tmp_path / "g.json", datasets=[{"name": "mnist"}]))
    with pytest.raises(UserError, match="stages"):
        grid.read_grid(write_grid(tmp_path / "g.json", stages={"polish": {"x": 1}}))
    with pytest.raises(UserError, match="no_such_field"):
        config = grid.Config(grid=str(write_grid(tmp_path / "g.json", stages={"hfc": {"no_such_field": 1}})))
        grid.tasks_of(grid.read_grid(config.grid), config)


def test_a_data_root_is_the_folder_it_resolves_to(tmp_path):
    # The same images through a relative path from --root or through a link: one setting, so a
    # model trained from one is up to date for the other.
    (tmp_path / "data" / "cxr").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "data")
    (tmp_path / "root").mkdir()
    roots = set()
    for data_root in ("../data/cxr", "../link/cxr", str(tmp_path / "data" / "cxr")):
        path = write_grid(tmp_path / "g.json", datasets=[{"name": "CXR", "data_root": data_root}])
        config = grid.Config(grid=str(path), root=str(tmp_path / "root"))
        roots |= {job.data_root for _, job, _, _ in grid.cells(grid.read_grid(path), config)}
    assert roots == {str((tmp_path / "data" / "cxr").resolve())}


def test_committed_grids_expand_into_shared_tasks():
    root = Path(__file__).resolve().parents[1]
    for name in ("cpu.toml", "paper.toml"):
        config = grid.Config(grid=str(root / "grids" / name))
        settings = grid.read_grid(config.grid)
        tasks = grid.tasks_of(settings, config)
        stages = [t.stage.name for t in tasks.values()]
        cells = len(grid.cells(settings, config))
        runs = len(settings["datasets"]) * len(settings["archs"]) * len(settings["seeds"])
        # one model, one detector fit and one mixture fit per run; an attack and an HFC row per cell
        assert stages.count("train") == stages.count("detectors") == stages.count("mixtures") == runs
        assert stages.count("hfc") == cells == runs * 7
        assert stages.count("attack") + stages.count("detector_attack") == cells
    # every task needs only tasks of its own run, and HFC needs its attack, the detectors and the mixtures
    cpu = grid.tasks_of(grid.read_grid(root / "grids" / "cpu.toml"), grid.Config(grid="grids/cpu.toml"))
    for task in cpu.values():
        needed = [cpu[k].stage.name for k in task.needs]
        expected = {"train": [], "attack": ["train"], "detector_attack": ["train"], "mixtures": ["train"],
                    "detectors": ["attack"], "hfc": ["attack", "detectors", "mixtures"]}[task.stage.name]
        assert sorted(n.replace("detector_attack", "attack") for n in needed) == expected, task.cell


def test_tiny_grid_runs_on_ray_reports_a_failure_and_then_skips_everything(tiny_run, tmp_path):
    pytest.importorskip("ray")
    root = tmp_path / "grid"
    shutil.copytree(tiny_run, root / "runs_synthetic" / "resnet18")
    # Two cells (I_FGSM and FGSM, scored by I_FGSM's detectors) on the synthetic set, and the same two
    # on a chest X-ray folder that does not exist: its training fails, and the six tasks that need
    # its model are not run; the synthetic cells finish.
    tiny = json.loads(write_grid(tmp_path / "tiny.json").read_text())["datasets"]
    path = write_grid(tmp_path / "tiny.json", datasets=tiny + [{"name": "CXR", "data_root": str(tmp_path / "none"),
                                                              "image_size": 32}])
    summary = grid.run(grid.Config(grid=str(path), root=str(root), cpus=2, device="cpu"))
    status = {(t["stage"], t["cell"]): t["status"] for t in summary["tasks"]}
    assert summary["counts"]["failed"] == 1 and summary["counts"]["blocked"] == 6
    failed = next(t for t in summary["tasks"] if t["status"] == "failed")
    assert failed["stage"] == "train" and failed["cell"].startswith("CXR/") and "none" in failed["error"]
    assert status[("train", f"synthetic/resnet18/{ATTACK}/M2/λ0")] == "done"  # the copied model is up to date
    for attack in (ATTACK, "FGSM_Linf_4"):
        assert status[("hfc", f"synthetic/resnet18/{attack}/M2/λ0")] == "ok"
        results = next((root / "runs_synthetic" / "resnet18" / attack).glob("hfc_M2_lam0*/results.json"))
        assert json.loads(results.read_text())["detector_attack"] == ATTACK
    table = (root / "tables" / "table.md").read_text()
    assert ATTACK in table and "FGSM_Linf_4" in table
    assert json.loads((root / "grid_summary.json").read_text())["counts"] == summary["counts"]

    # The same grid without the failing M: everything is up to date, nothing runs, no Ray
    path = write_grid(tmp_path / "tiny.json")
    start = time.perf_counter()
    again = grid.run(grid.Config(grid=str(path), root=str(root), cpus=2, device="cpu"))
    assert again["counts"]["ok"] == again["counts"]["failed"] == 0
    assert again["counts"]["done"] == len(again["tasks"]) and time.perf_counter() - start < 30
