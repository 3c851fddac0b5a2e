"""The main job: every stage in order, then the report.

    python reproduce.py                      # the embedded synthetic set, ResNet-50, I_FGSM_Linf_1
    python reproduce.py --dataset APTOS --data-root ../shared/data/aptos2019 --limit 200

Stages (each skipped when its artifacts are already in runs_<DATASET>/<arch>/; --force redoes
them all): train.py -> gen_base_adv.py (the base attack) -> extract_features.py (the noise set
and the seven detectors) -> get_GMM.py -> gmm_attack.py -> the report in ``report/``: the
table (Markdown and JSON), the AUC of every detector before and after HFC, and the
feature-space picture of one layer.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import aesets
import attacks
import extract_features
import features
import gen_base_adv
import get_GMM
import gmm
import gmm_attack
import hfc
import plots
import report
import saver
import train
import utils


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", help="APTOS, CXR or synthetic (default: synthetic)")
    parser.add_argument("-a", "--arch", default="resnet50", help="model architecture (default: resnet50)")
    parser.add_argument("--attack", default="I_FGSM_Linf_1", help="base attack (default: I_FGSM_Linf_1)")
    parser.add_argument("--data-root", default=None, help="data folder (default: ./datasets/<DATASET>)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the data set's)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: train.py's)")
    parser.add_argument("--max-train-per-class", type=int, default=None, help="cap on training images per class")
    parser.add_argument("--limit", type=int, default=None, help="attack only the first N images of A")
    parser.add_argument("-y", "--num-component", type=int, default=gmm.DEFAULT_NUM_COMPONENTS,
                        help="mixture components M (default: %(default)s)")
    parser.add_argument("--lamda", default="auto", help="HFC weight λ, or 'auto' (chosen on A_fit; default: auto)")
    parser.add_argument("--step-size", type=float, default=None, help="HFC step in 1/256 (default: gmm_attack.py's)")
    parser.add_argument("--steps", type=int, default=None, help="HFC steps (default: 2ε/α)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every stage (default: torch's; 1 is faster on a busy CPU)")
    parser.add_argument("--force", action="store_true", help="redo every stage even if its artifacts exist")
    return parser.parse_args(argv)


def _flags(**values) -> list[str]:
    out = []
    for key, value in values.items():
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def feature_picture(path: Path, run: Path, attack: str, results_file: Path, device) -> str:
    """Draw the feature-space picture of the last hierarchical layer for A_eval."""
    model, meta = saver.load_model(run, device)
    hfc_set = aesets.load_ae_set(results_file.parent)
    base = aesets.load_ae_set(run / attack)
    rows = aesets.rows_of(base, hfc_set["index"], "base set", hfc.REMAKE_HINT)
    layer = len(model.layer_names) - 1
    pooled = lambda x: features.extract(model, torch.from_numpy(x), device, progress=False).pooled[layer]  # noqa: E731
    plots.feature_space(path, pooled(hfc_set["clean"]), hfc_set["labels"],
                        pooled(base["adv"][rows][base["success"][rows]]),
                        pooled(hfc_set["adv"][hfc_set["success"]]), model.layer_names[layer],
                        list(meta.get("class_names") or map(str, range(model.num_classes))))
    return model.layer_names[layer]


def main(argv=None) -> dict:
    args = parse_args(argv)
    dataset = utils.canonical_dataset(args.dataset)
    spec = attacks.parse_attack(args.attack)
    run = utils.run_dir(dataset, args.arch)
    common = ["-a", args.arch, "--dataset", dataset, "--seed", str(args.seed)] + _flags(device=args.device, threads=args.threads)
    seconds: dict[str, float] = {}

    def stage(name: str, done: bool, call) -> None:
        if done and not args.force:
            print(f"== {name}: artifacts present, skipped (--force to redo)")
            return
        print(f"== {name}")
        start = time.perf_counter()
        call()
        seconds[name] = time.perf_counter() - start

    stage("train", (run / saver.CHECKPOINT_NAME).is_file(), lambda: train.main(
        common + _flags(data_root=args.data_root, image_size=args.image_size, epochs=args.epochs,
                        max_train_per_class=args.max_train_per_class)))
    stage("base attack", (run / spec.name / aesets.AE_FILE).is_file(), lambda: gen_base_adv.main(
        common + ["--attack", spec.name] + _flags(limit=args.limit)))
    stage("detectors", (run / spec.name / "detectors" / "summary.json").is_file(), lambda: extract_features.main(
        common + ["--attack", spec.name]))
    stage("mixtures", (gmm.mixtures_folder(run, args.num_component) / gmm.SUMMARY_NAME).is_file(),
          lambda: get_GMM.main(common + ["-y", str(args.num_component)]))
    default_schedule = hfc.hfc_schedule(dataset, args.arch, spec.eps_256)
    variant = hfc.variant_suffix(hfc.hfc_schedule(dataset, args.arch, spec.eps_256, args.step_size, args.steps),
                                 default_schedule)
    stage("HFC attack", hfc.find_results(run / spec.name, args.num_component, args.lamda, variant) is not None,
          lambda: gmm_attack.main(common + ["--attack", spec.name, "-y", str(args.num_component), "--lamda",
                                            args.lamda] + _flags(step_size=args.step_size, steps=args.steps)))

    results_file = hfc.find_results(run / spec.name, args.num_component, args.lamda, variant)
    results = utils.read_json(results_file, "HFC results")
    out = run / "report"
    print("== report")
    plots.auc_bars(out / "auc_before_after.png", results)
    layer = feature_picture(out / "feature_space.png", run, spec.name, results_file, utils.get_device(args.device))
    markdown = report.format_table(results, "md")
    utils.atomic_write_bytes(out / "table.md", markdown.encode())
    summary = {"results": str(results_file), "stage_seconds": seconds, "feature_space_layer": layer,
               "figures": ["auc_before_after.png", "feature_space.png"], **results}
    utils.write_json(out / "report.json", summary)
    print(report.format_table(results, "text"))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f" -> {out}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
