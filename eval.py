"""Score saved AE sets against fitted detectors, without re-attacking: the paper's table.

For every HFC set under ``runs_<DATASET>/<arch>/<ATTACK>/`` (or those named with ``--hfc``),
the base AEs of the same images and the HFC AEs are scored against the detectors fitted on
``--detector``'s AEs, with the same code path as ``gmm_attack.py``; benign = those images clean
and with ``--noise``.

    python eval.py -a resnet50 --dataset APTOS --attack I_FGSM_Linf_1 --format md

Each table is also written as ``<hfc set>/eval_<DETECTOR ATTACK>.json`` (results.json schema).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import aesets
import attacks
import cli
import evaluation
import report
import runs
import saver
import utils

FORMATS = ("text", "md", "csv", "json")


@dataclass
class Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "base attack")
    detector: str | None = cli.flag(None, "attack whose fitted detectors score (default: --attack)")
    noise: str = cli.flag("Noise_Linf_2", "benign noisy set")
    hfc: str | None = cli.flag(None, "comma list of HFC set folders under the attack's folder (default: every hfc_*)")
    format: str = cli.flag("text", "output format", choices=FORMATS)
    per_layer: bool = cli.flag(False, "also print the AUC of each layer's score for the per-layer detectors "
                                      "(KD, LID, MAHA, DNN)")
    batch_size: int = cli.flag(32, "forward batch size", short="-b", check=cli.at_least(1))


def main(argv=None) -> list[dict]:
    return run(Config.from_argv(argv))


def run(config: Config) -> list[dict]:
    """Score every chosen HFC set of the attack (and the base AEs of the same images)."""
    spec = attacks.parse_attack(config.attack)
    detector_attack = attacks.parse_attack(config.detector or config.attack).name
    noise = attacks.parse_attack(config.noise).name
    run_ = runs.Run.of(config)
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    model, _ = saver.load_model(run_.checkpoint, device, arch=config.arch, hint=run_.hint("train"))
    sets = evaluation.load_protocol_sets(run_, spec.name, noise)
    fitted = evaluation.load_fresh_detectors(run_, detector_attack)
    attack_dir = run_.ae_dir(spec.name)
    folders = ([attack_dir / name.strip() for name in config.hfc.split(",") if name.strip()]
               if config.hfc is not None else sorted(p for p in attack_dir.glob("hfc_*") if p.is_dir()))
    if not folders:
        raise utils.UserError(f"no HFC set under {attack_dir}; {run_.hint('hfc', f'--attack {spec.name}')}")
    base = sets["base"]
    all_results = []
    for folder in folders:
        hfc_set = aesets.load_ae_set(folder, hint=run_.hint("hfc", f"--attack {spec.name}"))
        base_rows = aesets.rows_of(base, hfc_set["index"], f"base set {attack_dir}", evaluation.REMAKE_HINT)
        rows = {"base": (base["adv"][base_rows], base["success"][base_rows]),
                "hfc": (hfc_set["adv"], hfc_set["success"])}
        scored = evaluation.score_table(model, fitted, hfc_set["clean"], sets["noisy"][base_rows], rows,
                                        device=device, batch_size=config.batch_size)
        meta = hfc_set.get("meta") or {}
        results = report.results_dict(
            dataset=run_.dataset, arch=config.arch, attack=spec.name, detector_attack=detector_attack,
            epsilon_256=spec.eps_256, n_eval=len(hfc_set["index"]), success=scored.success,
            detectors=scored.table, **scored.summary_fields(), hfc_set=folder.name, lamda=meta.get("lamda"),
            num_component=meta.get("num_component"))
        utils.write_json(folder / f"eval_{detector_attack}.json", results)
        all_results.append(results)
        if config.format == "json":
            print(json.dumps(results, indent=2))
        else:
            print(f"[{folder}]")
            print(report.format_table(results, config.format))
            if config.per_layer:
                print(report.format_layer_table(results, config.format))
    return all_results


if __name__ == "__main__":
    utils.run_cli(main)
