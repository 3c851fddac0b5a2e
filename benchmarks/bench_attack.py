"""Wall time of our I_FGSM against torchattacks' BIM on the same model, batch and steps.

Runs the two alternately (after one warm-up each) and reports the ratio of the median (and of
the fastest) times; the goal is ours <= 1.05x. Our ``run_attack`` also predicts the AEs to
report success, so the ratio against "BIM + one prediction pass" (the same outputs) is printed
too. Not part of the tests; needs ``pip install --no-deps torchattacks``.

    python benchmarks/bench_attack.py                      # resnet50, 128 px, batch 16, 10 steps
    python benchmarks/bench_attack.py --image-size 64 -b 8 --repeats 3 --device cpu
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attacks  # noqa: E402
import network  # noqa: E402
import utils  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-a", "--arch", default="resnet50", help="model architecture (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=128, help="random images of this size (default: 128)")
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--steps", type=int, default=10, help="attack steps (default: 10)")
    parser.add_argument("--eps-256", type=float, default=1.0, help="budget in units of 1/256 (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        raise utils.UserError("torchattacks is missing; pip install --no-deps torchattacks") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.get_device(args.device)
    torch.manual_seed(args.seed)
    model = network.build_model(args.arch, num_classes=2).to(device).eval()
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.randint(0, 2, (args.batch_size,))
    spec = attacks.AttackSpec("I_FGSM", args.eps_256)
    alpha = spec.eps / 5

    bim = torchattacks.BIM(model, eps=spec.eps, alpha=alpha, steps=args.steps)
    bim.set_mode_targeted_by_label(quiet=True)

    def ours():
        return attacks.run_attack(model, images, targets, spec, steps=args.steps, step_size=alpha,
                                  batch_size=args.batch_size, device=device, progress=False)

    def theirs():
        return bim(images.to(device), targets.to(device)).cpu()

    def theirs_with_prediction():
        adv = bim(images.to(device), targets.to(device))
        with torch.no_grad():
            success = model(adv).argmax(1) == targets.to(device)
        return adv.cpu(), success.cpu()

    runs = {"ours": ours, "bim": theirs, "bim+predict": theirs_with_prediction}
    times = {key: [] for key in runs}
    for fn in runs.values():  # warm-up (allocator, kernels)
        fn()
    for _ in range(args.repeats):
        for key, fn in runs.items():
            times[key].append(_timed(device, fn))
    median = {key: statistics.median(values) for key, values in times.items()}
    best = {key: min(values) for key, values in times.items()}  # least disturbed by other load
    adv_ours, _ = ours()
    same = torch.allclose(adv_ours, theirs(), atol=1e-6)
    result = {"arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "device": str(device), "threads": torch.get_num_threads(),
              "median_seconds": median, "min_seconds": best, "ratio_vs_bim": median["ours"] / median["bim"],
              "ratio_vs_bim_plus_predict": median["ours"] / median["bim+predict"],
              "min_ratio_vs_bim": best["ours"] / best["bim"], "same_aes": same}
    print(f"{args.arch} {args.image_size}px batch {args.batch_size} x {args.steps} steps on {device} "
          f"({torch.get_num_threads()} threads), median of {args.repeats} alternating runs:")
    for key, value in median.items():
        print(f"  {key:12s} {value:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in times[key])})")
    print(f"  ours / BIM           = {result['ratio_vs_bim']:.3f}x median, "
          f"{result['min_ratio_vs_bim']:.3f}x best-of (goal <= 1.05x)")
    print(f"  ours / BIM+predict   = {result['ratio_vs_bim_plus_predict']:.3f}x")
    print(f"  same AEs (atol 1e-6) = {same}")
    return result


if __name__ == "__main__":
    utils.run_cli(main)
