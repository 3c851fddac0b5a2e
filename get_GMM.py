"""Fit the per-layer, per-class Gaussian mixtures that the HFC term uses (docs/PROTOCOL.md §7).

Loads ``runs_<DATASET>/<name or arch>/checkpoint.pt`` and the run's training images, extracts the
pooled hierarchical features once, and fits for every class and every conv layer with at most
``--max-channels`` channels a full-covariance Gaussian mixture (scikit-learn's
BayesianGaussianMixture as in the HFC code, or plain EM with ``--kind em``), in parallel across
fits. Then it measures the fit on held-out data: per layer and class, the median HFC term of the
run's validation images under their class's mixture (about 1 per layer for a density that fits
the class; far above 1 when it only fits its training samples). These are the term's scales
(``HFCTerm(normalise=True)``), saved with the mixtures; a class with fewer than 2 validation images
takes them from its training images (recorded). Writes
``runs_<DATASET>/<name or arch>/gmm_M<y>/mixtures.npz`` + ``summary.json``.

    python get_GMM.py -a resnet50 --dataset APTOS -y 64
    python get_GMM.py --dataset synthetic -y 2 --kind em
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import datasets
import features
import gmm
import saver
import utils

def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.stage_parser(__doc__)
    parser.add_argument("-y", "--num-component", type=int, default=gmm.DEFAULT_NUM_COMPONENTS,
                        help=f"components M per mixture (default: {gmm.DEFAULT_NUM_COMPONENTS}; the paper's README "
                             "uses 64). 8 because a CPU-scale training set has a few hundred images per "
                             "class, which M = 64 would split into ~5 samples per 512-d component, and "
                             "because the HFC term must read every component's C×C factor at every "
                             "attack step (M = 64: ~2 GB for ResNet-50, two classes). M is clamped per "
                             "fit to n_samples / --min-samples-per-component, and reported")
    parser.add_argument("--kind", choices=gmm.KINDS, default="bayesian",
                        help="bayesian: BayesianGaussianMixture (the paper); em: GaussianMixture "
                             "(default: bayesian)")
    parser.add_argument("--seed", type=int, default=0, help="mixture initialisation (default: 0)")
    parser.add_argument("--max-channels", type=int, default=gmm.DEFAULT_MAX_CHANNELS,
                        help=f"fit only conv layers with at most this many channels "
                             f"(default: {gmm.DEFAULT_MAX_CHANNELS})")
    parser.add_argument("--reg-covar", type=float, default=gmm.DEFAULT_REG_COVAR,
                        help="covariance regulariser, relative to the mean per-channel variance of each "
                             f"fit's features (default: {gmm.DEFAULT_REG_COVAR:g}); it sets the precision "
                             "in the directions a few hundred samples do not span")
    parser.add_argument("--max-iter", type=int, default=gmm.DEFAULT_MAX_ITER,
                        help=f"EM / variational iterations per fit (default: {gmm.DEFAULT_MAX_ITER})")
    parser.add_argument("--min-samples-per-component", type=int, default=gmm.DEFAULT_MIN_SAMPLES_PER_COMPONENT,
                        help="clamp M to n_samples // this per fit "
                             f"(default: {gmm.DEFAULT_MIN_SAMPLES_PER_COMPONENT})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="feature extraction batch (default: 32)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel fits (threads, one BLAS thread each; default: the number of CPUs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_component < 1 or args.batch_size < 1 or args.max_iter < 1 or args.min_samples_per_component < 1:
        raise utils.UserError("-y/--num-component, --batch-size, --max-iter and --min-samples-per-component "
                              "must be positive")
    if not args.reg_covar > 0:
        raise utils.UserError(f"--reg-covar must be positive, got {args.reg_covar}")
    jobs = args.jobs or os.cpu_count() or 1
    device = utils.prepare_runtime(args.device, args.seed, args.threads)
    run = utils.run_dir(args.dataset, args.arch, args.name)
    model, model_meta = saver.load_model(run, device, arch=args.arch)
    layers = gmm.select_layers(model, max_channels=args.max_channels)
    if not layers:
        raise utils.UserError(f"no conv layer of {args.arch} has at most {args.max_channels} channels "
                              f"(smallest: {min(model.layer_channels[i] for i in model.conv_layers)})")
    images, labels = datasets.load_part(run, "train")

    start = time.perf_counter()
    feats = features.extract(model, images, device, args.batch_size, desc="train features")
    feature_seconds = time.perf_counter() - start
    mixtures = gmm.fit_mixtures(
        feats.pooled, labels.numpy(), layers, args.num_component, kind=args.kind, seed=args.seed,
        n_jobs=jobs, classes=range(model.num_classes), reg_covar=args.reg_covar, max_iter=args.max_iter,
        min_samples_per_component=args.min_samples_per_component, layer_names=model.layer_names,
        layer_channels=model.layer_channels, max_channels=args.max_channels)

    # The fit report and the term's scales, on held-out (validation) images.
    val_images, val_labels = datasets.load_part(run, "val")
    val_feats = features.extract(model, val_images, device, args.batch_size, desc="val features")
    val_counts = np.bincount(val_labels.numpy(), minlength=model.num_classes)
    fallback = [c for c in mixtures.classes if val_counts[c] < 2]
    held_out = [c for c in mixtures.classes if c not in fallback]
    scales = gmm.term_scales(mixtures, val_feats.pooled, val_labels.numpy(), classes=held_out) if held_out else {}
    if fallback:
        scales.update(gmm.term_scales(mixtures, feats.pooled, labels.numpy(), classes=fallback))
    mixtures.set_scales(scales, {"source": "val", "val_per_class": val_counts.tolist(),
                                 "train_fallback_classes": fallback})

    folder = gmm.mixtures_folder(run, args.num_component)
    counts = np.bincount(labels.numpy(), minlength=model.num_classes)
    stage = {"dataset": utils.canonical_dataset(args.dataset), "arch": model_meta["arch"], "run": str(run),
             "image_size": int(images.shape[-1]), "num_train": len(labels),
             "train_per_class": counts.tolist(), "device": str(device), "jobs": jobs,
             "feature_source": "features.extract", "feature_seconds": round(feature_seconds, 2)}
    mixtures.save(folder, extra=stage)
    summary = {**stage, **mixtures.summary()}
    bad = [f"{model.layer_names[b['layer']]}/class {b['class']}" for b in summary["not_converged"]]
    print(f"{summary['kind']} mixtures, M={args.num_component}, {len(layers)} layers × {model.num_classes} "
          f"classes = {summary['n_fits']} fits on {len(labels)} training images "
          f"({', '.join(str(c) for c in counts)} per class)")
    print(f"  layers: {', '.join(f'{model.layer_names[i]}({model.layer_channels[i]})' for i in layers)}")
    print(f"  components clamped in {summary['n_clamped']} fits; not converged: {len(bad)}"
          + (f" ({', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''})" if bad else ""))
    print(f"  mean log-likelihood {summary['mean_avg_log_likelihood']:.2f}; features {feature_seconds:.1f} s, "
          f"fits {summary['fit_seconds']:.1f} s ({jobs} jobs) -> {folder}")
    heldout = summary["heldout_term"]
    print(f"  held-out term per layer (median over {len(val_labels)} validation images): median over layers "
          f"{heldout['median']:.3g}, max {heldout['max']:.3g} (about 1 when the mixtures fit the class)"
          + (f"; classes {fallback} had < 2 validation images: measured on training images" if fallback else ""))
    return summary


if __name__ == "__main__":
    utils.run_cli(main)
