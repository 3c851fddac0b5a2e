"""Fit the feature-space detectors on a base attack's AEs and report them (docs/PROTOCOL.md §6).

A = the attack set's images in their saved order, split 70/30 into A_fit and A_eval
(``evaluation.fit_eval_split``). Benign = the clean and the ``--noise`` versions of those images
(the noise set is made here for the same images when it does not exist yet); adversarial =
the successful AEs. Every detector is fitted on A_fit (plus training-set statistics) and
reported on A_eval. The fitted detectors go to ``runs_<DATASET>/<arch>/<ATTACK>/detectors/``
(no pickle) with ``summary.json``: per detector AUC, TNR@90, TNR at 95% TPR, detection
accuracy, per-layer AUCs for the per-layer detectors and seconds. Features are extracted per
set and part (A_fit / A_eval clean, noise, AEs) in A's order with batch size ``-b``.

    python extract_features.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import aesets
import attacks
import cli
import detectors
import evaluation
import features
import runs
import saver
import utils
from features import FeatureSet


@dataclass
class Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "base attack whose AEs train the detectors")
    noise: str = cli.flag("Noise_Linf_2", "benign noisy set, made here if missing")
    detectors: str = cli.flag(",".join(detectors.DETECTORS), "comma list of detectors (default: all)")
    train_limit: int = cli.flag(1000, "training images (seeded random subset) for the class statistics of KD and "
                                      "MAHA and LID's reference batch; 0 = all", check=cli.non_negative)
    batch_size: int = cli.flag(32, "forward-pass batch size", short="-b", check=cli.at_least(1))
    kd_bandwidth: float = cli.flag(1.0, "KD (and KD+BU) bandwidth", check=cli.positive)
    bu_passes: int = cli.flag(50, "BU dropout passes T", check=cli.at_least(2))
    lid_k: int = cli.flag(20, "LID nearest neighbours k", check=cli.at_least(2))
    lid_batch: int = cli.flag(100, "LID clean reference batch", check=cli.at_least(3))
    maha_magnitude: float = cli.flag(0.0005, "MAHA input pre-processing magnitude in [0,1] pixel units; 0 = off",
                                     check=cli.non_negative)
    maha_layers: str = cli.flag("stages", 'MAHA layers: "stages" (last tap of each stage), "all", or indices')
    dnn_layers: str = cli.flag("stages", 'DNN conv layers: "stages", "all", or indices')
    dnn_epochs: int = cli.flag(10, "DNN training epochs", check=cli.at_least(1))

    def detector_options(self) -> dict[str, dict]:
        return {"KD": {"bandwidth": self.kd_bandwidth},
                "BU": {"passes": self.bu_passes},
                "KD+BU": {"bandwidth": self.kd_bandwidth, "passes": self.bu_passes},
                "LID": {"k": self.lid_k, "reference_size": self.lid_batch},
                "MAHA": {"magnitude": self.maha_magnitude, "layers": self.maha_layers},
                "DNN": {"layers": self.dnn_layers, "epochs": self.dnn_epochs}}


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def training_features(model, run_: runs.Run, config: Config, device) -> FeatureSet:
    """The features of ``--train-limit`` training images (seeded), from the run's feature cache."""
    train = features.part_features(run_, model, "train", device, config.batch_size)
    return train.subset(features.seeded_subset(len(train), config.train_limit, config.seed))


def ensure_noise_set(run_: runs.Run, model, noise: str, ae: dict, config: Config, device) -> np.ndarray:
    """The noise versions of A's images; the set is made here when it is missing or was made from
    another model (stale). One that lacks some of A's images is refused, not replaced: another
    attack's A (another --limit) may rely on it."""
    folder = run_.ae_dir(noise)
    rec = runs.read_record(folder / aesets.SUMMARY_FILE)
    if rec is None or runs.stale_inputs(rec, {"checkpoint": run_.checkpoint}):
        evaluation.make_noise_set(run_, model, noise, ae["clean"], ae["labels"], ae["targets"], ae["index"],
                                  seed=config.seed, batch_size=config.batch_size, device=device,
                                  made_by="extract_features.py", extra_meta={"images_of": config.attack})
        print(f"made {noise} for the {len(ae['index'])} images of A -> {folder}")
    return evaluation.noise_versions(run_, noise, ae, hint=f"delete {folder} and run extract_features.py again (it "
                                                           "re-makes it for the images of A), or re-make the attack "
                                                           "with the same --limit")


def run(config: Config) -> dict:
    """Fit the detectors on A_fit and report them on A_eval; returns the summary."""
    names = detectors.parse_names(config.detectors)
    attack = attacks.parse_attack(config.attack)
    noise = evaluation.parse_noise(config.noise)
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, _ = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    # Check the layer choices now rather than after minutes of feature extraction.
    detectors.resolve_layers(config.maha_layers, model, len(model.layer_names))
    keep = detectors.resolve_layers(config.dnn_layers, model, len(model.layer_names), conv_only=True) \
        if "DNN" in names else []
    attack_hint = run_.hint("attack", f"--attack {attack.name}")
    ae = aesets.load_ae_set(run_.ae_dir(attack.name), hint=attack_hint)
    runs.require_fresh(run_.ae_dir(attack.name) / aesets.SUMMARY_FILE, {"checkpoint": run_.checkpoint},
                       f"AE set {attack.name}", run_.hint("attack", f"--attack {attack.name}", when="again"))
    fit_pos, eval_pos = evaluation.fit_eval_split(len(ae["index"]))
    success = ae["success"].astype(bool)
    for part, positions in (("A_fit", fit_pos), ("A_eval", eval_pos)):
        if success[positions].sum() < 2 or len(positions) < 2:
            raise utils.UserError(f"{part} holds {len(positions)} images with {int(success[positions].sum())} "
                                  f"successful AEs of {attack.name}; need at least 2 of each (attack more images)")
    started = time.perf_counter()
    noisy = ensure_noise_set(run_, model, noise.name, ae, config, device)

    timer = time.perf_counter()
    train = training_features(model, run_, config, device)

    # Each set of each part is extracted on its own, in A's order: a later stage that calls
    # features.benign_and_adv on the same images with the same batch size gets identical features.
    fit_benign, fit_adv = features.benign_and_adv(
        model, ae["clean"][fit_pos], noisy[fit_pos], ae["adv"][fit_pos], success[fit_pos], device,
        config.batch_size, keep, desc="A_fit ")
    eval_benign, eval_adv = features.benign_and_adv(
        model, ae["clean"][eval_pos], noisy[eval_pos], ae["adv"][eval_pos], success[eval_pos], device,
        config.batch_size, keep, desc="A_eval ")
    feature_seconds = time.perf_counter() - timer
    fitted = detectors.fit_all(model, train, fit_benign, fit_adv, names, config.detector_options(), config.seed)
    reports = detectors.evaluate(fitted, model, eval_benign, eval_adv, per_layer=True, progress=True)

    settings = config.settings()
    summary = {
        "dataset": run_.dataset, "arch": model.arch, "run": str(run_.dir),
        "attack": attack.name, "noise": noise.name, "seed": config.seed, "device": str(device),
        "threads": torch.get_num_threads(), "num_A": len(success),
        "A_fit": {"images": len(fit_pos), "benign": len(fit_benign), "adv": len(fit_adv)},
        "A_eval": {"images": len(eval_pos), "benign": len(eval_benign), "adv": len(eval_adv)},
        "train_images": len(train), "layer_names": list(model.layer_names),
        "detectors": {name: {**reports[name], "fit_seconds": fitted[name].fit_seconds_,
                             "seconds": fitted[name].fit_seconds_ + reports[name]["score_seconds"],
                             "settings": fitted[name].get_params()} for name in fitted},
        "feature_seconds": feature_seconds, "total_seconds": time.perf_counter() - started,
    }
    out = run_.detectors_dir(attack.name)
    with utils.replacing_dir(out) as staging:
        detectors.save_detectors(staging, fitted)
        outputs = sorted(p for p in staging.rglob("*") if p.is_file())
        summary["record"] = runs.record("detectors", settings, {
            "checkpoint": run_.checkpoint, "attack_set": run_.ae_dir(attack.name) / aesets.AE_FILE,
            "noise_set": run_.ae_dir(noise.name) / aesets.AE_FILE}, outputs, folder=staging)
        utils.write_json(staging / runs.SUMMARY, summary)
    print(f"{attack.name} on {run_.dir}: A_eval {len(eval_pos)} images -> {len(eval_benign)} benign, "
          f"{len(eval_adv)} AEs (features {feature_seconds:.0f} s)")
    for name, row in summary["detectors"].items():
        print(f"  {name:6s} AUC {row['auc']:.3f}  TNR@90 {row['tnr90']:.3f}  TNR@95TPR {row['tnr_at_tpr95']:.3f}  "
              f"acc {row['detection_acc']:.3f}  ({row['seconds']:.1f} s)")
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
