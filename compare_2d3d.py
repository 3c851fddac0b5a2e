"""2D against 3D at equal ε: is a 3D medical model more vulnerable than a 2D one? (TMI 2023's claim;
docs/PROTOCOL.md §11.)

The two models see the same subjects: the 3D model (``-a``, default r3d18) was trained on the
``brain3d`` volumes and the 2D model (``--arch-2d``, default resnet18) on ``brain2d``, the centre
axial slices of the same volumes (the same ``--seed``, so the same split). For ``--limit`` test
subjects that both classify correctly (seeded choice), the comparison measures

- the base attack's success over ε: a targeted I_FGSM at every ε of ``--epsilons`` (×1/256, the
  same intensity scale for a voxel and a pixel), and the smallest ε at which each model reaches
  95 % success;
- the feature deviation per stage at ``--stress-eps``: ``stress_test.py`` on each model (the median
  Mahalanobis deviation of the deviation attack's features over the clean 99th percentile, per
  stage-end layer), and the 3D / 2D ratio of the two per stage.

    python train.py -a r3d18 --dataset brain3d && python train.py -a resnet18 --dataset brain2d
    python compare_2d3d.py

Writes ``runs_brain3d/compare_2d3d.json`` (+ ``.md``, + ``.png``: success against ε, deviation
per stage). Each finished attack is a piece under ``runs_<DATASET>/<run>/compare_2d3d/`` (the
stress test's under its ``stress/``), reused when asked again with the same settings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import attacks
import cli
import datasets
import evaluation
import features
import metrics
import plots
import report
import runs
import saver
import stress_test
import utils

STAGE = "compare_2d3d"
SLICES_DATASET = "brain2d"
SUCCESS_BAR = 0.95


@dataclass
class Config(cli.RunConfig):
    arch: str = cli.flag("r3d18", "the 3D model's architecture", short="-a", check=cli._known_arch)
    dataset: str = cli.flag("brain3d", "the volumetric data set (its centre slices are brain2d)",
                            check=cli._known_dataset)
    arch_2d: str = cli.flag("resnet18", "the 2D model's architecture (trained on brain2d)", check=cli._known_arch)
    name_2d: str | None = cli.flag(None, "the 2D model's run name under runs_brain2d/ (default: its arch)")
    epsilons: str = cli.flag("0.25,0.5,1,2,4,8", "budgets ε of the success curve, in units of 1/256",
                             check=cli.number_list(lambda v: v > 0, "at least one positive ε"))
    stress_eps: float = cli.flag(1.0, "ε (×1/256) of the feature-deviation comparison", check=cli.positive)
    limit: int = cli.flag(64, "test subjects attacked (both models classify them correctly; seeded choice)",
                          check=cli.at_least(2))
    batch_size: int = cli.flag(32, "attack batch size", short="-b", check=cli.at_least(1))

    def epsilon_values(self) -> list[float]:
        return sorted(cli.numbers(self.epsilons))


class Piece(runs.Piece):
    stage = STAGE


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def run(config: Config) -> dict:
    started = time.perf_counter()
    if not datasets.get(config.dataset).volumetric:
        raise utils.UserError(f"--dataset {config.dataset} holds 2D images; compare_2d3d.py needs a volumetric set "
                              "(brain3d)")
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    sides = {"3D": runs.Run(config.dataset, config.arch, config.name),
             "2D": runs.Run(SLICES_DATASET, config.arch_2d, config.name_2d)}
    loaded = {label: saver.load_model(run_.checkpoint, device, arch=run_.arch, hint=run_.hint("train"))[0]
              for label, run_ in sides.items()}
    splits = {label: datasets.read_split(run_.dir) for label, run_ in sides.items()}
    if splits["3D"]["test"]["ids"] != splits["2D"]["test"]["ids"]:
        raise utils.UserError(f"{sides['3D'].dir} and {sides['2D'].dir} were trained on different subjects; train "
                              f"both with the same --seed and pool sizes")

    tests = {label: features.part_features(run_, loaded[label], "test", device) for label, run_ in sides.items()}
    labels = tests["3D"].labels
    both = np.flatnonzero((tests["3D"].predictions == labels) & (tests["2D"].predictions == labels))
    if len(both) < 2:
        raise utils.UserError(f"only {len(both)} test subjects are classified correctly by both models; train longer")
    chosen = np.sort(np.random.default_rng(config.seed).permutation(both)[:config.limit])
    targets = evaluation.choose_targets(labels[chosen], loaded["3D"].num_classes, config.seed)
    common = {"seed": config.seed, "subjects": [int(i) for i in chosen]}

    result_sides, flags = {}, {label: {} for label in sides}
    for label, run_ in sides.items():
        model, images = loaded[label], tests[label].images[torch.from_numpy(chosen)]
        inputs = {"checkpoint": run_.checkpoint, "split": run_.split}
        curve = {}
        for eps in tqdm(config.epsilon_values(), desc=f"{label}: I_FGSM success over ε"):
            spec = attacks.parse_attack(f"I_FGSM_Linf_{eps:g}")
            piece = Piece(run_.dir / STAGE / f"success_{spec.name}", {**common, "attack": spec.name}, inputs)
            if not piece.done():
                adv, success = attacks.run_attack(model, images, targets, spec, seed=config.seed,
                                                  batch_size=config.batch_size, device=device, progress=False)

                def write(folder, success=success):
                    utils.save_npz(folder / "success.npz", success=success.numpy(), targets=targets)
                    return [folder / "success.npz"]
                piece.write({"success": float(success.float().mean())}, write)
            flags[label][f"{eps:g}"] = utils.load_npz(piece.folder / "success.npz", "success flags")["success"]
            curve[f"{eps:g}"] = float(np.mean(flags[label][f"{eps:g}"]))
        reached = [eps for eps in config.epsilon_values() if curve[f"{eps:g}"] >= SUCCESS_BAR]
        stress = stress_test.run(stress_test.Config(
            arch=run_.arch, name=run_.name, dataset=run_.dataset, seed=config.seed, device=config.device,
            threads=config.threads, epsilons=f"{config.stress_eps:g}", limit=config.limit,
            batch_size=config.batch_size))
        row = stress["deviation"][f"{config.stress_eps:g}"]
        result_sides[label] = {
            "dataset": run_.dataset, "arch": run_.arch, "run": str(run_.dir),
            "test_accuracy": stress["test_accuracy"],
            "success_by_eps": curve, "success_ci_by_eps": {e: metrics.success_interval(f) for e, f in flags[label].items()},
            "smallest_eps_95": min(reached) if reached else None,
            "deviation_ratio_by_stage": {str(k + 1): row[layer["name"]]["ratio_to_clean_p99"]
                                         for k, layer in enumerate(stress["layers"])},
            "stage_layers": [layer["name"] for layer in stress["layers"]],
            "direction_consistency": stress["direction_consistency"]}

    stages = sorted(set(result_sides["3D"]["deviation_ratio_by_stage"]) & set(result_sides["2D"]["deviation_ratio_by_stage"]),
                    key=int)
    ratio = {s: result_sides["3D"]["deviation_ratio_by_stage"][s] / result_sides["2D"]["deviation_ratio_by_stage"][s]
             for s in stages}
    result = {"epsilons_256": config.epsilon_values(), "stress_eps_256": config.stress_eps, "n_subjects": len(chosen),
              "success_bar": SUCCESS_BAR, "sides": result_sides,
              "success_3d_minus_2d": {e: paired_difference(flags["3D"][e], flags["2D"][e]) for e in flags["3D"]},
              "deviation_3d_over_2d": ratio,
              "claim": claim(result_sides, ratio), "seconds": round(time.perf_counter() - started, 1)}
    out = sides["3D"].dir.parent
    text = markdown(result)
    utils.atomic_write_bytes(out / f"{STAGE}.md", text.encode())
    plots.compare_2d3d(out / f"{STAGE}.png", result)
    result["record"] = runs.record(STAGE, config.settings(),
                                   {f"{label}_checkpoint": run_.checkpoint for label, run_ in sides.items()},
                                   [out / f"{STAGE}.md", out / f"{STAGE}.png"], folder=out)
    utils.write_json(out / f"{STAGE}.json", result)
    print(text)
    print(f"2D vs 3D: {result['seconds']:.0f} s -> {out / (STAGE + '.json')}")
    return result


def paired_difference(success_3d: np.ndarray, success_2d: np.ndarray) -> dict:
    """3D's success minus 2D's on the same subjects, with its 95 % interval: the same bootstrap draws
    of subjects for both (by image, 1000 seeded resamples)."""
    draws = metrics.ImageBootstrap(len(success_3d))
    difference = draws.rate(np.asarray(success_3d, bool)) - draws.rate(np.asarray(success_2d, bool))
    return {"difference": float(np.mean(success_3d) - np.mean(success_2d)),
            "ci": metrics.percentile_interval(difference)}


def claim(sides: dict, ratio: dict) -> str:
    """The claim "3D is more vulnerable than 2D", as measured: by the smallest ε of 95 % success and
    by the feature deviation per stage."""
    eps3, eps2 = sides["3D"]["smallest_eps_95"], sides["2D"]["smallest_eps_95"]
    if eps3 is None and eps2 is None:
        by_eps = "neither reaches 95 % success on the ε grid"
    elif eps2 is None or (eps3 is not None and eps3 < eps2):
        by_eps = f"3D reaches 95 % success at a smaller ε ({eps3:g} against {'none' if eps2 is None else f'{eps2:g}'})"
    elif eps3 is None or eps3 > eps2:
        by_eps = f"2D reaches 95 % success at a smaller ε ({eps2:g} against {'none' if eps3 is None else f'{eps3:g}'})"
    else:
        by_eps = f"both reach 95 % success at ε = {eps3:g}"
    larger = [s for s, r in ratio.items() if r > 1]
    by_deviation = f"the 3D features deviate more than the 2D ones at {len(larger)} of {len(ratio)} stages"
    return f"{by_eps}; {by_deviation}"


def markdown(result: dict) -> str:
    sides, eps_list = result["sides"], result["epsilons_256"]
    lines = [f"**2D vs 3D on the same {result['n_subjects']} subjects: targeted I_FGSM success over ε (×1/256)**", "",
             "| model | test acc | " + " | ".join(f"ε {e:g}" for e in eps_list) + " | smallest ε for 95 % |",
             "|---|---|" + "---|" * len(eps_list) + "---|"]
    for label, side in sides.items():
        smallest = side["smallest_eps_95"]
        lines.append(f"| {label} ({side['arch']} on {side['dataset']}) | {side['test_accuracy']:.3f} | "
                     + " | ".join(report.cell(side["success_by_eps"][f"{e:g}"], side["success_ci_by_eps"][f"{e:g}"])
                                  for e in eps_list)
                     + f" | {'not reached' if smallest is None else f'{smallest:g}'} |")
    difference = result["success_3d_minus_2d"]
    lines.append("| 3D − 2D (paired) | | " + " | ".join(report.cell(difference[f"{e:g}"]["difference"],
                                                                    difference[f"{e:g}"]["ci"]) for e in eps_list)
                 + " | |")
    stages = list(result["deviation_3d_over_2d"])
    lines += ["", (f"**Feature deviation at ε = {result['stress_eps_256']:g}/256 (median Mahalanobis deviation / "
                   "clean 99th percentile, per stage)**"), "",
              "| model | " + " | ".join(f"stage {s}" for s in stages) + " |", "|---|" + "---|" * len(stages)]
    for label, side in sides.items():
        lines.append(f"| {label} | " + " | ".join(f"{side['deviation_ratio_by_stage'][s]:.2f}" for s in stages) + " |")
    lines.append("| 3D / 2D | " + " | ".join(f"{result['deviation_3d_over_2d'][s]:.2f}" for s in stages) + " |")
    lines += ["", f"Measured: {result['claim']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    utils.run_cli(main)
