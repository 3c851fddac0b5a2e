"""Fault injection (issue "Nothing lost, nothing stale, never a traceback").

Every stage, called as its script is (``utils.run_cli(lambda: module.main(argv))``), meets bad flag
values, truncated and foreign artifacts, inputs re-made after its outputs, and interrupts. Each
must end with exit code 2 (130 for an interrupt) and exactly one line on stderr, and leave every
file under ``runs_*`` byte-identical (no stray temporary file or folder either). What the stages
write must be readable by group and others under umask 022.

The stages run in-process on one tiny synthetic run (``tiny_run`` + a base attack, detectors,
mixtures, an HFC set and its eval table, made once for the module); each test works on a
hard-linked copy of it (every artifact is written by rename, so a copy's writes never reach the
original).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import detectors
import eval as eval_script
import extract_features
import gen_base_adv
import get_GMM
import gmm_attack
import reproduce
from conftest import TINY_TRAIN
import saver
import train
import utils

ROOT = Path(__file__).resolve().parents[1]
ATTACK = "I_FGSM_Linf_4"
NOISE = "Noise_Linf_2"
RUN = Path("runs_synthetic") / "resnet18"
HFC = f"{ATTACK}/hfc_M2_lam0"
COMMON = ["-a", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--threads", "1"]
TRAIN_ARGS = ["--image-size", "32", "--synthetic-train", "120", "--synthetic-test", "60", "--epochs", "2",
              "-b", "32"]
FAST_DETECTORS = ["--bu-passes", "5", "--lid-k", "5", "--lid-batch", "20", "--dnn-epochs", "2",
                  "--train-limit", "60", "-b", "16", "--maha-magnitude", "0"]
STAGES = {
    "train": (train, TRAIN_ARGS),
    "train --resume": (train, TRAIN_ARGS + ["--resume"]),
    "gen_base_adv": (gen_base_adv, ["--attack", ATTACK]),
    "extract_features": (extract_features, ["--attack", ATTACK, *FAST_DETECTORS]),
    "get_GMM": (get_GMM, ["-y", "2"]),
    "gmm_attack": (gmm_attack, ["--attack", ATTACK, "-y", "2", "--lamda", "0"]),
    "eval": (eval_script, ["--attack", ATTACK]),
    "reproduce": (reproduce, ["--attack", ATTACK, "-y", "2", "--lamda", "0", "--image-size", "32", "--epochs", "2"]),
}


def reproduce_call(attack_seed: int = 0):
    """reproduce.run composed with the settings the module's fixture used (nothing to redo); the
    base attack's seed can differ (a stage override, as a grid composes them)."""
    config = reproduce.Config(arch="resnet18", attack=ATTACK, num_component=2, device="cpu", threads=1,
                              image_size=TINY_TRAIN["image_size"], epochs=TINY_TRAIN["epochs"], lamda="0")
    overrides = {"attack": {"seed": attack_seed},
                 "train": {key: TINY_TRAIN[key] for key in ("synthetic_train", "synthetic_test", "batch_size")},
                 "detectors": {"bu_passes": 5, "lid_k": 5, "lid_batch": 20, "dnn_epochs": 2, "train_limit": 60,
                               "batch_size": 16, "maha_magnitude": 0.0}}
    return lambda: reproduce.run(config, overrides)


# ----------------------------------------------------------------------------------- helpers

_DIGESTS: dict[tuple, str] = {}


def snapshot(root: Path = Path(".")) -> dict[str, str]:
    """{path relative to root: sha256} of every file under runs_*, and every folder (hidden ones too)."""
    out = {}
    for path in sorted(root.glob("runs_*/**/*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel + "/"] = "folder"
            continue
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # a write changes the mtime or the inode
        if key not in _DIGESTS:
            _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[rel] = _DIGESTS[key]
    return out


PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's "name:  40%|████      | 2/5 [...]"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def shown_lines(err: str) -> list[str]:
    """The message lines stderr leaves on a terminal: each line as its last \\r leaves it, without
    progress bars (a finished bar may stay, as in any run; it is not a message)."""
    lines = (ANSI.sub("", seg).split("\r")[-1].strip() for seg in err.split("\n"))
    return [line for line in lines if line and not PROGRESS_BAR.search(line)]


def call(capsys, main) -> tuple[int, list[str], str]:
    """Run ``main`` as a script does (``utils.run_cli``): (exit code, stderr lines shown, raw stderr)."""
    capsys.readouterr()
    code = 0
    try:
        utils.run_cli(main)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, shown_lines(err), err


def stage_main(stage: str, *extra: str):
    module, args = STAGES[stage]
    return lambda: module.main(COMMON + args + list(extra))


def assert_one_error(code, lines, err, *fragments) -> str:
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def replace_file(path: Path, data: bytes) -> None:
    """Write by unlinking first: the file is a hard link into the module's fixture."""
    path.unlink()
    path.write_bytes(data)


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).random((4, 3)))
    return buffer.getvalue()


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def foreign(kind: str, original: bytes) -> bytes:
    rng = np.random.default_rng(1)
    return {
        "truncated": lambda: original[:len(original) // 2],
        "empty": lambda: b"",
        "json list": lambda: b"[1, 2, 3]\n",
        "json number": lambda: b"7\n",
        "json object": lambda: b'{"foo": {"bar": 1}}\n',
        "npz": lambda: npz_bytes(a=rng.random((3, 4)), b=np.arange(5)),
        "npy": npy_bytes,
        "torch dict": lambda: torch_bytes({"weights": torch.zeros(3), "layers": [1, 2]}),
    }[kind]()


JSON_KINDS = ["truncated", "npz", "json list", "json number", "json object"]
NPZ_KINDS = ["truncated", "json object", "npz", "npy"]
PT_KINDS = ["truncated", "json object", "torch dict", "npz"]
KINDS = {".json": JSON_KINDS, ".npz": NPZ_KINDS, ".pt": PT_KINDS}

DET = f"{ATTACK}/detectors"
# artifact (relative to the run) -> (the script that makes it, the stages that read it)
ARTIFACTS = {
    "split.json": ("train.py", ["gen_base_adv", "extract_features", "get_GMM", "train --resume"]),
    "checkpoint.pt": ("train.py", ["gen_base_adv", "extract_features", "get_GMM", "gmm_attack", "eval",
                                   "train --resume"]),
    f"{ATTACK}/adv.npz": ("gen_base_adv.py", ["extract_features", "gmm_attack", "eval"]),
    f"{ATTACK}/summary.json": ("gen_base_adv.py", ["extract_features", "gmm_attack", "eval"]),
    # extract_features re-makes a noise set whose summary it cannot read; the others refuse
    f"{NOISE}/adv.npz": ("extract_features.py", ["extract_features", "gmm_attack", "eval"]),
    f"{NOISE}/summary.json": ("extract_features.py", ["gmm_attack", "eval"]),
    f"{DET}/detectors.json": ("extract_features.py", ["gmm_attack", "eval"]),
    f"{DET}/summary.json": ("extract_features.py", ["gmm_attack"]),
    f"{DET}/KD/settings.json": ("extract_features.py", ["gmm_attack"]),
    f"{DET}/KD/arrays.npz": ("extract_features.py", ["gmm_attack"]),
    f"{DET}/LID/arrays.npz": ("extract_features.py", ["eval"]),
    f"{DET}/MAHA/arrays.npz": ("extract_features.py", ["gmm_attack"]),
    f"{DET}/SVM/arrays.npz": ("extract_features.py", ["eval"]),
    f"{DET}/DNN/settings.json": ("extract_features.py", ["eval"]),
    f"{DET}/DNN/heads.pt": ("extract_features.py", ["gmm_attack"]),
    "gmm_M2/mixtures.npz": ("get_GMM.py", ["gmm_attack"]),
    "gmm_M2/summary.json": ("get_GMM.py", ["gmm_attack"]),
    f"{HFC}/adv.npz": ("gmm_attack.py", ["eval"]),
    f"{HFC}/summary.json": ("gmm_attack.py", ["eval"]),
}
# Every kind for an artifact's first reader; a truncated copy and one foreign file for the others
# (they share the reader).
CASES = [pytest.param(artifact, stage, kind, id=f"{artifact}-{stage}-{kind}")
         for artifact, (_, stages) in ARTIFACTS.items() for i, stage in enumerate(stages)
         for kind in KINDS[Path(artifact).suffix][:None if i == 0 else 2]]


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def made(tiny_run, tmp_path_factory) -> Path:
    """tiny_run plus every later stage's artifacts, made under umask 022."""
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(tiny_run, root / RUN)
    cwd, mask = os.getcwd(), os.umask(0o022)
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        for stage in ("gen_base_adv", "extract_features", "get_GMM", "gmm_attack", "eval"):
            stage_main(stage)()
    finally:
        os.chdir(cwd)
        os.umask(mask)
    return root


@pytest.fixture
def work(made, tmp_path, monkeypatch) -> Path:
    """A hard-linked copy of the module's runs folder; the test runs in it. Returns the run folder."""
    shutil.copytree(made / "runs_synthetic", tmp_path / "runs_synthetic", copy_function=os.link)
    monkeypatch.chdir(tmp_path)
    return tmp_path / RUN


# ----------------------------------------------------------------------------------- 1. bad flags

BAD_FLAGS = [
    ("train", ["--threads", "0"]), ("train", ["--image-size", "8"]), ("train", ["--batch-size", "0"]),
    ("train", ["--epochs", "0"]), ("train", ["--lr", "-1"]), ("train", ["--dataset", "mnist"]),
    ("train", ["--num-classes", "3"]), ("train", ["-a", "resnet7"]), ("train", ["--seed", "x"]),
    ("gen_base_adv", ["--steps", "0"]), ("gen_base_adv", ["--step-size", "-1"]),
    ("gen_base_adv", ["--attack", "FOO_Linf_1"]), ("gen_base_adv", ["--attack", "I_FGSM_Linf_0"]),
    ("gen_base_adv", ["--kappa", "1"]), ("gen_base_adv", ["--batch-size", "0"]),
    ("gen_base_adv", ["--dataset", "mnist"]), ("gen_base_adv", ["--attack", "FGSM_Linf_4", "--steps", "3"]),
    ("gen_base_adv", ["--ti-kernel", "4"]), ("gen_base_adv", ["--limit", "0"]),
    ("gen_base_adv", ["--threads", "0"]), ("gen_base_adv", ["--device", "tpu"]),
    ("extract_features", ["--detectors", "XYZ"]), ("extract_features", ["--lid-k", "1"]),
    ("extract_features", ["--noise", ATTACK]), ("extract_features", ["--attack", "FOO_Linf_1"]),
    ("extract_features", ["--maha-layers", "99"]), ("extract_features", ["--dnn-layers", "abc"]),
    ("extract_features", ["--train-limit", "-1"]), ("extract_features", ["--kd-bandwidth", "0"]),
    ("get_GMM", ["-y", "0"]), ("get_GMM", ["--kind", "kmeans"]), ("get_GMM", ["--reg-covar", "0"]),
    ("get_GMM", ["--max-channels", "1"]), ("get_GMM", ["--batch-size", "0"]), ("get_GMM", ["--jobs", "0"]),
    ("gmm_attack", ["--lamda", "lots"]), ("gmm_attack", ["--min-success", "2"]),
    ("gmm_attack", ["--attack", NOISE]), ("gmm_attack", ["--steps", "0"]), ("gmm_attack", ["--step-size", "-1"]),
    ("gmm_attack", ["--kappa", "1"]), ("gmm_attack", ["--lamda-grid", "x"]), ("gmm_attack", ["--limit", "1"]),
    ("gmm_attack", ["--term", "foo"]), ("gmm_attack", ["-y", "0"]), ("gmm_attack", ["--detector", "FOO_Linf_1"]),
    ("gmm_attack", ["--noise", ATTACK]), ("gmm_attack", ["--dataset", "mnist"]),
    ("eval", ["--format", "xml"]), ("eval", ["--attack", "FOO_Linf_1"]), ("eval", ["-b", "0"]),
    ("eval", ["--noise", ATTACK]), ("eval", ["--hfc", "hfc_nothing"]), ("eval", ["--dataset", "mnist"]),
    ("eval", ["--threads", "0"]),
    ("reproduce", ["--limit", "1"]), ("reproduce", ["--lamda", "lots"]), ("reproduce", ["--attack", NOISE]),
    ("reproduce", ["--image-size", "8"]), ("reproduce", ["--dataset", "mnist"]), ("reproduce", ["--epochs", "0"]),
    ("reproduce", ["-y", "0"]), ("reproduce", ["--attack", "FOO_Linf_1"]),
]


@pytest.mark.parametrize("stage,flags", [pytest.param(s, f, id=f"{s} {' '.join(f)}") for s, f in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_changes_nothing(work, capsys, stage, flags):
    before = snapshot()
    assert_one_error(*call(capsys, stage_main(stage, *flags)))
    assert snapshot() == before


# ----------------------------------------------------------------------------------- 2. artifacts

@pytest.mark.parametrize("artifact,stage,kind", CASES)
def test_a_truncated_or_foreign_artifact_is_one_line_naming_it(work, capsys, artifact, stage, kind):
    path = work / artifact
    replace_file(path, foreign(kind, path.read_bytes()))
    before = snapshot()
    line = assert_one_error(*call(capsys, stage_main(stage)), ARTIFACTS[artifact][0])
    assert str(RUN / artifact) in line or (artifact.endswith("summary.json") and str(path.parent.relative_to(
        work.parents[1])) in line), line
    assert re.search(r"\b(first|again)\b|re-make|re-run", line), line
    assert snapshot() == before


def test_the_real_cli_prints_one_line(work):
    """Through a real process: a bad flag, and a truncated checkpoint."""
    result = subprocess.run([sys.executable, str(ROOT / "gen_base_adv.py"), *COMMON, "--steps", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--steps" in result.stderr and "Traceback" not in result.stderr
    replace_file(work / "checkpoint.pt", (work / "checkpoint.pt").read_bytes()[:1000])
    before = snapshot()
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), *COMMON, "--attack", ATTACK],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "checkpoint.pt" in result.stderr and "train.py" in result.stderr
    assert snapshot() == before


# ----------------------------------------------------------------------------------- 3. stale inputs

def test_a_remade_base_attack_makes_the_detectors_and_hfc_stale(work, capsys):
    assert call(capsys, stage_main("gen_base_adv", "--seed", "1"))[0] == 0  # other AEs than the fixture's
    before = snapshot()
    for stage in ("gmm_attack", "eval"):
        line = assert_one_error(*call(capsys, stage_main(stage)), "stale", "extract_features.py", "again",
                                str(RUN / DET))
        assert "attack_set" in line
    assert snapshot() == before
    # reproduce.py asked for that attack (seed 1) keeps it, and redoes what was made from the old one
    summary = reproduce_call(attack_seed=1)()
    assert set(summary["stage_seconds"]) == {"detectors", "hfc"}, summary["stage_seconds"]
    assert_readable(work.parent)


def test_a_changed_checkpoint_makes_every_later_artifact_stale(work, capsys):
    state = saver.read_checkpoint(work / "checkpoint.pt")
    state["meta"]["note"] = "re-saved"  # the same weights, another file: a re-made checkpoint
    replace_file(work / "checkpoint.pt", torch_bytes(state))
    before = snapshot()
    for stage in ("extract_features", "gmm_attack", "eval"):
        assert_one_error(*call(capsys, stage_main(stage)), "stale", "checkpoint", "gen_base_adv.py", "again")
    assert snapshot() == before


# ----------------------------------------------------------------------------------- 4. interrupts

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _after(real):
    """``real``, then an interrupt (inside a stage's replacing_dir: the staging folder must go)."""
    def wrapped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt
    return wrapped


INTERRUPTS = [
    ("train", "train._train_epoch", False), ("gen_base_adv", "attacks.run_attack", False),
    ("extract_features", "detectors.fit_all", False), ("extract_features", "detectors.save_detectors", True),
    ("get_GMM", "gmm.fit_mixtures", False), ("get_GMM", "gmm.Mixtures.save", True),
    ("gmm_attack", "hfc.hfc_attack", False), ("gmm_attack", "aesets.save_ae_set", True),
    ("eval", "evaluation.score_table", False), ("reproduce", "hfc.hfc_attack", False),
]


@pytest.mark.parametrize("stage,target,after", [pytest.param(*case, id=f"{case[0]}-{case[1]}")
                                                for case in INTERRUPTS])
def test_an_interrupt_is_one_line_and_leaves_the_runs_folder_as_it_was(work, capsys, monkeypatch, stage, target,
                                                                       after):
    module_name, _, attr = target.rpartition(".")
    if "." in module_name:  # a method: module.Class.method
        module_name, cls = module_name.split(".")
        owner = getattr(__import__(module_name), cls)
    else:
        owner = __import__(module_name)
    monkeypatch.setattr(owner, attr, _after(getattr(owner, attr)) if after else _interrupt)
    if target == "detectors.save_detectors":  # the fixture's fitted detectors stand in for a new fit
        fitted = detectors.load_detectors(work / DET)
        monkeypatch.setattr(detectors, "fit_all", lambda *args, **kwargs: fitted)
    main = stage_main(stage)
    if stage == "reproduce":
        shutil.rmtree(work / HFC)  # the one stage it has to redo
        main = reproduce_call()
    before = snapshot()
    code, lines, err = call(capsys, main)
    assert code == 130 and lines == ["interrupted"] and "Traceback" not in err, err
    assert snapshot() == before


# ----------------------------------------------------------------------------------- 5. train.py

def test_train_that_fails_on_an_existing_run_keeps_it(work, capsys):
    before = snapshot()
    assert_one_error(*call(capsys, stage_main("train", "--pretrained", "no/such/weights.pth")), "no/such/weights.pth")
    assert snapshot() == before


def test_a_bad_image_fails_train_before_it_touches_the_run(tmp_path, capsys, monkeypatch):
    from test_datasets import make_cxr

    monkeypatch.chdir(tmp_path)
    data = make_cxr(tmp_path / "cxr", with_val=False)
    argv = ["-a", "resnet18", "--dataset", "CXR", "--data-root", str(data), "--image-size", "32", "--epochs", "1",
            "-b", "8", "--device", "cpu", "--threads", "1"]
    assert call(capsys, lambda: train.main(argv))[0] == 0
    assert {"split.json", "checkpoint.pt", "train_summary.json"} <= {p.name for p in (tmp_path / "runs_CXR" /
                                                                                      "resnet18").iterdir()}
    (data / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"not a jpeg at all")
    before = snapshot()
    assert_one_error(*call(capsys, lambda: train.main(argv)), "broken.jpeg")
    assert snapshot() == before


# ----------------------------------------------------------------------------------- 6. permissions

def assert_readable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        assert mode & stat.S_IRGRP and mode & stat.S_IROTH, (path, oct(mode))
        if path.is_dir():
            assert mode & stat.S_IXGRP and mode & stat.S_IXOTH, (path, oct(mode))


def test_every_artifact_is_readable_by_group_and_others(made):
    run = made / RUN
    written = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    for name in ("checkpoint.pt", f"{DET}/DNN/heads.pt", "gmm_M2/mixtures.npz", f"{HFC}/results.json",
                 f"{HFC}/eval_{ATTACK}.json", f"{NOISE}/adv.npz"):
        assert name in written
    assert_readable(made / "runs_synthetic")


def test_replacing_dir_leaves_a_readable_folder_and_no_staging(tmp_path):
    mask = os.umask(0o022)
    try:
        for round_ in range(2):  # made, then replaced
            with utils.replacing_dir(tmp_path / "out") as staging:
                (staging / "a.json").write_text(json.dumps(round_))
    finally:
        os.umask(mask)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert json.loads((tmp_path / "out" / "a.json").read_text()) == 1
