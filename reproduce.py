"""The main job: every stage in order, then the report.

    python reproduce.py                      # the embedded synthetic set, ResNet-50, I_FGSM_Linf_6
    python reproduce.py --dataset APTOS --data-root ../shared/data/aptos2019 --limit 200
    python reproduce.py --dataset brain3d -a r3d18   # the 3D testbed (32³ volumes), I_FGSM_Linf_4

Stages (each skipped when its artifacts in runs_<DATASET>/<arch>/ were made with the same
settings from the current versions of their inputs, as their records say; --force redoes them all): train.py -> gen_base_adv.py (the base attack) -> extract_features.py (the noise set
and the seven detectors) -> get_GMM.py -> gmm_attack.py -> the report in ``report/``: the
table (Markdown and JSON), the AUC of every detector before and after HFC, and the
feature-space picture of one layer.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import aesets
import attacks
import cli
import datasets
import evaluation
import extract_features
import features
import gen_base_adv
import get_GMM
import gmm
import gmm_attack
import plots
import report
import runs
import saver
import train
import utils


@dataclass
class Config(cli.RunConfig):
    attack: str | None = cli.flag(None, "base attack (default: the data set's: I_FGSM_Linf_1, the paper's ε, on "
                                        "APTOS and CXR; I_FGSM_Linf_6 on the synthetic set; I_FGSM_Linf_4 on brain3d)")
    data_root: str | None = cli.flag(None, "data folder (default: ./datasets/<DATASET>)")
    image_size: int | None = cli.flag(None, "image size (default: the data set's)", check=cli.at_least(datasets.MIN_IMAGE_SIZE))
    epochs: int | None = cli.flag(None, "training epochs (default: train.py's)", check=cli.at_least(1))
    max_train_per_class: int | None = cli.flag(None, "cap on training images per class", check=cli.non_negative)
    limit: int | None = cli.flag(None, "attack only the first N images of A", check=cli.at_least(4))
    num_component: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "mixture components M", short="-y",
                                  check=cli.at_least(1))
    lamda: str = cli.flag("auto", "HFC weight λ, or 'auto' (chosen on A_fit)", check=gmm_attack.lamda_value)
    step_size: float | None = cli.flag(None, "HFC step in 1/256 (default: gmm_attack.py's)", check=cli.positive)
    steps: int | None = cli.flag(None, "HFC steps (default: 2ε/α)", check=cli.at_least(1))
    force: bool = cli.flag(False, "redo every stage even if its artifacts are up to date")

    def __post_init__(self):
        super().__post_init__()
        if self.attack is None:
            try:
                self.attack = datasets.get(self.dataset).main_attack
            except utils.UserError:
                pass  # an unknown data set is reported by the run

    def stage_configs(self) -> dict[str, cli.RunConfig]:
        """The configs of the five stages, composed from this one (no argv strings)."""
        common = dict(arch=self.arch, name=self.name, dataset=self.dataset, seed=self.seed, device=self.device,
                      threads=self.threads)
        return {
            "train": train.Config(**common, data_root=self.data_root, image_size=self.image_size,
                                  epochs=self.epochs, max_train_per_class=self.max_train_per_class),
            "attack": gen_base_adv.Config(**common, attack=self.attack, limit=self.limit),
            "detectors": extract_features.Config(**common, attack=self.attack),
            "mixtures": get_GMM.Config(**common, num_component=self.num_component),
            "hfc": gmm_attack.Config(**common, attack=self.attack, num_component=self.num_component,
                                     lamda=self.lamda, step_size=self.step_size, steps=self.steps),
        }


def feature_picture(path, run_: runs.Run, attack: str, results_file, device) -> str:
    """Draw the feature-space picture of the last hierarchical layer for A_eval."""
    model, meta = saver.load_model(run_.checkpoint, device)
    hfc_set = aesets.load_ae_set(results_file.parent)
    base = aesets.load_ae_set(run_.ae_dir(attack))
    rows = aesets.rows_of(base, hfc_set["index"], "base set", evaluation.REMAKE_HINT)
    layer = len(model.layer_names) - 1
    pooled = lambda x: features.extract(model, torch.from_numpy(x), device, progress=False).pooled[layer]  # noqa: E731
    plots.feature_space(path, pooled(hfc_set["clean"]), hfc_set["labels"],
                        pooled(base["adv"][rows][base["success"][rows]]),
                        pooled(hfc_set["adv"][hfc_set["success"]]), model.layer_names[layer],
                        list(meta.get("class_names") or map(str, range(model.num_classes))))
    return model.layer_names[layer]


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


@dataclass
class Stage:
    """One stage of a run: its script's config, the summary that records it, the artifacts it reads."""
    name: str
    config: cli.RunConfig
    summary: Path
    inputs: dict
    call: Callable[[cli.RunConfig], dict]

    def is_done(self) -> bool:
        """Made with these settings from the current versions of its inputs (its record says so)."""
        return runs.is_done(self.summary, self.config.settings(), self.inputs)


def plan(config: Config, stage_overrides: dict[str, dict] | None = None,
         detector_attack: str | None = None) -> list[Stage]:
    """The stages of ``config``'s main job, in order: train, the base attack, the detectors, the
    mixtures, HFC. With ``detector_attack`` (another base attack) its AEs are made and its
    detectors fitted too, and they score the HFC row of ``config.attack`` (the papers' main table:
    every attack scored by detectors fitted on one).

    ``stage_overrides`` ({stage: {field: value}}) changes settings of the composed stage configs
    that the main job has no flag for (a grid or a test composes them this way)."""
    spec = attacks.parse_attack(config.attack)
    if spec.method == "Noise":
        raise utils.UserError(f"--attack must be an attack, not the noise set {spec.name}")
    detector = attacks.parse_attack(detector_attack or spec.name).name
    run_ = runs.Run.of(config)
    configs = config.stage_configs()
    if detector != spec.name:
        configs["detector_attack"] = configs["attack"].replace(attack=detector)
        configs["detectors"] = configs["detectors"].replace(attack=detector)
        configs["hfc"] = configs["hfc"].replace(detector=detector)
    for name, changes in (stage_overrides or {}).items():
        if name not in configs:
            raise utils.UserError(f"unknown stage {name!r}; stages: {', '.join(configs)}")
        configs[name] = configs[name].replace(**changes)
    noise = configs["detectors"].noise
    checkpoint = {"checkpoint": run_.checkpoint}

    def base_attack(name: str, attack: str) -> Stage:
        return Stage(name, configs[name], run_.ae_dir(attack) / aesets.SUMMARY_FILE,
                     {**checkpoint, "split": run_.split}, gen_base_adv.run)

    stages = [Stage("train", configs["train"], run_.train_summary, {}, train.run), base_attack("attack", spec.name)]
    if detector != spec.name:
        stages.append(base_attack("detector_attack", detector))
    stages += [
        Stage("detectors", configs["detectors"], run_.detectors_dir(detector) / runs.SUMMARY,
              {**checkpoint, "attack_set": run_.ae_dir(detector) / aesets.AE_FILE,
               "noise_set": run_.ae_dir(noise) / aesets.AE_FILE}, extract_features.run),
        Stage("mixtures", configs["mixtures"], run_.mixtures_dir(configs["mixtures"].num_component) / runs.SUMMARY,
              checkpoint, get_GMM.run),
        Stage("hfc", configs["hfc"], configs["hfc"].results_dir(run_) / runs.RESULTS,
              gmm_attack.stage_inputs(run_, spec.name, detector, noise, configs["hfc"].num_component),
              gmm_attack.run),
    ]
    return stages


def run(config: Config, stage_overrides: dict[str, dict] | None = None) -> dict:
    """Every stage whose artifacts are not up to date, then the report; returns the report summary.

    ``stage_overrides``: as for ``plan``."""
    spec = attacks.parse_attack(config.attack)
    stages = plan(config, stage_overrides)
    run_ = runs.Run.of(config)
    seconds: dict[str, float] = {}
    for stage in stages:
        if not config.force and stage.is_done():
            print(f"== {stage.name}: up to date, skipped (--force to redo)")
            continue
        print(f"== {stage.name}")
        start = time.perf_counter()
        stage.call(stage.config)
        seconds[stage.name] = time.perf_counter() - start

    hfc_dir = stages[-1].summary.parent
    results_file = hfc_dir / runs.RESULTS
    results = utils.read_json(results_file, "HFC results")
    out = run_.report_dir
    print("== report")
    plots.auc_bars(out / "auc_before_after.png", results)
    layer = feature_picture(out / "feature_space.png", run_, spec.name, results_file, utils.get_device(config.device))
    markdown = report.format_table(results, "md")
    utils.atomic_write_bytes(out / "table.md", markdown.encode())
    summary = {"results": str(results_file), "stage_seconds": seconds, "feature_space_layer": layer,
               "figures": ["auc_before_after.png", "feature_space.png"], "settings": config.settings(), **results}
    utils.write_json(out / "report.json", summary)
    print(report.format_table(results, "text"))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f" -> {out}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
