"""runs.py (layout, hints, provenance records) and cli.py (configs and their parsers)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import cli
import runs
import utils
from utils import UserError


def test_layout_and_hints_carry_every_flag_that_selects_the_run():
    run = runs.Run("aptos", "resnet50", "seed1", root="/x")
    assert run.dataset == "APTOS" and run.dir == Path("/x/runs_APTOS/seed1")
    assert run.checkpoint == run.dir / "checkpoint.pt" and run.mixtures_dir(8) == run.dir / "gmm_M8"
    assert run.hfc_dir("I_FGSM_Linf_1", "M8_lamauto") == run.dir / "I_FGSM_Linf_1" / "hfc_M8_lamauto"
    hint = run.hint("attack", "--attack PGD_Linf_4")
    assert hint == "run gen_base_adv.py -a resnet50 -n seed1 --dataset APTOS --attack PGD_Linf_4 first"
    assert runs.Run("CXR", "vgg16").hint("train") == "run train.py -a vgg16 --dataset CXR first"
    with pytest.raises(UserError, match="unknown dataset"):
        runs.Run("mnist", "resnet50")


def _stage(tmp_path: Path, settings: dict) -> tuple[Path, Path, Path]:
    source = tmp_path / "in.bin"
    if not source.exists():
        source.write_bytes(b"model weights")
    out = tmp_path / "stage"
    out.mkdir(exist_ok=True)
    (out / "a.npz").write_bytes(b"artifact")
    summary = out / "summary.json"
    utils.write_json(summary, {"record": runs.record("x", settings, {"checkpoint": source}, [out / "a.npz"])})
    return source, out, summary


def test_done_answers_from_the_record_settings_inputs_and_outputs(tmp_path):
    source, out, summary = _stage(tmp_path, {"lamda": "auto", "steps": None})
    inputs = {"checkpoint": source}
    assert runs.is_done(summary, {"lamda": "auto", "steps": None}, inputs)
    assert not runs.is_done(summary, {"lamda": "1", "steps": None}, inputs)  # other settings
    assert runs.is_done(summary, {"lamda": "1", "steps": None}, inputs, compare=["steps"])
    (out / "a.npz").write_bytes(b"changed by hand")  # an output no longer the one recorded
    assert not runs.is_done(summary, {"lamda": "auto", "steps": None}, inputs)
    source, out, summary = _stage(tmp_path, {"lamda": "auto", "steps": None})
    source.write_bytes(b"a re-trained model")  # an input re-made since
    assert not runs.is_done(summary, {"lamda": "auto", "steps": None}, inputs)
    assert runs.stale_inputs(runs.read_record(summary), inputs) == ["checkpoint"]
    with pytest.raises(UserError, match=r"stale: its checkpoint .* changed since it was made; run me again"):
        runs.require_fresh(summary, inputs, "the thing", "run me again")
    assert not runs.is_done(tmp_path / "nowhere.json", {}, inputs)


def test_a_summary_without_a_record_is_never_done_and_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text('{"made": "by an older version"}')
    assert runs.read_record(tmp_path / "summary.json") is None
    assert not runs.is_done(tmp_path / "summary.json", {}, {})
    with pytest.raises(UserError, match="no provenance record"):
        runs.require_fresh(tmp_path / "summary.json", {}, "the thing", "run me again")


def test_replacing_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    folder = tmp_path / "detectors"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with utils.replacing_dir(folder) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["detectors"]  # no staging left behind
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    with utils.replacing_dir(folder) as staging:
        (staging / "new.txt").write_text("whole")
    assert [p.name for p in folder.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["detectors"]


@dataclass
class _Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "an attack")
    steps: int | None = cli.flag(None, "steps", check=cli.at_least(1))
    rate: float = cli.flag(0.5, "a rate", check=cli.in_range(0, 1))
    quick: bool = cli.flag(False, "a switch")


def test_config_parser_is_derived_from_the_fields():
    config = _Config.from_argv(["-a", "resnet18", "--dataset", "aptos", "--attack", "bim_linf_2", "--steps", "3",
                                "--quick", "--threads", "1"])
    assert (config.arch, config.dataset, config.attack, config.steps, config.quick) == \
        ("resnet18", "APTOS", "I_FGSM_Linf_2", 3, True)  # canonical spellings
    assert _Config() == _Config.from_argv([])  # the parser's defaults are the dataclass's
    assert "threads" not in config.settings() and "device" not in config.settings()
    assert config.settings()["steps"] == 3 and config.replace(steps=4).steps == 4


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps: must be at least 1"), (["--rate", "2"], "--rate: must lie in [0, 1]"),
    (["--rate", "nan"], "--rate: expected a number"), (["--threads", "0"], "--threads: must be at least 1"),
    (["--steps", "x"], "--steps: expected int"), (["--dataset", "mnist"], "unknown dataset"),
    (["-a", "lenet"], "unknown arch"), (["--nope"], "unrecognized arguments")])
def test_a_bad_flag_is_one_line(argv, needle):
    with pytest.raises(UserError) as err:
        _Config.from_argv(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)
