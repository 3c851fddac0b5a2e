"""The stress test (docs/PROTOCOL.md §11): how far each ε pushes a model's features, and whether
the shift has one direction (``stress.py`` holds the measurements).

For ``--limit`` correctly classified test images (seeded), at every ε of ``--epsilons`` and every
stage-end layer, the feature-deviation attack (L∞, 10 steps of ε/5) maximises the Mahalanobis
distance of the layer's pooled feature from its class's clean statistics (the run's training
features, Ledoit–Wolf); the result is the AEs' median distance and its ratio to the 99th
percentile of the clean test images' distances. Then a targeted I_FGSM at ``--direction-eps``
gives each image's feature shift, and the mean pairwise cosine of the shifts with the same
target is the direction consistency.

    python stress_test.py --dataset APTOS -a resnet50
    python stress_test.py --side-by-side A/stress/stress.json,B/stress/stress.json,C/stress/stress.json --out DIR

Writes ``runs_<DATASET>/<run>/stress/``: ``stress.json``, ``stress.md``, ``stress.png``, and one
folder per finished piece (ε × layer, the direction attack), reused when the same settings are
asked again of the same model. ``--side-by-side`` instead reads several models' stress.json
(medical and natural) and writes ``side_by_side.json`` / ``.md`` / ``.png`` under ``--out``: the
deviation ratio per stage and ε for each, and each medical model's ratio to each natural one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import attacks
import cli
import datasets
import evaluation
import features
import plots
import runs
import saver
import stress
import utils

STAGE = "stress"


@dataclass
class Config(cli.RunConfig):
    epsilons: str = cli.flag(",".join(f"{e:g}" for e in stress.EPSILONS_256), "budgets ε in units of 1/256",
                             check=cli.number_list(lambda v: v > 0, "at least one positive ε"))
    direction_eps: float = cli.flag(1.0, "ε (×1/256) of the targeted I_FGSM whose feature shifts give the direction "
                                         "consistency", check=cli.positive)
    limit: int = cli.flag(32, "correctly classified test images attacked (seeded choice)", check=cli.at_least(2))
    batch_size: int = cli.flag(32, "attack batch size", short="-b", check=cli.at_least(1))
    side_by_side: str | None = cli.flag(None, "instead of a stress test: a comma list of stress.json files to put "
                                              "side by side (needs --out)")
    out: str | None = cli.flag(None, "folder for --side-by-side's files")

    def epsilon_values(self) -> list[float]:
        return cli.numbers(self.epsilons)


class Piece(runs.Piece):
    stage = STAGE


def main(argv=None) -> dict:
    config = Config.from_argv(argv)
    if config.side_by_side:
        return side_by_side(config)
    if config.out:
        raise utils.UserError("--out is for --side-by-side only (a stress test writes into its run's stress/)")
    return run(config)


def run(config: Config) -> dict:
    started = time.perf_counter()
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, meta = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    train_summary = utils.read_json(run_.train_summary, "training summary", run_.hint("train"))
    inputs = {"checkpoint": run_.checkpoint, "split": run_.split}
    out = run_.dir / STAGE
    layers = list(model.stage_end_layers)
    names = [model.layer_names[i] for i in layers]

    train = features.part_features(run_, model, "train", device)
    test = features.part_features(run_, model, "test", device)
    fitted: dict[int, tuple[stress.ClassStatistics, np.ndarray]] = {}

    def clean_fit(layer: int) -> tuple[stress.ClassStatistics, np.ndarray]:
        """A layer's clean class statistics and the test images' distances: fitted only for a layer
        with a piece still to make (a rerun that reuses every piece fits nothing)."""
        if layer not in fitted:
            statistics = stress.ClassStatistics.fit(train.pooled[layer], train.labels, model.num_classes)
            fitted[layer] = (statistics, statistics.distances(test.pooled[layer], test.labels))
        return fitted[layer]

    correct = np.flatnonzero(test.predictions == test.labels)
    if len(correct) < 2:
        raise utils.UserError(f"only {len(correct)} test images are classified correctly; train the model longer")
    chosen = np.sort(np.random.default_rng(config.seed).permutation(correct)[:config.limit])
    images, labels = test.images[torch.from_numpy(chosen)], test.labels[chosen]
    common = {"seed": config.seed, "images": [int(i) for i in chosen]}

    deviation: dict[str, dict[str, dict]] = {}
    pieces = [(eps, layer) for eps in config.epsilon_values() for layer in layers]
    for eps, layer in tqdm(pieces, desc="feature-deviation attack (ε × layer)"):
        name = model.layer_names[layer]
        piece = Piece(out / f"eps{eps:g}_{name}", {**common, "eps_256": eps, "layer": layer}, inputs)
        if piece.done():
            result = piece.result()
        else:
            statistics, reference = clean_fit(layer)
            adv = stress.deviation_attack(model, images, labels, statistics, layer, eps, device=device,
                                          seed=config.seed, batch_size=config.batch_size)
            adv_pooled = features.extract(model, adv, device, config.batch_size, progress=False).pooled[layer]
            adv_distances = statistics.distances(adv_pooled, labels)
            clean_distances = reference[chosen]
            linf = float((adv - images).abs().amax()) * 256

            def write(folder, adv_distances=adv_distances):
                utils.save_npz(folder / "distances.npz", adv=adv_distances, clean=clean_distances)
                return [folder / "distances.npz"]
            result = piece.write({**stress.deviation_summary(adv_distances, clean_distances, reference),
                                  "linf_256": linf}, write)
        deviation.setdefault(f"{eps:g}", {})[name] = result

    direction = direction_piece(config, model, out, common, inputs, images, labels, layers, device)
    seconds = time.perf_counter() - started
    result = {
        "dataset": run_.dataset, "arch": config.arch, "run": str(run_.dir), "natural": datasets.get(run_.dataset).natural,
        "image_size": int(images.shape[-1]), "test_accuracy": train_summary.get("test_acc"),
        "n_images": len(chosen), "n_reference": len(test), "epsilons_256": config.epsilon_values(),
        "layers": [{"index": i, "name": n, "channels": model.layer_channels[i]} for i, n in zip(layers, names)],
        "deviation": deviation, "statistics": "per-class mean and Ledoit-Wolf covariance of the training features",
        "percentile": stress.PERCENTILE, "direction_consistency": direction["consistency"],
        "direction_attack": {k: v for k, v in direction.items() if k != "consistency"},
        "seconds": round(seconds, 1)}
    write_outputs(out, result, config, inputs)
    return result


def direction_piece(config, model, out, common, inputs, images, labels, layers, device) -> dict:
    """The targeted base attack's feature shifts and their consistency per stage-end layer."""
    spec = attacks.parse_attack(f"I_FGSM_Linf_{config.direction_eps:g}")
    piece = Piece(out / f"direction_{spec.name}", {**common, "attack": spec.name}, inputs)
    if piece.done():
        return piece.result()
    targets = evaluation.choose_targets(labels, model.num_classes, config.seed)
    adv, success = attacks.run_attack(model, images, targets, spec, seed=config.seed, batch_size=config.batch_size,
                                      device=device)
    clean_pooled = features.extract(model, images, device, config.batch_size, progress=False).pooled
    adv_pooled = features.extract(model, adv, device, config.batch_size, progress=False).pooled
    consistency = {model.layer_names[i]: stress.direction_consistency(adv_pooled[i] - clean_pooled[i], targets)
                   for i in layers}

    def write(folder):
        utils.save_npz(folder / "shifts.npz", targets=targets, success=success.numpy(),
                       **{model.layer_names[i]: adv_pooled[i] - clean_pooled[i] for i in layers})
        return [folder / "shifts.npz"]
    return piece.write({"consistency": consistency, "attack": spec.name, "success": float(success.float().mean())},
                       write)


def markdown(result: dict) -> str:
    names = [layer["name"] for layer in result["layers"]]
    title = (f"**{result['dataset']} / {result['arch']}: stress test ({result['n_images']} test images, "
             f"test accuracy {result['test_accuracy']:.3f}; ratio = AEs' median Mahalanobis deviation / clean "
             f"99th percentile)**")
    lines = [title, "", "| ε (×1/256) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for eps in result["epsilons_256"]:
        row = result["deviation"][f"{eps:g}"]
        lines.append(f"| {eps:g} | " + " | ".join(f"{row[n]['ratio_to_clean_p99']:.2f}" for n in names) + " |")
    direction = result["direction_consistency"]
    lines += ["", f"Direction consistency ({result['direction_attack']['attack']}, success "
                  f"{result['direction_attack']['success']:.2f}; mean pairwise cosine of the feature shifts with "
                  "the same target): " + ", ".join(f"{n} {direction[n]:.2f}" for n in names), ""]
    return "\n".join(lines)


def write_outputs(out: Path, result: dict, config: Config, inputs: dict) -> None:
    text = markdown(result)
    utils.atomic_write_bytes(out / "stress.md", text.encode())
    plots.stress_curves(out / "stress.png", result)
    result["record"] = runs.record(STAGE, config.settings(), inputs, [out / "stress.md", out / "stress.png"],
                                   folder=out)
    utils.write_json(out / "stress.json", result)
    print(text)
    print(f"stress test: {result['seconds']:.0f} s -> {out / 'stress.json'}")


# ----------------------------------------------------------------------------- side by side

def side_by_side(config: Config) -> dict:
    """Several models' stress.json, stage by stage: the deviation ratios, and medical / natural."""
    if not config.out:
        raise utils.UserError("--side-by-side needs --out (the folder for side_by_side.json)")
    paths = [Path(p.strip()) for p in config.side_by_side.split(",") if p.strip()]
    if len(paths) < 2:
        raise utils.UserError("--side-by-side needs at least two stress.json files")
    models = []
    for path in paths:
        stress_result = utils.read_json(path, "stress test", "run stress_test.py on that model first")
        if not isinstance(stress_result, dict) or "deviation" not in stress_result:
            raise utils.UserError(f"{path} is not a stress_test.py result")
        stages = {str(k + 1): layer["name"] for k, layer in enumerate(stress_result["layers"])}
        models.append({"label": f"{stress_result['dataset']} ({stress_result['arch']})", "path": str(path),
                       "dataset": stress_result["dataset"], "natural": bool(stress_result.get("natural")),
                       "test_accuracy": stress_result.get("test_accuracy"),
                       "direction_consistency": stress_result["direction_consistency"],
                       "ratio_by_stage": {stage: {eps: row[name]["ratio_to_clean_p99"]
                                                  for eps, row in stress_result["deviation"].items()}
                                          for stage, name in stages.items()}})
    stages = sorted(set.intersection(*(set(m["ratio_by_stage"]) for m in models)), key=int)
    common_eps = sorted(set.intersection(*(set(m["ratio_by_stage"][stages[0]]) for m in models)), key=float)
    medical = [m for m in models if not m["natural"]]
    natural = [m for m in models if m["natural"]]
    ratios = {f"{m['label']} / {n['label']}": {stage: {eps: m["ratio_by_stage"][stage][eps] / n["ratio_by_stage"][stage][eps]
                                                       for eps in common_eps} for stage in stages}
              for m in medical for n in natural}
    result = {"models": models, "stages": stages, "epsilons_256": [float(e) for e in common_eps],
              "medical_over_natural": ratios}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["**Stress test side by side: median deviation / clean 99th percentile, per stage (stage-end layer)**", "",
             "| model | ε | " + " | ".join(f"stage {s}" for s in stages) + " |", "|---|---|" + "---|" * len(stages)]
    for m in models:
        for eps in common_eps:
            lines.append(f"| {m['label']} | {eps} | " + " | ".join(f"{m['ratio_by_stage'][s][eps]:.2f}" for s in stages)
                         + " |")
    if ratios:
        lines += ["", "**Medical / natural (the ratio of the two ratios)**", "",
                  "| pair | ε | " + " | ".join(f"stage {s}" for s in stages) + " |", "|---|---|" + "---|" * len(stages)]
        for pair, by_stage in ratios.items():
            for eps in common_eps:
                lines.append(f"| {pair} | {eps} | " + " | ".join(f"{by_stage[s][eps]:.2f}" for s in stages) + " |")
    text = "\n".join(lines) + "\n"
    utils.atomic_write_bytes(out / "side_by_side.md", text.encode())
    plots.stress_side_by_side(out / "side_by_side.png", result)
    utils.write_json(out / "side_by_side.json", result)
    print(text)
    return result


if __name__ == "__main__":
    utils.run_cli(main)
