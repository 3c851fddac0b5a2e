"""Generate a base adversarial (or noisy) set for a trained run (docs/PROTOCOL.md §§5 and 6).

Loads ``runs_<DATASET>/<name or arch>/checkpoint.pt`` and the saved test split, keeps the
correctly classified test images in the seeded order that defines the protocol's set A, sets the
targets (binary: the other class; K classes: a seeded random other class), attacks, and writes
``runs_<DATASET>/<name or arch>/<ATTACK>/adv.npz`` + ``summary.json``.

    python gen_base_adv.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1
    python gen_base_adv.py --dataset APTOS --attack Noise_Linf_2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import aesets
import attacks
import datasets
import protocol
import saver
import utils


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.stage_parser(__doc__)
    parser.add_argument("--data-root", default=None,
                        help="recorded only; the images come from the run's saved split")
    parser.add_argument("--attack", default="I_FGSM_Linf_1",
                        help="<ATTACK>_Linf_<k> (ε = k/256) or Noise_Linf_<k> (default: I_FGSM_Linf_1)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="attack batch size (default: 32)")
    utils.add_runtime_flags(parser, seed_help="order of A, targets, random starts")
    parser.add_argument("--limit", type=int, default=None, help="attack only the first N images of A")
    parser.add_argument("--steps", type=int, default=None, help="number of steps (default: 10; FGSM 1)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="step size in units of 1/256 (default: ε/5; FGSM ε)")
    options = parser.add_argument_group("method options (default: the method's own)")
    options.add_argument("--decay", type=float, default=None,
                         help=f"momentum decay (MI_FGSM default {attacks.MI_DECAY}; the HFC code used 0.5)")
    options.add_argument("--kappa", type=float, default=None, help=f"CW margin κ (default {attacks.CW_KAPPA})")
    options.add_argument("--di-prob", type=float, default=None,
                         help=f"input-diversity probability (DI_FGSM default {attacks.DI_PROB})")
    options.add_argument("--ti-kernel", type=int, default=None,
                         help=f"TI Gaussian kernel size (TI_FGSM default {attacks.TI_KERNEL})")
    return parser.parse_args(argv)


@torch.no_grad()
def predict(model, images: torch.Tensor, device: torch.device, batch_size: int) -> np.ndarray:
    return np.concatenate([model(images[part].to(device)).argmax(dim=1).cpu().numpy()
                           for part in utils.batches(len(images), batch_size)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    spec = attacks.parse_attack(args.attack)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise utils.UserError("--batch-size and --limit must be positive")
    options = {key: value for key, value in (("decay", args.decay), ("kappa", args.kappa),
                                             ("di_prob", args.di_prob), ("ti_kernel", args.ti_kernel))
               if value is not None}
    step_size = None if args.step_size is None else args.step_size / 256
    try:
        settings = attacks.resolve_settings(spec, args.steps, step_size, options)
    except ValueError as err:
        raise utils.UserError(str(err)) from None
    device = utils.prepare_runtime(args.device, args.seed, args.threads)
    run = utils.run_dir(args.dataset, args.arch, args.name)
    model, model_meta = saver.load_model(run, device, arch=args.arch)
    images, labels = datasets.load_part(run, "test")

    correct = predict(model, images, device, args.batch_size) == labels.numpy()
    order = protocol.eligible_order(correct, args.seed)
    if args.limit is not None:
        order = order[:args.limit]
    if len(order) == 0:
        raise utils.UserError(f"no correctly classified test image in {run}; is the model trained?")
    targets = protocol.choose_targets(labels.numpy()[order], int(model_meta["num_classes"]), args.seed)
    positions = torch.from_numpy(order)
    clean = images[positions]

    start = time.perf_counter()
    adv, success = attacks.run_attack(model, clean, targets, spec, steps=args.steps, step_size=step_size,
                                      seed=args.seed, batch_size=args.batch_size, device=device, **options)
    seconds = time.perf_counter() - start

    meta = {"attack": spec.name, "method": spec.method, "dataset": utils.canonical_dataset(args.dataset),
            "data_root": args.data_root, "arch": model_meta["arch"], "run": str(run),
            "image_size": int(images.shape[-1]), "seed": args.seed, "limit": args.limit,
            "batch_size": args.batch_size, "device": str(device), "threads": torch.get_num_threads(),
            "num_test": len(labels), "num_correct": int(correct.sum()), "clean_accuracy": float(correct.mean()),
            "settings": {**settings, "step_size_256": settings["alpha"] * 256},
            "seconds": seconds, "seconds_per_image": seconds / len(order)}
    folder = run / spec.name
    summary = aesets.save_ae_set(folder, clean=clean, adv=adv, labels=labels[positions],
                                 targets=targets, success=success, index=order, eps=spec.eps, meta=meta)
    print(f"{spec.name}: {summary['num_images']} images, success {summary['success_rate']:.1%}, "
          f"max L∞ {summary['max_linf_256']:.3f}/256, mean L2 {summary['mean_l2']:.4f}, "
          f"{summary['seconds_per_image']:.3f} s/image -> {folder}")
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
