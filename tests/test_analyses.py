"""The papers' analysis experiments (stress test, OOD lesions, M and λ sweeps) and what they share
(the imagenette data set, the per-part feature cache, the engine's goal-less loss): their
measurements against independent computations, their stages on a tiny synthetic run, resuming,
and their refusals (one line, exit 2)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import attacks
import datasets
import extract_features
import features
import gen_base_adv
import lesions
import ood_lesion
import runs
import saver
import stress
import stress_test
import sweeps
from conftest import SHARED_DATA
from utils import UserError

ATTACK = "I_FGSM_Linf_4"
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--threads", "1"]
FAST_DETECTORS = ["--bu-passes", "5", "--lid-k", "5", "--lid-batch", "20", "--dnn-epochs", "2",
                  "--train-limit", "60", "-b", "16"]


@pytest.fixture(scope="module")
def pipeline(tiny_run, tmp_path_factory):
    """tiny_run copied, with a base attack and its detectors (what the sweeps build on)."""
    root = tmp_path_factory.mktemp("analyses")
    shutil.copytree(tiny_run, root / "runs_synthetic" / "resnet18")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        gen_base_adv.main(COMMON + ["--attack", ATTACK, "--limit", "40"])
        extract_features.main(COMMON + ["--attack", ATTACK, *FAST_DETECTORS])
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_pipeline(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline)
    return pipeline / "runs_synthetic" / "resnet18"


def _table_is_regular(markdown: str) -> bool:
    """Every row of the Markdown table has the header's number of cells, and the rule is a rule."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return len(rows) >= 3 and len({row.count("|") for row in rows}) == 1 and set(rows[1]) <= set("|-")


def _exit_line(capsys, main, argv) -> str:
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as exc:
        import utils
        utils.run_cli(lambda: main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- stress measurements

def test_class_statistics_and_the_attack_term_agree_with_scipy():
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(80, 6)) + np.repeat([[0.0], [3.0]], 40, axis=0)
    labels = np.repeat([0, 1], 40)
    stats = stress.ClassStatistics.fit(pooled, labels, 2)
    query, query_labels = rng.normal(size=(10, 6)), rng.integers(0, 2, 10)
    expected = [mahalanobis(q, stats.means[c], stats.precisions[c]) for q, c in zip(query, query_labels)]
    np.testing.assert_allclose(stats.distances(query, query_labels), expected, rtol=1e-10)
    term = stress.DeviationTerm(stats, layer=0)
    torch_d = term.distances(torch.tensor(query, dtype=torch.float32), torch.from_numpy(query_labels))
    np.testing.assert_allclose(torch_d.numpy(), expected, rtol=1e-4)
    # its gradient is autograd's of the same expression: check it against a finite difference
    x = torch.tensor(query[:1], dtype=torch.float64, requires_grad=True)
    term64 = stress.DeviationTerm(stats, layer=0)
    term64.means, term64.factors = term64.means.double(), term64.factors.double()
    (grad,) = torch.autograd.grad(term64([], [x], torch.from_numpy(query_labels[:1])), x)
    step = 1e-6
    for i in range(6):
        e = torch.zeros_like(x)
        e[0, i] = step
        numeric = (term64([], [x + e], torch.from_numpy(query_labels[:1]))
                   - term64([], [x - e], torch.from_numpy(query_labels[:1]))) / (2 * step)
        assert float(grad[0, i]) == pytest.approx(float(numeric.detach()), rel=1e-5, abs=1e-8)


def test_direction_consistency():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=16)
    same = np.tile(direction, (5, 1)) * rng.uniform(0.5, 2, size=(5, 1))
    # one direction per target, opposite between targets: consistent within each target
    shifts = np.concatenate([same, -same])
    targets = np.repeat([0, 1], 5)
    assert stress.direction_consistency(shifts, targets) == pytest.approx(1.0)
    # pooled over targets (one target for all) the opposite halves cancel
    assert stress.direction_consistency(shifts, np.zeros(10)) < 0
    # random shifts in many dimensions have no common direction
    assert abs(stress.direction_consistency(rng.normal(size=(200, 512)), np.zeros(200))) < 0.02
    # the pair formula equals the explicit mean over pairs
    x = rng.normal(size=(7, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert stress.direction_consistency(x, np.zeros(7)) == pytest.approx(cos[~np.eye(7, dtype=bool)].mean())


def test_goal_less_loss_needs_a_term_and_a_tap_needs_no_logits(tiny_run):
    model, _ = saver.load_model(tiny_run, "cpu")
    x = torch.rand(2, 3, 32, 32)
    spec = attacks.parse_attack("I_FGSM_Linf_1")
    with pytest.raises(ValueError, match="needs an extra"):
        attacks.run_attack(model, x, [0, 1], spec, loss="none", progress=False)
    stats = stress.ClassStatistics(np.zeros((2, model.layer_channels[1])),
                                   np.tile(np.eye(model.layer_channels[1]), (2, 1, 1)))
    with pytest.raises(ValueError, match="keep_successful=False"):
        attacks.run_attack(model, x, [0, 1], spec, extra=stress.DeviationTerm(stats, 1), loss="none",
                           keep_successful=True, progress=False)


# ----------------------------------------------------------------------------- stress_test.py

def test_stress_stage_on_the_tiny_run(in_pipeline, capsys):
    argv = COMMON + ["--limit", "6", "--epsilons", "1,4", "--direction-eps", "4"]
    result = stress_test.main(argv)
    out = in_pipeline / "stress"
    saved = json.loads((out / "stress.json").read_text())
    assert saved["n_images"] == 6 and saved["epsilons_256"] == [1.0, 4.0] and not saved["natural"]
    model, _ = saver.load_model(in_pipeline, "cpu")
    assert [layer["index"] for layer in saved["layers"]] == list(model.stage_end_layers)
    for layer in saved["layers"]:
        small, large = (saved["deviation"][e][layer["name"]] for e in ("1", "4"))
        # a larger budget moves the features further, and never past the L∞ ball
        assert large["median_deviation"] > small["median_deviation"] > small["median_clean"]
        assert small["linf_256"] <= 1 + 1e-3 and large["linf_256"] <= 4 + 1e-3
        assert np.isfinite(saved["direction_consistency"][layer["name"]])
        assert -1 <= saved["direction_consistency"][layer["name"]] <= 1
    assert _table_is_regular((out / "stress.md").read_text()) and (out / "stress.png").is_file()
    assert result["direction_attack"]["attack"] == "I_FGSM_Linf_4"

    # a second run reuses every piece (their files are not rewritten)
    pieces = sorted(p for p in out.iterdir() if p.is_dir())
    stamps = [(p / runs.PIECE_FILE).stat().st_mtime_ns for p in pieces]
    again = stress_test.main(argv)
    assert [(p / runs.PIECE_FILE).stat().st_mtime_ns for p in pieces] == stamps
    assert again["deviation"] == saved["deviation"]

    # side by side with a natural model's result (the same numbers, marked natural)
    natural = dict(saved, dataset="imagenette", natural=True)
    natural_file = in_pipeline / "natural_stress.json"
    natural_file.write_text(json.dumps(natural))
    side = stress_test.main(["--side-by-side", f"{out / 'stress.json'},{natural_file}",
                             "--out", str(in_pipeline / "side")])
    pair = side["medical_over_natural"]["synthetic (resnet18) / imagenette (resnet18)"]
    assert all(value == pytest.approx(1.0) for stage in pair.values() for value in stage.values())
    assert (in_pipeline / "side" / "side_by_side.png").is_file()
    assert _table_is_regular((in_pipeline / "side" / "side_by_side.md").read_text().split("\n\n**")[0])

    err = _exit_line(capsys, stress_test.main, COMMON + ["--epsilons", "one"])
    assert "--epsilons" in err
    err = _exit_line(capsys, stress_test.main, ["--side-by-side", str(out / "stress.json")])
    assert "--out" in err
    err = _exit_line(capsys, stress_test.main, ["-a", "resnet18", "-n", "nothing", "--dataset", "synthetic"])
    assert "train.py" in err


# ----------------------------------------------------------------------------- lesions and OOD

def test_lesions_are_seeded_local_and_grow_with_the_radius():
    images = torch.full((6, 3, 64, 64), 0.5)
    first, counts = lesions.add_lesions(images, 16, seed=3)
    again, _ = lesions.add_lesions(images, 16, seed=3)
    assert torch.equal(first, again)
    assert counts.min() >= 1 and counts.max() <= lesions.MAX_LESIONS
    assert not torch.equal(first, lesions.add_lesions(images, 16, seed=4)[0])
    changed = lambda x: float(((x - images).abs().amax(1) > 0.02).float().mean())  # noqa: E731
    small, large = changed(lesions.add_lesions(images, 4, seed=3)[0]), changed(first)
    assert 0 < small < large < 0.9  # lesions cover part of the image, more of it when larger
    assert float(first.min()) >= 0 and float(first.max()) <= 1


def test_lesions_avoid_a_black_border():
    images = torch.zeros(4, 3, 64, 64)
    images[:, :, 16:48, 16:48] = 0.6  # the tissue: a square in a black frame
    lesioned, _ = lesions.add_lesions(images, 8, seed=0)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[8:56, 8:56] = True  # the tissue plus the reach of a lesion centred on its edge
    assert float((lesioned - images).abs().amax(1)[:, ~inside].max()) < 0.05


def test_ood_stage_on_the_tiny_run(in_pipeline, capsys):
    import get_GMM

    err = _exit_line(capsys, ood_lesion.main, COMMON + ["-y", "3"])
    assert "get_GMM.py" in err and "-y 3" in err
    get_GMM.main(COMMON + ["-y", "2", "--jobs", "1"])
    result = ood_lesion.main(COMMON + ["-y", "2", "--limit", "20"])
    saved = json.loads((in_pipeline / "ood" / "ood.json").read_text())
    assert saved["n_images"] == 20 and list(saved["by_radius"]) == ["4", "8", "16", "32"]
    for row in saved["by_radius"].values():
        for score in ood_lesion.SCORES:
            auc, (low, high) = row[score]["auroc"], row[score]["auroc_ci"]
            assert 0 <= low <= auc <= high <= 1
    assert result["by_radius"]["32"]["radius_px"] == pytest.approx(32 * 32 / 256)
    assert (in_pipeline / "ood" / "ood.png").is_file()
    assert _table_is_regular((in_pipeline / "ood" / "ood.md").read_text())
    err = _exit_line(capsys, ood_lesion.main, COMMON + ["--radii", "0"])
    assert "--radii" in err


# ----------------------------------------------------------------------------- sweeps.py

def test_sweeps_on_the_tiny_run(in_pipeline, capsys, monkeypatch):
    argv = COMMON + ["--attack", ATTACK, "--m-values", "1,2", "--m-lamda", "1", "--lamda-values", "0,1",
                     "--lamda-m", "2", "--limit", "6"]
    result = sweeps.main(argv)
    m_sweep = json.loads((in_pipeline / "sweeps" / "m_sweep.json").read_text())
    l_sweep = json.loads((in_pipeline / "sweeps" / "lambda_sweep.json").read_text())
    assert [p["num_component"] for p in m_sweep["points"]] == [1, 2]
    assert [p["lamda"] for p in l_sweep["points"]] == [0, 1]
    for point in m_sweep["points"] + l_sweep["points"]:
        assert set(point["auc"]) == {"KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"}
        assert 0 <= point["success"] <= 1 and point["seconds_per_image"] > 0
        assert np.isfinite(point["mixture_log_likelihood"]["hfc"])
    # M = 2, λ = 1 is one HFC result, shared by both sweeps
    assert m_sweep["points"][1]["results"] == l_sweep["points"][1]["results"]
    assert result["lambda"]["points"][0]["lamda"] == 0
    for name in ("m_sweep.png", "lambda_sweep.png", "m_sweep.md", "lambda_sweep.md"):
        assert (in_pipeline / "sweeps" / name).is_file()
    assert _table_is_regular((in_pipeline / "sweeps" / "m_sweep.md").read_text())

    # again: every point is reused, no stage runs
    import get_GMM
    import gmm_attack

    def refuse(*_, **__):
        raise AssertionError("a stage ran again")
    monkeypatch.setattr(get_GMM, "run", refuse)
    monkeypatch.setattr(gmm_attack, "run", refuse)
    assert sweeps.main(argv)["m"]["points"] == m_sweep["points"]

    err = _exit_line(capsys, sweeps.main, COMMON + ["--sweeps", "k"])
    assert "--sweeps" in err
    err = _exit_line(capsys, sweeps.main, COMMON + ["--attack", "PGD_Linf_4", "--sweeps", "lambda"])
    assert "gen_base_adv.py" in err and "PGD_Linf_4" in err


# ----------------------------------------------------------------------------- shared pieces

def test_part_features_are_cached_and_remade_for_a_new_model(tiny_run, tmp_path):
    run_dir = tmp_path / "runs_synthetic" / "resnet18"
    shutil.copytree(tiny_run, run_dir)
    run_ = runs.Run("synthetic", "resnet18", root=tmp_path)
    model, _ = saver.load_model(run_dir, "cpu")
    first = features.part_features(run_, model, "val", progress=False)
    cached = run_dir / "features" / "val" / "features.npz"
    stamp = cached.stat().st_mtime_ns
    second = features.part_features(run_, model, "val", progress=False)
    assert cached.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(second.logits, first.logits)
    for a, b in zip(first.pooled, second.pooled):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(second.images, first.images)
    # a re-trained model (another checkpoint) makes the cache stale
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, run_dir / "checkpoint.pt")
    model2, _ = saver.load_model(run_dir, "cpu")
    third = features.part_features(run_, model2, "val", progress=False)
    assert cached.stat().st_mtime_ns != stamp
    assert not np.array_equal(third.logits, first.logits)


@pytest.mark.skipif(not (SHARED_DATA / "imagenette").is_dir(), reason="shared Imagenette sample not present")
def test_imagenette_pair_split():
    split = datasets.prepare_split("imagenette", SHARED_DATA / "imagenette")
    assert split["class_names"] == ["tench", "parachute"]
    assert split["imagenette_pair"] == datasets.IMAGENETTE_PAIR
    counts = datasets.describe_split(split)
    assert counts["test"] == {"tench": 50, "parachute": 50}
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 400
    other = datasets.prepare_split("imagenette", SHARED_DATA / "imagenette", imagenette_pair="n03028079,n03445777")
    assert other["class_names"] == ["church", "golf ball"]
    assert all(i.split("/")[1] in ("n03028079", "n03445777") for i in other["test"]["ids"])
    assert datasets.get("imagenette").natural and not datasets.get("APTOS").natural
    with pytest.raises(UserError, match="two different wnids"):
        datasets.prepare_split("imagenette", SHARED_DATA / "imagenette", imagenette_pair="n01440764")
    with pytest.raises(UserError, match="not found"):
        datasets.prepare_split("imagenette", Path("/nonexistent"))


# ----------------------------------------------------------------------------- transfer.py

def test_transfer_stage_on_the_tiny_run(in_pipeline, capsys):
    import get_GMM
    import train
    import transfer
    from conftest import TINY_TRAIN

    err = _exit_line(capsys, transfer.main, COMMON + ["--attack", ATTACK, "--surrogate", "other"])
    assert "train.py" in err and "other" in err
    err = _exit_line(capsys, transfer.main, COMMON + ["--attack", ATTACK, "--surrogate", "resnet18"])
    assert "victim itself" in err
    # the surrogate: the same architecture trained with another seed, and its own mixtures
    train.run(train.Config(**{**TINY_TRAIN, "seed": 1}, name="seed1", device="cpu", threads=1))
    err = _exit_line(capsys, transfer.main, COMMON + ["--attack", ATTACK, "--surrogate", "seed1", "-y", "2"])
    assert "get_GMM.py" in err and "-n seed1" in err
    get_GMM.main(COMMON + ["-n", "seed1", "-y", "2", "--jobs", "1"])

    argv = COMMON + ["--attack", ATTACK, "--surrogate", "seed1", "-y", "2", "--lamda", "1", "--limit", "8",
                     "--min-scored", "1"]
    result = transfer.main(argv)
    out = in_pipeline / ATTACK / "transfer" / "seed1"
    saved = json.loads((out / "transfer.json").read_text())
    assert saved["surrogate_arch"] == "resnet18" and saved["n_eval"] == 8
    for row in transfer.ROWS:
        entry = saved["rows"][row]
        adv = np.load(out / row / "adv.npz")
        clean = adv["clean"]
        assert np.abs(adv["adv"] - clean).max() <= 4 / 256 + 1e-6  # L∞ ≤ ε on every saved AE
        # success is the victim's verdict, recomputed here
        model, _ = saver.load_model(in_pipeline, "cpu")
        with torch.no_grad():
            fooled = model(torch.from_numpy(adv["adv"])).argmax(1).numpy() == adv["targets"]
        assert entry["success"] == pytest.approx(fooled.mean())
        assert 0 <= entry["surrogate_success"] <= 1
        assert entry["n_success"] == fooled.sum()
        if fooled.any():
            assert set(entry["detectors"]) == {"KD", "BU", "KD+BU", "LID", "MAHA", "SVM", "DNN"}
    assert result["rows"]["hfc_transfer"]["lamda"] == 1
    assert _table_is_regular((out / "transfer.md").read_text())
    # a row that fools the victim nowhere is reported with empty detectors, and the table stays whole
    empty = json.loads(json.dumps(saved))
    for row in empty["rows"].values():
        row.update(success=0.0, mean_auc=None, mean_auc_ci=None, success_ci=None, detectors={})
    assert _table_is_regular(transfer.markdown(empty))
    stamp = (out / "hfc_transfer" / runs.PIECE_FILE).stat().st_mtime_ns
    # asked again with a bar no row reaches: the AEs are reused, and no row is scored on too few of them
    strict = transfer.main(argv[:-1] + ["9"])
    assert (out / "hfc_transfer" / runs.PIECE_FILE).stat().st_mtime_ns == stamp  # reused
    assert all(not r["detectors"] and r["mean_auc"] is None for r in strict["rows"].values())
    assert "too few to score" in (out / "transfer.md").read_text()
