"""Score saved AE sets against fitted detectors, without re-attacking: the paper's table.

For every HFC set under ``runs_<DATASET>/<arch>/<ATTACK>/`` (or those named with ``--hfc``),
the base AEs of the same images and the HFC AEs are scored against the detectors fitted on
``--detector``'s AEs, with the same code path as ``gmm_attack.py``; benign = those images clean
and with ``--noise``.

    python eval.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1 --format md

Each table is also written as ``<hfc set>/eval_<DETECTOR ATTACK>.json`` (results.json schema).
"""
from __future__ import annotations

import argparse
import json

import aesets
import attacks
import detectors
import hfc
import report
import saver
import utils

FORMATS = ("text", "md", "csv", "json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.stage_parser(__doc__)
    parser.add_argument("--attack", default="I_FGSM_Linf_1", help="base attack (default: I_FGSM_Linf_1)")
    parser.add_argument("--detector", default=None, help="attack whose fitted detectors score (default: --attack)")
    parser.add_argument("--noise", default="Noise_Linf_2", help="benign noisy set (default: Noise_Linf_2)")
    parser.add_argument("--hfc", nargs="*", default=None,
                        help="HFC set folders under the attack's folder (default: every hfc_* there)")
    parser.add_argument("--format", default="text", choices=FORMATS, help="output format (default: text)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also print the AUC of each layer's score for the per-layer detectors "
                             "(KD, LID, MAHA, DNN)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="forward batch size (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    spec = attacks.parse_attack(args.attack)
    detector_attack = attacks.parse_attack(args.detector or args.attack).name
    dataset = utils.canonical_dataset(args.dataset)
    device = utils.prepare_runtime(args.device, seed=0, threads=args.threads)
    run = utils.run_dir(dataset, args.arch, args.name)
    model, _ = saver.load_model(run, device, arch=args.arch)
    sets = hfc.load_protocol_sets(run, spec.name, args.noise, args.arch, dataset)
    fitted = detectors.load_detectors(run / detector_attack / "detectors")
    folders = ([run / spec.name / name for name in args.hfc] if args.hfc is not None
               else sorted(p for p in (run / spec.name).glob("hfc_*") if p.is_dir()))
    if not folders:
        raise utils.UserError(f"no HFC set under {run / spec.name}; run gmm_attack.py -a {args.arch} "
                              f"--dataset {dataset} --attack {spec.name} first")
    base = sets["base"]
    all_results = []
    for folder in folders:
        hfc_set = aesets.load_ae_set(folder, hint=f"run gmm_attack.py --attack {spec.name} first")
        base_rows = aesets.rows_of(base, hfc_set["index"], f"base set {run / spec.name}", hfc.REMAKE_HINT)
        rows = {"base": (base["adv"][base_rows], base["success"][base_rows]),
                "hfc": (hfc_set["adv"], hfc_set["success"])}
        table, success, _ = hfc.score_rows(model, fitted, hfc_set["clean"], sets["noisy"][base_rows], rows,
                                           device=device, batch_size=args.batch_size)
        meta = hfc_set.get("meta") or {}
        results = report.results_dict(
            dataset=dataset, arch=args.arch, attack=spec.name, detector_attack=detector_attack,
            epsilon_256=spec.eps_256, n_eval=len(hfc_set["index"]), success=success, detectors=table,
            hfc_set=folder.name, lamda=meta.get("lamda"), num_component=meta.get("num_component"))
        utils.write_json(folder / f"eval_{detector_attack}.json", results)
        all_results.append(results)
        if args.format == "json":
            print(json.dumps(results, indent=2))
        else:
            print(f"[{folder}]")
            print(report.format_table(results, args.format))
            if args.per_layer:
                print(report.format_layer_table(results, args.format))
    return all_results


if __name__ == "__main__":
    utils.run_cli(main)
