"""Wall time of the HFC attack against the same base attack at equal steps (issue 5, goal <= 1.15x).

The mixtures are synthetic: parameters with the shapes of a fitted model (every ResNet-50 conv
layer of <= 512 channels, M components per class, valid upper-triangular precision Cholesky
factors with distinct components) but random values, so no training data or fitting is needed;
the cost of the term does not depend on the values. Random images, random targets (both classes,
so the per-class grouping is exercised). Runs base and HFC alternately after one warm-up each and
reports the ratio of the median times, plus the parts of one step: base forward+backward,
forward_features+backward, and the HFC term's forward+backward on its own. Not part of the tests.

    python benchmarks/bench_hfc.py                       # resnet50, 128 px, batch 32, 2 steps, M = 64
    python benchmarks/bench_hfc.py --device cpu --threads 1 --clock cpu   # a shared CPU: ~2-3 min
    python benchmarks/bench_hfc.py --targets sorted      # one target class per batch
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attacks  # noqa: E402
import gmm  # noqa: E402
import hfc  # noqa: E402
import network  # noqa: E402
import utils  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-a", "--arch", default="resnet50", help="model architecture (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=128, help="random images of this size (default: 128)")
    parser.add_argument("-b", "--batch-size", type=int, default=32,
                        help="batch size (default: 32, run_attack's default)")
    parser.add_argument("--steps", type=int, default=2, help="attack steps, the same for both (default: 2)")
    parser.add_argument("-y", "--num-component", type=int, default=64, help="mixture components M (default: 64)")
    parser.add_argument("--max-channels", type=int, default=gmm.DEFAULT_MAX_CHANNELS,
                        help=f"layers kept (default: {gmm.DEFAULT_MAX_CHANNELS})")
    parser.add_argument("--attack", default="I_FGSM_Linf_1", help="base attack name (default: I_FGSM_Linf_1)")
    parser.add_argument("--targets", choices=("mixed", "sorted"), default="mixed",
                        help="mixed: both target classes in every batch; sorted: one target class per batch, "
                             "as when the images are ordered by target (default: mixed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default: 3)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared "
                             "machine (CPU device only; use with --threads 1) (default: wall)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_mixtures(model, layers: list[int], num_classes: int, num_components: int,
                       seed: int = 0) -> gmm.Mixtures:
    """Mixtures with valid shapes and random values (for timing only)."""
    rng = np.random.default_rng(seed)
    params = {}
    for layer in layers:
        C = model.layer_channels[layer]
        # One random strictly upper part per layer, a distinct positive diagonal per component.
        upper = np.triu(rng.normal(scale=0.05, size=(C, C)), 1)
        for cls in range(num_classes):
            diag = rng.uniform(0.5, 2.0, size=(num_components, C))
            prec_chol = upper[None] + diag[:, :, None] * np.eye(C)[None]
            weights = rng.dirichlet(np.ones(num_components))
            params[(layer, cls)] = gmm.MixtureParams(
                means=rng.uniform(0.0, 1.0, size=(num_components, C)), prec_chol=prec_chol,
                weights=weights, log_prior=np.log(weights), avg_log_likelihood=0.0, converged=True,
                n_iter=0, n_samples=0, reg_covar=0.0)
    return gmm.Mixtures(params, layers, list(range(num_classes)), kind="synthetic",
                        num_components=num_components, layer_names=model.layer_names,
                        layer_channels=model.layer_channels)


def _timed(device: torch.device, fn, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def _alternating(device, runs: dict, repeats: int, clock=time.perf_counter) -> dict:
    times = {key: [] for key in runs}
    for fn in runs.values():  # warm-up (allocator, kernels, the term's move to the device)
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(_timed(device, fn, clock))
    return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.get_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise utils.UserError("--clock cpu only measures CPU runs; use --clock wall on a GPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    utils.set_seed(args.seed)
    spec = attacks.parse_attack(args.attack)
    model = network.build_model(args.arch, num_classes=2).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = gmm.select_layers(model, max_channels=args.max_channels)
    start = time.perf_counter()
    mixtures = synthetic_mixtures(model, layers, 2, args.num_component, args.seed)
    term = hfc.HFCTerm(mixtures, device=device)
    build_seconds = time.perf_counter() - start
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
    targets = torch.arange(args.batch_size) % 2 if args.targets == "mixed" else torch.ones(args.batch_size, dtype=torch.long)
    x_dev, t_dev = images.to(device), targets.to(device)
    with torch.no_grad():
        _, clean_features = model.forward_features(x_dev)

    def base_step():
        x = x_dev.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x), t_dev), x)

    def features_step():
        x = x_dev.clone().requires_grad_(True)
        logits, features = model.forward_features(x)
        torch.autograd.grad(F.cross_entropy(logits, t_dev), x)

    def hfc_step():
        x = x_dev.clone().requires_grad_(True)
        logits, features = model.forward_features(x, layers=term.layers)
        torch.autograd.grad(F.cross_entropy(logits, t_dev) + term(logits, features, t_dev), x)

    def term_only():
        features = [f.clone().requires_grad_(True) for f in clean_features]
        torch.autograd.grad(term(None, features, t_dev), [features[i] for i in layers])

    part_times = _alternating(device, {"base step": base_step, "features step": features_step,
                                       "HFC step": hfc_step, "term only": term_only}, args.repeats, clock)
    parts = {key: statistics.median(values) for key, values in part_times.items()}

    def attack(extra):
        return attacks.run_attack(model, images, targets, spec, extra=extra, steps=args.steps,
                                  batch_size=args.batch_size, device=device, progress=False)

    times = _alternating(device, {"base": lambda: attack(None), "HFC": lambda: attack(term)}, args.repeats, clock)
    median = {key: statistics.median(values) for key, values in times.items()}
    ratio = median["HFC"] / median["base"]
    # On a shared CPU the fastest run is the least disturbed one: its ratio is reported too.
    ratio_min = min(times["HFC"]) / min(times["base"])
    result = {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "num_components": args.num_component, "layers": len(layers),
              "targets": args.targets, "clock": args.clock, "device": str(device), "threads": torch.get_num_threads(),
              "mixtures": "synthetic",
              "term_build_seconds": build_seconds, "step_seconds": parts, "attack_seconds": median,
              "attack_runs": times, "ratio": ratio, "ratio_of_fastest": ratio_min}
    print(f"{args.arch} {args.image_size}px batch {args.batch_size}, {args.steps} steps of {spec.name}, "
          f"M={args.num_component} on {len(layers)} layers (synthetic mixtures), {args.targets} targets, {device} "
          f"({torch.get_num_threads()} threads); term built in {build_seconds:.1f} s")
    print(f"one step ({args.clock} clock, median of {args.repeats}):")
    for key, value in parts.items():
        print(f"  {key:14s} {value * 1000:9.1f} ms   ({value / parts['base step']:.3f}x base)")
    print(f"whole attack ({args.clock} clock, median of {args.repeats} alternating runs):")
    for key, value in median.items():
        print(f"  {key:14s} {value:9.3f} s    (runs: {', '.join(f'{t:.3f}' for t in times[key])})")
    print(f"  HFC / base = {ratio:.3f}x of the medians, {ratio_min:.3f}x of the fastest runs (goal <= 1.15x)")
    return result


if __name__ == "__main__":
    utils.run_cli(main)
