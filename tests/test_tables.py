"""Intervals in report.py's tables, and tables.py on crafted results.json files (no model needed)."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import report
import tables
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
ATTACK = "I_FGSM_Linf_4"
SEVEN = report.DETECTOR_ORDER


def crafted(seed: int, lamda: str, shift: float, with_ci: bool = True) -> dict:
    """A results.json as gmm_attack.py writes it: seven detectors, base and hfc rows (``shift``
    moves the HFC row's numbers, the seed the base row's)."""
    dets = {}
    for i, name in enumerate(SEVEN):
        dets[name] = {}
        for row, auc in (("base", 0.9 - 0.01 * i + 0.02 * seed), ("hfc", 0.3 + 0.01 * i + shift)):
            m = {"auc": auc, "tnr90": auc - 0.2}
            if with_ci:
                m |= {"auc_ci": [auc - 0.05, auc + 0.04], "tnr90_ci": [auc - 0.3, auc - 0.1]}
            dets[name][row] = m
    extra = {}
    if with_ci:
        means = {row: sum(dets[n][row]["auc"] for n in SEVEN) / 7 for row in ("base", "hfc")}
        extra = {"success_ci": {"base": [0.9, 1.0], "hfc": [0.8, 0.95]}, "mean_auc": means,
                 "mean_auc_ci": {row: [v - 0.03, v + 0.03] for row, v in means.items()},
                 "mean_auc_of": list(SEVEN), "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95}}
    results = report.results_dict(dataset="synthetic", arch="resnet18", attack=ATTACK, detector_attack=ATTACK,
                                  epsilon_256=4, n_eval=20 + seed, success={"base": 1.0, "hfc": 0.9},
                                  detectors=dets, **extra, lamda=None if lamda == "auto" else float(lamda))
    results["record"] = {"stage": "hfc", "settings": {
        "arch": "resnet18", "dataset": "synthetic", "seed": seed, "attack": ATTACK, "detector": None,
        "noise": "Noise_Linf_2", "num_component": 2, "lamda": lamda, "limit": None, "term": "paper"}}
    return results


def write(root: Path, seed: int, lamda: str, shift: float, **kw) -> Path:
    folder = root / "runs_synthetic" / "resnet18" / ATTACK / f"hfc_M2_lam{lamda}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(crafted(seed, lamda, shift, **kw)))
    return root / "runs_synthetic"


# ----------------------------------------------------------------------------------- report.py

def test_report_prints_intervals_when_present_and_not_otherwise():
    results = crafted(0, "auto", 0.0)
    md = report.format_table(results, "md")
    assert "| KD | 0.900 [0.850, 0.940] | 0.700 [0.600, 0.800] | 0.300 [0.250, 0.340] |" in md
    assert "| success | 1.000 [0.900, 1.000] |  | 0.900 [0.800, 0.950] |  |" in md
    mean_hfc = results["mean_auc"]["hfc"]
    assert f"{mean_hfc:.3f} [{mean_hfc - 0.03:.3f}, {mean_hfc + 0.03:.3f}]" in md
    line = report.summary_rows(results, "seed 0")[1]
    assert line[2] == "0.300 [0.250, 0.340]" and line[-2] == "0.900 [0.800, 0.950]"
    old = crafted(0, "auto", 0.0, with_ci=False)
    md_old = report.format_table(old, "md")
    assert "[" not in md_old and "| KD | 0.900 | 0.700 | 0.300 | 0.100 |" in md_old
    assert report.summary_rows(old, "x")[0][2] == "0.900"
    # a stored mean over other detectors than those in the file is not shown as this file's mean
    partial = crafted(0, "auto", 0.0)
    del partial["detectors"]["DNN"]
    assert report.mean_auc(partial, "hfc")[1] is None
    compare = {"dataset": "synthetic", "arch": "resnet18", "attack": ATTACK, "epsilon_256": 4, "step_size_256": 0.4,
               "steps": 20, "n_eval": 20, "rows": {
                   "HFC": {"success": 0.9, "success_ci": [0.8, 0.95], "mean_auc": 0.3, "mean_auc_ci": [0.2, 0.4],
                           "detectors": {"KD": {"auc": 0.3, "tnr90": 0.1, "auc_ci": [0.25, 0.35]}}, "lamda": 1.0},
                   "old": {"success": 0.5, "mean_auc": None, "detectors": None, "lamda": None}}}
    text = report.format_compare_table(compare, "md")
    assert "| HFC | 0.900 [0.800, 0.950] | 0.300 [0.200, 0.400] | 0.300 [0.250, 0.350] | - |" in text
    assert "| old | 0.500 | - | - |" in text


# ----------------------------------------------------------------------------------- tables.py

def test_tables_writes_three_formats_with_mean_and_sd_over_seeds(tmp_path, monkeypatch, capsys):
    fd0 = write(tmp_path / "fd0", 0, "auto", 0.0)
    write(tmp_path / "fd0", 0, "0", 0.05)
    fd1 = write(tmp_path / "fd1", 1, "auto", 0.02)
    out = tmp_path / "out"
    table = tables.main([str(fd0), str(fd1), "--out", str(out)])
    printed = capsys.readouterr().out
    assert [row["label"] for row in table["rows"]] == ["base", "+HFC M2_lam0", "+HFC M2_lamauto"]
    base, lam0, auto = table["rows"]
    assert base["seeds"] == [0, 1] and lam0["seeds"] == [0] and auto["seeds"] == [0, 1]
    # over two seeds: mean and sample sd of the two values, no interval
    kd = auto["detectors"]["KD"]["auc"]
    assert kd["values"] == pytest.approx([0.30, 0.32]) and kd["mean"] == pytest.approx(0.31)
    assert kd["sd"] == pytest.approx(0.02 / 2 ** 0.5) and kd["ci"] is None
    # one seed: its value and interval
    one = lam0["detectors"]["KD"]["auc"]
    assert one["mean"] == pytest.approx(0.35) and one["sd"] is None and one["ci"] == pytest.approx([0.30, 0.39])
    assert lam0["success"]["ci"] == [0.8, 0.95] and auto["n_eval"] == [20, 21]

    md = (out / "table.md").read_text()
    assert md == report.render(table["title"], _lines(out), "md")  # the same cells as the CSV
    assert "| synthetic | resnet18 | I_FGSM_Linf_4 | +HFC M2_lam0 | 0 | 20 | 0.350 [0.300, 0.390] | 0.150 |" in md
    assert "| synthetic | resnet18 | I_FGSM_Linf_4 | +HFC M2_lamauto | 0, 1 | 20–21 | 0.310 ± 0.014 | 0.110 ± 0.014 |" \
        in md
    assert "| base | 0, 1 | 20–21 | 0.910 ± 0.014 |" in md
    assert md.strip() in printed
    rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert rows[0][:8] == ["data set", "arch", "attack", "row", "seeds", "n_eval", "KD AUC", "KD TNR@90"]
    assert rows[0][-2:] == ["mean AUC", "success"] and len(rows[0]) == 6 + 2 * 7 + 2
    assert [r[3] for r in rows[1:]] == ["base", "+HFC M2_lam0", "+HFC M2_lamauto"]
    assert rows[2][-1] == "0.900 [0.800, 0.950]" and rows[3][-1] == "0.900 ± 0.000"
    saved = json.loads((out / "table.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(table["rows"])) and len(saved["files"]) == 3


def _lines(out: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO((out / "table.csv").read_text())))


def test_tables_defaults_old_files_and_bad_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no runs_"):
        tables.main([])
    write(tmp_path, 3, "auto", 0.0, with_ci=False)  # written before the intervals: no [..] anywhere
    table = tables.main([])  # every runs_*/ in the cwd, written to tables/
    assert (tmp_path / "tables" / "table.md").is_file() and (tmp_path / "tables" / "table.json").is_file()
    assert "[" not in "".join((tmp_path / "tables" / "table.csv").read_text().splitlines()[1:])
    assert table["rows"][1]["mean_auc"]["mean"] == pytest.approx(sum(0.3 + 0.01 * i for i in range(7)) / 7)
    with pytest.raises(UserError, match="no such runs folder"):
        tables.main([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results.json under"):
        tables.main([str(tmp_path / "empty")])
    result = subprocess.run([sys.executable, str(ROOT / "tables.py"), "no/such/runs"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no/such/runs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_report_cli_labels_rows_by_the_folder_holding_the_runs(tmp_path, capsys):
    fd0 = write(tmp_path / "fd0", 0, "auto", 0.0)
    fd1 = write(tmp_path / "fd1", 1, "auto", 0.02)
    files = sorted(str(p) for root in (fd0, fd1) for p in root.rglob("results.json"))
    table = report.main(["--label", "root", *files])
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| fd")]
    assert labels == ["fd0", "fd0", "fd1", "fd1"]  # base and HFC rows of each root


def test_report_layers_shows_each_layers_auc_beside_the_combined_one(tmp_path):
    results = crafted(0, "auto", 0.0)
    results["detectors"]["MAHA"]["base"]["layer_auc"] = {"layer3": 0.93, "layer4": 0.98}
    results["detectors"]["MAHA"]["hfc"]["layer_auc"] = {"layer3": 0.17, "layer4": 0.49}
    path = tmp_path / "runs_synthetic" / "resnet18" / ATTACK / "hfc_M2_lamauto" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))
    table = report.main(["--layers", "MAHA", str(path)])
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| run | row | layer3 | layer4 | MAHA combined |"
    maha = results["detectors"]["MAHA"]
    assert lines[2].endswith(f"| 0.930 | 0.980 | {report.cell(maha['base']['auc'], maha['base']['auc_ci'])} |")
    assert lines[3].endswith(f"| 0.170 | 0.490 | {report.cell(maha['hfc']['auc'], maha['hfc']['auc_ci'])} |")
    with pytest.raises(UserError, match="no per-layer AUCs of SVM"):
        report.main(["--layers", "SVM", str(path)])


def test_report_two_sided_mean_reads_each_detector_in_its_separating_direction(tmp_path):
    results = crafted(0, "auto", 0.0)
    # HFC row: AUCs 0.30 ... 0.36, all below 0.5 -- "more typical than benign", seen from the other tail.
    path = write(tmp_path, 0, "auto", 0.0) / "resnet18" / ATTACK / "hfc_M2_lamauto" / "results.json"
    hfc_aucs = [results["detectors"][name]["hfc"]["auc"] for name in SEVEN]
    assert report.two_sided_mean_auc(results, "hfc") == pytest.approx(sum(1 - a for a in hfc_aucs) / 7)
    assert report.two_sided_mean_auc(results, "base") == pytest.approx(results["mean_auc"]["base"])  # all > 0.5
    table = report.main(["--two-sided", str(path)])
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("|")]
    assert lines[0][10] == "two-sided mean AUC" and lines[0][9] == "mean AUC"
    assert lines[3][10] == f"{sum(1 - a for a in hfc_aucs) / 7:.3f}" != lines[3][9].split(" ")[0]
    assert "two-sided" not in report.main([str(path)])
    with pytest.raises(UserError, match="--two-sided adds a column"):
        report.main(["--two-sided", "--layers", "MAHA", str(path)])
