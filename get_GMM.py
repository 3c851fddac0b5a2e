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

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import cli
import features
import gmm
import runs
import saver
import utils


@dataclass
class Config(cli.RunConfig):
    num_component: int = cli.flag(
        gmm.DEFAULT_NUM_COMPONENTS, "components M per mixture (the paper's README uses 64). 8 because a CPU-scale "
        "training set has a few hundred images per class, which M = 64 would split into ~5 samples per 512-d "
        "component, and because the HFC term must read every component's C×C factor at every attack step "
        "(M = 64: ~2 GB for ResNet-50, two classes). M is clamped per fit to n_samples / "
        "--min-samples-per-component, and reported", short="-y", check=cli.at_least(1))
    kind: str = cli.flag("bayesian", "bayesian: BayesianGaussianMixture (the paper); em: GaussianMixture",
                         choices=gmm.KINDS)
    max_channels: int = cli.flag(gmm.DEFAULT_MAX_CHANNELS, "fit only conv layers with at most this many channels",
                                 check=cli.at_least(1))
    reg_covar: float = cli.flag(gmm.DEFAULT_REG_COVAR, "covariance regulariser, relative to the mean per-channel "
                                "variance of each fit's features; it sets the precision in the directions a few "
                                "hundred samples do not span", check=cli.positive)
    reg_scale: str = cli.flag("mean", "what --reg-covar is relative to: mean (the mean per-channel variance, one "
                              "scalar per fit) or channel (each channel's own variance: the fit is made on "
                              "features divided by their per-channel standard deviation, so channels with a "
                              "small clean variance are not swamped by the regulariser)", choices=gmm.REG_SCALES)
    covariance: str = cli.flag("full", "each component's covariance: full (the paper's) or diag (one variance per "
                               "channel, estimated in every direction; --reg-covar then only floors the variances)",
                               choices=gmm.COVARIANCES)
    max_iter: int = cli.flag(gmm.DEFAULT_MAX_ITER, "EM / variational iterations per fit", check=cli.at_least(1))
    min_samples_per_component: int = cli.flag(gmm.DEFAULT_MIN_SAMPLES_PER_COMPONENT,
                                              "clamp M to n_samples // this per fit", check=cli.at_least(1))
    batch_size: int = cli.flag(32, "feature extraction batch", short="-b", check=cli.at_least(1))
    jobs: int | None = cli.flag(None, "parallel fits (threads, one BLAS thread each; default: the number of CPUs)",
                                check=cli.at_least(1))


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def run(config: Config) -> dict:
    """Fit the mixtures on the run's training features; returns the summary."""
    jobs = config.jobs or os.cpu_count() or 1
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, model_meta = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    layers = gmm.select_layers(model, max_channels=config.max_channels)
    if not layers:
        raise utils.UserError(f"no conv layer of {config.arch} has at most {config.max_channels} channels "
                              f"(smallest: {min(model.layer_channels[i] for i in model.conv_layers)})")
    start = time.perf_counter()
    feats = features.part_features(run_, model, "train", device, config.batch_size)
    images, labels = feats.images, torch.from_numpy(feats.labels)
    feature_seconds = time.perf_counter() - start
    mixtures = gmm.fit_mixtures(
        feats.pooled, labels.numpy(), layers, config.num_component, kind=config.kind, seed=config.seed,
        n_jobs=jobs, classes=range(model.num_classes), reg_covar=config.reg_covar, reg_scale=config.reg_scale,
        covariance=config.covariance, max_iter=config.max_iter,
        min_samples_per_component=config.min_samples_per_component, layer_names=model.layer_names,
        layer_channels=model.layer_channels, max_channels=config.max_channels)

    # The fit report and the term's scales, on held-out (validation) images.
    val_feats = features.part_features(run_, model, "val", device, config.batch_size)
    val_labels = torch.from_numpy(val_feats.labels)
    val_counts = np.bincount(val_labels.numpy(), minlength=model.num_classes)
    fallback = [c for c in mixtures.classes if val_counts[c] < features.MIN_HELDOUT_PER_CLASS]
    held_pooled, held_labels = features.heldout_pooled(val_feats.pooled, val_feats.labels, model.num_classes,
                                                       lambda: feats)
    mixtures.set_scales(gmm.term_scales(mixtures, held_pooled, held_labels),
                        {"source": "val", "val_per_class": val_counts.tolist(), "train_fallback_classes": fallback})

    folder = run_.mixtures_dir(config.num_component)
    counts = np.bincount(labels.numpy(), minlength=model.num_classes)
    stage = {"dataset": run_.dataset, "arch": model_meta["arch"], "run": str(run_.dir),
             "image_size": int(images.shape[-1]), "num_train": len(labels),
             "train_per_class": counts.tolist(), "device": str(device), "jobs": jobs,
             "feature_source": "features.part_features", "feature_seconds": round(feature_seconds, 2)}
    settings = config.settings()
    with utils.replacing_dir(folder) as staging:
        mixtures.save(staging, extra=stage)
        summary = utils.read_json(staging / runs.SUMMARY)
        summary["record"] = runs.record("mixtures", settings, {"checkpoint": run_.checkpoint},
                                        [staging / runs.MIXTURES], folder=staging)
        utils.write_json(staging / runs.SUMMARY, summary)
    bad = [f"{model.layer_names[b['layer']]}/class {b['class']}" for b in summary["not_converged"]]
    print(f"{summary['kind']} mixtures, M={config.num_component}, {len(layers)} layers × {model.num_classes} "
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
