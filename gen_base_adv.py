"""Generate a base adversarial (or noisy) set for a trained run (docs/PROTOCOL.md §§5 and 6).

Loads ``runs_<DATASET>/<name or arch>/checkpoint.pt`` and the saved test split, keeps the
correctly classified test images in the seeded order that defines the protocol's set A, sets the
targets (binary: the other class; K classes: a seeded random other class), attacks, and writes
``runs_<DATASET>/<name or arch>/<ATTACK>/adv.npz`` + ``summary.json``.

    python gen_base_adv.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1
    python gen_base_adv.py --dataset APTOS --attack Noise_Linf_2
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import aesets
import attacks
import cli
import datasets
import evaluation
import runs
import saver
import utils


@dataclass
class Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "<ATTACK>_Linf_<k> (ε = k/256) or Noise_Linf_<k>")
    batch_size: int = cli.flag(32, "attack batch size (the AEs do not depend on it)", short="-b",
                               check=cli.at_least(1))
    limit: int | None = cli.flag(None, "attack only the first N images of A", check=cli.at_least(1))
    steps: int | None = cli.flag(None, "number of steps (default: 10; FGSM 1)", check=cli.at_least(1))
    step_size: float | None = cli.flag(None, "step size in units of 1/256 (default: ε/5; FGSM ε)",
                                       check=cli.positive)
    decay: float | None = cli.flag(None, f"momentum decay (MI_FGSM only; default {attacks.MI_DECAY}, the HFC "
                                         "code used 0.5)", check=cli.non_negative)
    kappa: float | None = cli.flag(None, f"margin κ (CW only; default {attacks.CW_KAPPA})", check=cli.non_negative)
    di_prob: float | None = cli.flag(None, f"input-diversity probability (DI_FGSM only; default {attacks.DI_PROB})",
                                     check=cli.in_range(0, 1))
    ti_kernel: int | None = cli.flag(None, f"Gaussian kernel size, odd (TI_FGSM only; default {attacks.TI_KERNEL})",
                                     check=lambda v: None if v >= 1 and v % 2 else f"must be an odd size ≥ 1, got {v}")


# Which method reads which option: any other combination is refused rather than ignored.
METHOD_OPTIONS = {"decay": ("MI_FGSM",), "kappa": ("CW",), "di_prob": ("DI_FGSM",), "ti_kernel": ("TI_FGSM",)}


@torch.no_grad()
def predict(model, images: torch.Tensor, device: torch.device, batch_size: int) -> np.ndarray:
    return np.concatenate([model(images[part].to(device)).argmax(dim=1).cpu().numpy()
                           for part in utils.batches(len(images), batch_size)])


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def attack_settings(config: Config) -> tuple[attacks.AttackSpec, dict, dict]:
    """The attack, its method options and the engine's resolved settings; a UserError for a
    setting that makes no sense for the method (checked before anything is loaded or written)."""
    spec = attacks.parse_attack(config.attack)
    options = {key: getattr(config, key) for key in METHOD_OPTIONS if getattr(config, key) is not None}
    for key in options:
        if spec.method not in METHOD_OPTIONS[key]:
            raise utils.UserError(f"--{key.replace('_', '-')} applies to {' and '.join(METHOD_OPTIONS[key])} "
                                  f"only, not {spec.name}")
    one_shot = {"FGSM": "one step of ε", "Noise": "no steps"}.get(spec.method)
    if one_shot and (config.steps is not None or config.step_size is not None):
        raise utils.UserError(f"{spec.name} takes {one_shot}: --steps and --step-size do not apply "
                              "(use I_FGSM for an iterative attack)")
    step_size = None if config.step_size is None else config.step_size / 256
    try:
        settings = attacks.resolve_settings(spec, config.steps, step_size, options)
    except ValueError as err:
        raise utils.UserError(str(err)) from None
    return spec, options, settings


def run(config: Config) -> dict:
    """Attack the correctly classified test images (the protocol's set A) and save the set."""
    spec, options, settings = attack_settings(config)
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, model_meta = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    images, labels = datasets.load_part(run_.dir, "test")

    correct = predict(model, images, device, config.batch_size) == labels.numpy()
    order = evaluation.eligible_order(correct, config.seed)
    if config.limit is not None:
        order = order[:config.limit]
    if len(order) == 0:
        raise utils.UserError(f"no correctly classified test image in {run_.dir}; is the model trained?")
    targets = evaluation.choose_targets(labels.numpy()[order], int(model_meta["num_classes"]), config.seed)
    positions = torch.from_numpy(order)
    clean = images[positions]
    if spec.method == "Noise":  # the benign noisy versions of A: made by the one producer
        summary = evaluation.make_noise_set(run_, model, spec.name, clean.numpy(), labels[positions].numpy(), targets,
                                            order, seed=config.seed, batch_size=config.batch_size, device=device,
                                            made_by="gen_base_adv.py", extra_meta={"limit": config.limit},
                                            settings=config.settings())
        print(f"{spec.name}: {summary['num_images']} images, max L∞ {summary['max_linf_256']:.3f}/256 "
              f"-> {run_.ae_dir(spec.name)}")
        return summary

    start = time.perf_counter()
    step_size = None if config.step_size is None else config.step_size / 256
    adv, success = attacks.run_attack(model, clean, targets, spec, steps=config.steps, step_size=step_size,
                                      seed=config.seed, batch_size=config.batch_size, device=device, **options)
    seconds = time.perf_counter() - start

    engine = {**settings, "step_size_256": settings["alpha"] * 256}
    meta = {"attack": spec.name, "method": spec.method, "dataset": run_.dataset,
            "arch": model_meta["arch"], "run": str(run_.dir), "image_size": int(images.shape[-1]),
            "seed": config.seed, "limit": config.limit, "batch_size": config.batch_size, "device": str(device),
            "threads": torch.get_num_threads(), "num_test": len(labels), "num_correct": int(correct.sum()),
            "clean_accuracy": float(correct.mean()), "settings": engine,
            "seconds": seconds, "seconds_per_image": seconds / len(order)}
    folder = run_.ae_dir(spec.name)
    summary = aesets.save_ae_set(folder, clean=clean, adv=adv, labels=labels[positions], targets=targets,
                                 success=success, index=order, eps=spec.eps, meta=meta,
                                 provenance=("attack", config.settings(), {"checkpoint": run_.checkpoint,
                                                                  "split": run_.split}))
    print(f"{spec.name}: {summary['num_images']} images, success {summary['success_rate']:.1%}, "
          f"max L∞ {summary['max_linf_256']:.3f}/256, mean L2 {summary['mean_l2']:.4f}, "
          f"{summary['seconds_per_image']:.3f} s/image -> {folder}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
