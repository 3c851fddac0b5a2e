"""Fit the feature-space detectors on a base attack's AEs and report them (PROTOCOL section 6).

A = the attack set's images in their saved order, split 70/30 into A_fit and A_eval
(``protocol.fit_eval_split``). Benign = the clean and the ``--noise`` versions of those images
(the noise set is made here for the same images when it does not exist yet); adversarial =
the successful AEs. Every detector is fitted on A_fit (plus training-set statistics) and
reported on A_eval. The fitted detectors go to ``runs_<DATASET>/<arch>/<ATTACK>/detectors/``
(no pickle) with ``summary.json``: per detector AUC, TNR@90, TNR at 95% TPR, detection
accuracy, per-layer AUCs for the per-layer detectors and seconds. Features are extracted per
set and part (A_fit / A_eval clean, noise, AEs) in A's order with batch size ``-b``.

    python extract_features.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import aesets
import attacks
import datasets
import detectors
import features
import protocol
import saver
import utils
from features import FeatureSet


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.stage_parser(__doc__)
    parser.add_argument("--attack", default="I_FGSM_Linf_1",
                        help="base attack whose AEs train the detectors (default: I_FGSM_Linf_1)")
    parser.add_argument("--noise", default="Noise_Linf_2",
                        help="benign noisy set, made here if missing (default: Noise_Linf_2)")
    parser.add_argument("--detectors", default=",".join(detectors.DETECTORS),
                        help=f"comma list of detectors (default: all: {','.join(detectors.DETECTORS)})")
    parser.add_argument("--train-limit", type=int, default=1000,
                        help="training images (seeded random subset) for the class statistics of KD and "
                             "MAHA and LID's reference batch; 0 = all (default: 1000)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="forward-pass batch size (default: 32)")
    utils.add_runtime_flags(parser, seed_help="seed for every random choice")
    options = parser.add_argument_group("detector settings")
    options.add_argument("--kd-bandwidth", type=float, default=1.0, help="KD (and KD+BU) bandwidth (default: 1.0)")
    options.add_argument("--bu-passes", type=int, default=50, help="BU dropout passes T (default: 50)")
    options.add_argument("--lid-k", type=int, default=20, help="LID nearest neighbours k (default: 20)")
    options.add_argument("--lid-batch", type=int, default=100, help="LID clean reference batch (default: 100)")
    options.add_argument("--maha-magnitude", type=float, default=0.0005,
                         help="MAHA input pre-processing magnitude in [0,1] pixel units; 0 = off (default: 0.0005)")
    options.add_argument("--maha-layers", default="stages",
                         help='MAHA layers: "stages" (last tap of each stage), "all", or indices (default: stages)')
    options.add_argument("--dnn-layers", default="stages",
                         help='DNN conv layers: "stages", "all", or indices (default: stages)')
    options.add_argument("--dnn-epochs", type=int, default=10, help="DNN training epochs (default: 10)")
    return parser.parse_args(argv)


def detector_options(args) -> dict[str, dict]:
    return {"KD": {"bandwidth": args.kd_bandwidth},
            "BU": {"passes": args.bu_passes},
            "KD+BU": {"bandwidth": args.kd_bandwidth, "passes": args.bu_passes},
            "LID": {"k": args.lid_k, "reference_size": args.lid_batch},
            "MAHA": {"magnitude": args.maha_magnitude, "layers": args.maha_layers},
            "DNN": {"layers": args.dnn_layers, "epochs": args.dnn_epochs}}


def noise_versions(model, run, ae: dict, args, device) -> np.ndarray:
    """The ``--noise`` version of every image of A, in A's order (made and saved if missing)."""
    spec = attacks.parse_attack(args.noise)
    if spec.method != "Noise":
        raise utils.UserError(f"--noise must be a Noise_Linf_<k> set, not {args.noise!r}")
    folder = run / spec.name
    if not (folder / aesets.AE_FILE).is_file():
        adv, success = attacks.run_attack(model, torch.from_numpy(ae["clean"]), ae["targets"], spec, seed=args.seed,
                                          batch_size=args.batch_size, device=device)
        meta = {"attack": spec.name, "method": spec.method, "dataset": utils.canonical_dataset(args.dataset),
                "arch": model.arch, "run": str(run), "image_size": int(ae["clean"].shape[-1]), "seed": args.seed,
                "made_by": "extract_features.py", "images_of": args.attack}
        aesets.save_ae_set(folder, clean=ae["clean"], adv=adv, labels=ae["labels"], targets=ae["targets"],
                           success=success, index=ae["index"], eps=spec.eps, meta=meta)
        print(f"made {spec.name} for the {len(adv)} images of A -> {folder}")
    noise = aesets.load_ae_set(folder, hint=f"delete {folder} to have it re-made")
    rows = aesets.rows_of(noise, ae["index"], str(folder),
                          "delete it (it is re-made here for the same images) or re-run gen_base_adv.py with "
                          "the same --limit")
    if not np.array_equal(noise["clean"][rows], ae["clean"]):
        raise utils.UserError(f"the clean images of {folder} differ from those of the attack set; delete it")
    return noise["adv"][rows]


def training_features(model, run, args, device) -> FeatureSet:
    images, labels = datasets.load_part(run, "train")
    chosen = np.arange(len(images))
    if args.train_limit and len(images) > args.train_limit:
        chosen = np.sort(np.random.default_rng(args.seed).choice(len(images), args.train_limit, replace=False))
    return features.extract(model, images[torch.from_numpy(chosen)], device, args.batch_size,
                            labels=labels.numpy()[chosen], desc="train features")


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = detectors.parse_names(args.detectors)
    attack = attacks.parse_attack(args.attack)
    if args.batch_size < 1 or args.train_limit < 0:
        raise utils.UserError("--batch-size must be positive and --train-limit non-negative")
    device = utils.prepare_runtime(args.device, args.seed, args.threads)
    run = utils.run_dir(args.dataset, args.arch, args.name)
    model, _ = saver.load_model(run, device, arch=args.arch)
    # Check the layer choices now rather than after minutes of feature extraction.
    detectors.resolve_layers(args.maha_layers, model, len(model.layer_names))
    keep = detectors.resolve_layers(args.dnn_layers, model, len(model.layer_names), conv_only=True) \
        if "DNN" in names else []
    ae = aesets.load_ae_set(run / attack.name, hint=f"run gen_base_adv.py -a {args.arch} --dataset {args.dataset} "
                                                     f"--attack {attack.name} first")
    started = time.perf_counter()
    noisy = noise_versions(model, run, ae, args, device)

    fit_pos, eval_pos = protocol.fit_eval_split(len(ae["index"]))
    success = ae["success"].astype(bool)
    for part, positions in (("A_fit", fit_pos), ("A_eval", eval_pos)):
        if success[positions].sum() < 2 or len(positions) < 2:
            raise utils.UserError(f"{part} holds {len(positions)} images with {int(success[positions].sum())} "
                                  f"successful AEs of {attack.name}; need at least 2 of each (attack more images)")

    timer = time.perf_counter()
    train = training_features(model, run, args, device)

    # Each set of each part is extracted on its own, in A's order: a later stage that calls
    # features.benign_and_adv on the same images with the same batch size gets identical features.
    fit_benign, fit_adv = features.benign_and_adv(
        model, ae["clean"][fit_pos], noisy[fit_pos], ae["adv"][fit_pos], success[fit_pos], device,
        args.batch_size, keep, desc="A_fit ")
    eval_benign, eval_adv = features.benign_and_adv(
        model, ae["clean"][eval_pos], noisy[eval_pos], ae["adv"][eval_pos], success[eval_pos], device,
        args.batch_size, keep, desc="A_eval ")
    feature_seconds = time.perf_counter() - timer
    fitted = detectors.fit_all(model, train, fit_benign, fit_adv, names, detector_options(args), args.seed)
    out = run / attack.name / "detectors"
    detectors.save_detectors(out, fitted)
    reports = detectors.evaluate(fitted, model, eval_benign, eval_adv, per_layer=True, progress=True)

    summary = {
        "dataset": utils.canonical_dataset(args.dataset), "arch": model.arch, "run": str(run),
        "attack": attack.name, "noise": args.noise, "seed": args.seed, "device": str(device),
        "threads": torch.get_num_threads(), "num_A": len(success),
        "A_fit": {"images": len(fit_pos), "benign": len(fit_benign), "adv": len(fit_adv)},
        "A_eval": {"images": len(eval_pos), "benign": len(eval_benign), "adv": len(eval_adv)},
        "train_images": len(train), "layer_names": list(model.layer_names),
        "detectors": {name: {**reports[name], "fit_seconds": fitted[name].fit_seconds_,
                             "seconds": fitted[name].fit_seconds_ + reports[name]["score_seconds"],
                             "settings": fitted[name].get_params()} for name in fitted},
        "feature_seconds": feature_seconds, "total_seconds": time.perf_counter() - started,
    }
    utils.write_json(out / "summary.json", summary)
    print(f"{attack.name} on {run}: A_eval {len(eval_pos)} images -> {len(eval_benign)} benign, {len(eval_adv)} AEs "
          f"(features {feature_seconds:.0f} s)")
    for name, row in summary["detectors"].items():
        print(f"  {name:6s} AUC {row['auc']:.3f}  TNR@90 {row['tnr90']:.3f}  TNR@95TPR {row['tnr_at_tpr95']:.3f}  "
              f"acc {row['detection_acc']:.3f}  ({row['seconds']:.1f} s)")
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
