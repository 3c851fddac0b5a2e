"""The HFC attack: a base attack plus the hierarchical feature constraint, scored by the detectors.

For the evaluation part A_eval of the protocol's set A (the base attack's images, docs/PROTOCOL.md
§6), run the same engine as the base attack with the HFC term of the target class's
mixtures added (docs/PROTOCOL.md §7; CW keeps its margin loss), save the HFC AEs (checked like
every AE set), and print the paper's table: per detector AUC and TNR@90 for the base AEs and for
the HFC AEs of the same images, and both success rates. λ is the paper's 1 by default; with
``--lamda auto`` it is chosen on A_fit images only (never on the evaluation images): the largest
value (``--lamda-grid``, refined by one geometric midpoint) whose attack still succeeds on
``--min-success`` of them.

    python gmm_attack.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1 -y 2 --lamda auto

Writes ``runs_<DATASET>/<arch>/<ATTACK>/hfc_M<y>_lam<λ>/`` (with ``_a<α>_T<T>`` appended for a
step schedule other than the default, ``_last`` for ``--last-iterate``): adv.npz, summary.json,
results.json and results.md.
"""
from __future__ import annotations

import argparse
import time

import torch

import aesets
import attacks
import detectors
import gmm
import hfc
import report
import saver
import utils


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.stage_parser(__doc__)
    parser.add_argument("--attack", default="I_FGSM_Linf_1",
                        help="base attack to augment with HFC; its AE set defines A (default: I_FGSM_Linf_1)")
    parser.add_argument("--detector", default=None,
                        help="attack whose fitted detectors score the result (default: --attack)")
    parser.add_argument("--noise", default="Noise_Linf_2", help="benign noisy set (default: Noise_Linf_2)")
    parser.add_argument("-y", "--num-component", type=int, default=gmm.DEFAULT_NUM_COMPONENTS,
                        help="mixture components M: uses runs_.../gmm_M<y>/ from get_GMM.py (default: %(default)s)")
    parser.add_argument("--lamda", default="1",
                        help="weight λ of the HFC term, or 'auto' to choose it on A_fit (default: 1, the paper's)")
    parser.add_argument("--lamda-grid", default=",".join(f"{v:g}" for v in hfc.DEFAULT_LAMBDA_GRID),
                        help="candidates for --lamda auto, tried from the largest (default: %(default)s)")
    parser.add_argument("--min-success", type=float, default=hfc.DEFAULT_MIN_SUCCESS,
                        help="success on A_fit that --lamda auto requires (default: %(default)s)")
    parser.add_argument("--tune-images", type=int, default=32,
                        help="A_fit images attacked per λ candidate with --lamda auto (default: 32)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="step α in units of 1/256 (default: the paper's per data set and arch, "
                             "APTOS/ResNet-50 0.025, CXR/ResNet-50 0.01, ...; elsewhere ε/10)")
    parser.add_argument("--steps", type=int, default=None, help="number of steps T (default: 2ε/α)")
    parser.add_argument("--last-iterate", action="store_true",
                        help="return every image's last iterate, as the base attacks do (default: an image "
                             "whose last iterate misses the target keeps its latest iterate that hit it)")
    parser.add_argument("--limit", type=int, default=None, help="attack only the first N images of A_eval")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="attack batch size (default: 32)")
    utils.add_runtime_flags(parser)
    return parser.parse_args(argv)


def parse_lambda(args) -> tuple[float | None, list[float]]:
    try:
        grid = [float(v) for v in args.lamda_grid.split(",") if v.strip()]
        lam = None if args.lamda.lower() == "auto" else float(args.lamda)
    except ValueError:
        raise utils.UserError(f"--lamda takes a number or 'auto', --lamda-grid a comma list of numbers; "
                              f"got {args.lamda!r} and {args.lamda_grid!r}") from None
    if (lam is not None and lam < 0) or not grid or min(grid) < 0:
        raise utils.UserError("λ must be non-negative (and --lamda-grid non-empty)")
    return lam, grid


def main(argv=None) -> dict:
    args = parse_args(argv)
    spec = attacks.parse_attack(args.attack)
    if spec.method == "Noise":
        raise utils.UserError(f"--attack must be an attack, not the noise set {spec.name}")
    detector_attack = attacks.parse_attack(args.detector or args.attack).name
    lam, grid = parse_lambda(args)
    dataset = utils.canonical_dataset(args.dataset)
    device = utils.prepare_runtime(args.device, args.seed, args.threads)
    run = utils.run_dir(dataset, args.arch, args.name)
    model, _ = saver.load_model(run, device, arch=args.arch)
    sets = hfc.load_protocol_sets(run, spec.name, args.noise, args.arch, dataset)
    fitted = detectors.load_detectors(run / detector_attack / "detectors")
    mixtures = gmm.load_mixtures(gmm.mixtures_folder(run, args.num_component),
                                 hint=f"run get_GMM.py -a {args.arch} --dataset {dataset} -y {args.num_component} first")
    term = gmm.HFCTerm(mixtures, device=device)
    step_256, steps = hfc.hfc_schedule(dataset, args.arch, spec.eps_256, args.step_size, args.steps)
    base = sets["base"]
    eval_pos = sets["eval"][:args.limit] if args.limit else sets["eval"]
    if len(eval_pos) < 2:
        raise utils.UserError(f"A_eval holds {len(eval_pos)} images; attack more images with gen_base_adv.py")
    attack_kwargs = dict(step_size_256=step_256, steps=steps, seed=args.seed, batch_size=args.batch_size,
                         device=device, keep_successful=not args.last_iterate)
    started = time.perf_counter()

    trials = []
    if lam is None:
        tune = sets["fit"][:args.tune_images]
        print(f"choosing λ on {len(tune)} A_fit images (grid {grid}, success ≥ {args.min_success:.0%})")
        lam, trials = hfc.choose_lambda(model, term, torch.from_numpy(base["clean"][tune]),
                                        base["targets"][tune], spec, grid=grid, min_success=args.min_success,
                                        **attack_kwargs)
    tune_seconds = time.perf_counter() - started

    timer = time.perf_counter()
    clean = base["clean"][eval_pos]
    adv, success = hfc.hfc_attack(model, term, torch.from_numpy(clean), base["targets"][eval_pos], spec,
                                  lam=lam, **attack_kwargs)
    attack_seconds = time.perf_counter() - timer
    variant = hfc.variant_suffix((step_256, steps), hfc.hfc_schedule(dataset, args.arch, spec.eps_256),
                                 args.last_iterate)
    out = run / spec.name / hfc.results_folder_name(args.num_component, lam, variant)
    meta = {"attack": spec.name, "hfc": True, "dataset": dataset, "arch": args.arch, "num_component": args.num_component,
            "lamda": lam, "step_size_256": step_256, "steps": steps, "keep_successful": not args.last_iterate,
            "seed": args.seed, "images_of": "A_eval"}
    aesets.save_ae_set(out, clean=clean, adv=adv, labels=base["labels"][eval_pos], targets=base["targets"][eval_pos],
                       success=success, index=base["index"][eval_pos], eps=spec.eps, meta=meta)

    timer = time.perf_counter()
    rows = {"base": (base["adv"][eval_pos], base["success"][eval_pos]), "hfc": (adv.numpy(), success.numpy())}
    table, success_rates, adv_features = hfc.score_rows(model, fitted, clean, sets["noisy"][eval_pos], rows,
                                                       device=device, batch_size=args.batch_size)
    score_seconds = time.perf_counter() - timer
    loglik = hfc.mixture_log_likelihood(model, mixtures, rows, base["targets"][eval_pos], device,
                                        extracted=adv_features)
    results = report.results_dict(
        dataset=dataset, arch=args.arch, attack=spec.name, detector_attack=detector_attack,
        epsilon_256=spec.eps_256, n_eval=len(eval_pos), success=success_rates, detectors=table,
        lamda=lam, lamda_trials=trials, num_component=args.num_component, step_size_256=step_256, steps=steps,
        keep_successful=not args.last_iterate,
        mixture_log_likelihood=loglik, seconds={"choose_lamda": tune_seconds, "attack": attack_seconds,
                                                 "attack_per_image": attack_seconds / len(eval_pos),
                                                 "score": score_seconds})
    utils.write_json(out / "results.json", results)
    markdown = report.format_table(results, "md") + "\n" + report.format_layer_table(results, "md")
    utils.atomic_write_bytes(out / "results.md", markdown.encode())
    print(report.format_table(results, "text"))
    print(f"HFC: λ = {lam:.3g}, M = {args.num_component}, α = {step_256:g}/256, T = {steps}; "
          f"mean mixture log-likelihood of AE features: base {loglik['base']:.1f}, HFC {loglik['hfc']:.1f}; "
          f"attack {attack_seconds:.0f} s ({attack_seconds / len(eval_pos):.2f} s/image) -> {out}")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
