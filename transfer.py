"""Semi-white-box transfer (docs/PROTOCOL.md §11): HFC AEs crafted on a surrogate model with the
surrogate's own mixtures, then scored on the victim, whose weights, mixtures and detectors the
attacker never sees.

The images are the victim's A_eval (its base attack's set A, the same targets); the attacker
runs on the surrogate (another seed of the same architecture, or another architecture, trained on
the same data set): the base attack itself (``base_transfer``) and HFC (``hfc_transfer``, at the
surrogate's HFC schedule, λ given or chosen on the victim's A_fit images by HFC's rule with
success judged *on the surrogate*: the attacker's only oracle). Success is counted on the victim
(the victim predicts the target); the victim's seven detectors score the AEs that succeed there,
against the victim's benign set (clean + noisy), by the one scoring path
(``evaluation.score_table``). The victim's white-box HFC row (gmm_attack.py's results folder for
the same M and λ, when it exists) is printed beside them.

    python transfer.py --dataset CXR -a resnet50 --surrogate resnet50_seed1 -y 8

Writes ``runs_<DATASET>/<victim>/<ATTACK>/transfer/<surrogate>/``: ``transfer.json``,
``transfer.md`` and one piece per row (its AEs, checked like every AE set), reused when asked again
with the same settings of the same models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import aesets
import attacks
import cli
import evaluation
import gen_base_adv
import gmm_attack
import hfc
import report
import runs
import saver
import utils

STAGE = "transfer"
ROWS = ("base_transfer", "hfc_transfer")


@dataclass
class Config(gmm_attack.TermAttackConfig):
    lamda: str = cli.flag("1", "HFC's λ on the surrogate, or 'auto' (chosen on the victim's A_fit images, success "
                               "judged on the surrogate)", check=gmm_attack.lamda_value)
    surrogate: str | None = cli.flag(None, "the surrogate run under runs_<DATASET>/ (its -n name, or its arch)")
    surrogate_arch: str | None = cli.flag(None, "the surrogate's arch (default: its checkpoint's)")
    term: str = cli.flag(gmm_attack.DEFAULT_TERM, "form of the HFC term (gmm_attack.py --term)",
                         choices=tuple(hfc.TERMS))
    limit: int | None = cli.flag(None, "attack only the first N images of A_eval", check=cli.at_least(2))
    min_scored: int = cli.flag(10, "score a row's detectors only when at least this many of its AEs fool the victim "
                                   "(an AUC over one or two AEs says nothing)", check=cli.at_least(1))
    batch_size: int = cli.flag(32, "attack batch size", short="-b", check=cli.at_least(1))


class Piece(runs.Piece):
    stage = STAGE


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def load_surrogate(config: Config, device) -> tuple[runs.Run, object, str]:
    """The surrogate's run, model and arch (read from its checkpoint unless --surrogate-arch says)."""
    if not config.surrogate:
        raise utils.UserError("--surrogate is required: the run (under runs_<DATASET>/) the AEs are crafted on")
    folder = runs.Run(config.dataset, config.arch, config.surrogate).dir
    model, meta = saver.load_model(folder / runs.CHECKPOINT, device, arch=config.surrogate_arch,
                                   hint=f"train the surrogate first: train.py -a ARCH -n {config.surrogate} "
                                        f"--dataset {config.dataset} --seed S")
    return runs.Run(config.dataset, meta["arch"], config.surrogate), model, meta["arch"]


def run(config: Config) -> dict:
    started = time.perf_counter()
    spec = attacks.parse_attack(config.attack)
    if spec.method == "Noise":
        raise utils.UserError(f"--attack must be an attack, not the noise set {spec.name}")
    noise = attacks.parse_attack(config.noise).name
    victim = runs.Run.of(config)
    if config.surrogate and runs.Run(config.dataset, config.arch, config.surrogate).dir.resolve() == victim.dir.resolve():
        raise utils.UserError("--surrogate names the victim itself; that is the white-box row (gmm_attack.py)")
    device = utils.prepare_runtime(config.device, config.seed, config.threads)
    surrogate, surrogate_model, surrogate_arch = load_surrogate(config, device)
    victim_model, _ = saver.load_model(victim.checkpoint, device, arch=config.arch, hint=victim.hint("train"))
    sets = evaluation.load_protocol_sets(victim, spec.name, noise)
    fitted = evaluation.load_fresh_detectors(victim, spec.name)
    mixtures = evaluation.load_fresh_mixtures(surrogate, config.num_component, need_scales=hfc.needs_scales(config.term))
    base = sets["base"]
    eval_pos = sets["eval"][:config.limit] if config.limit else sets["eval"]
    clean, targets = base["clean"][eval_pos], base["targets"][eval_pos]
    step_256, steps = hfc.hfc_schedule(victim.dataset, surrogate_arch, spec.eps_256)
    inputs = {"victim": victim.checkpoint, "surrogate": surrogate.checkpoint,
              "attack_set": victim.ae_dir(spec.name) / aesets.AE_FILE,
              "mixtures": surrogate.mixtures_dir(config.num_component) / runs.MIXTURES}
    out = victim.ae_dir(spec.name) / STAGE / (config.surrogate or surrogate_arch)
    common = {"seed": config.seed, "attack": spec.name, "images": [int(i) for i in base["index"][eval_pos]]}

    rows, info = {}, {}
    for row in ROWS:
        settings = dict(common, row=row)
        if row == "hfc_transfer":
            settings.update(config.lamda_search(), num_component=config.num_component, term=config.term,
                            step_size_256=step_256, steps=steps)
        piece = Piece(out / row, settings, inputs)
        if not piece.done():
            print(f"== {row} (crafted on {surrogate.dir})")
            adv, meta = craft(config, row, spec, surrogate_model, mixtures, base, eval_pos, step_256, steps, device)
            victim_success = gen_base_adv.predict(victim_model, torch.from_numpy(adv), device,
                                                  config.batch_size) == targets
            meta["victim_success"] = float(victim_success.mean())

            def write(folder, adv=adv, victim_success=victim_success, meta=meta):
                aesets.save_ae_set(folder, clean=clean, adv=adv, labels=base["labels"][eval_pos], targets=targets,
                                   success=victim_success, index=base["index"][eval_pos], eps=spec.eps,
                                   meta={**meta, "success_on": "victim"})
                return [folder / aesets.AE_FILE]
            piece.write(meta, write)
        saved = aesets.load_ae_set(piece.folder)
        rows[row] = (saved["adv"], saved["success"])
        info[row] = piece.result()

    # A row with too few AEs that fool the victim has nothing worth scoring: its detectors stay empty
    # (and its n_success says why), rather than an AUC over one image with an interval that looks tight.
    scorable = {row: value for row, value in rows.items() if int(value[1].sum()) >= config.min_scored}
    scored = evaluation.score_table(victim_model, fitted, clean, sets["noisy"][eval_pos], scorable, device=device,
                                    batch_size=config.batch_size) if scorable else None
    white_box = white_box_row(config, victim)
    table = {}
    for row in ROWS:
        entry = {"success": float(rows[row][1].mean()), "n_success": int(rows[row][1].sum()),
                 "surrogate_success": info[row]["surrogate_success"],
                 "lamda": info[row].get("lamda"), "success_ci": None, "mean_auc": None, "mean_auc_ci": None,
                 "detectors": {}}
        if row in scorable:
            entry.update(success_ci=scored.success_ci[row], mean_auc=scored.mean_auc[row],
                         mean_auc_ci=scored.mean_auc_ci[row],
                         detectors={name: {k: per_row[row][k] for k in ("auc", "tnr90", "auc_ci", "tnr90_ci")}
                                    for name, per_row in scored.table.items()})
        table[row] = entry
    result = {"dataset": victim.dataset, "victim": str(victim.dir), "victim_arch": config.arch,
              "surrogate": str(surrogate.dir), "surrogate_arch": surrogate_arch, "attack": spec.name,
              "epsilon_256": spec.eps_256, "n_eval": len(eval_pos), "num_component": config.num_component,
              "min_scored": config.min_scored,
              "rows": table,
              "white_box_hfc": white_box, "seconds": round(time.perf_counter() - started, 1)}
    text = markdown(result)
    utils.atomic_write_bytes(out / "transfer.md", text.encode())
    result["record"] = runs.record(STAGE, config.settings(), inputs, [out / "transfer.md"], folder=out)
    utils.write_json(out / "transfer.json", result)
    print(text)
    return result


def craft(config: Config, row: str, spec, model, mixtures, base, eval_pos, step_256, steps, device
          ) -> tuple[np.ndarray, dict]:
    """The row's AEs of A_eval on the surrogate, and what was used (λ, the surrogate's success)."""
    clean = torch.from_numpy(base["clean"][eval_pos])
    targets = base["targets"][eval_pos]
    if row == "base_transfer":
        adv, success = attacks.run_attack(model, clean, targets, spec, seed=config.seed,
                                          batch_size=config.batch_size, device=device)
        return adv.numpy(), {"surrogate_success": float(success.float().mean()), "lamda": None}
    term = hfc.HFCTerm(mixtures, device=device, **hfc.TERMS[config.term])
    kwargs = dict(step_size_256=step_256, steps=steps, seed=config.seed, batch_size=config.batch_size, device=device)
    trials, rule = [], "given"
    if config.lamda.lower() == "auto":
        tune = evaluation.fit_eval_split(len(base["index"]))[0][:config.tune_images]
        lam, trials, rule = hfc.choose_lambda(model, term, torch.from_numpy(base["clean"][tune]), base["targets"][tune],
                                              spec,
                                              grid=config.lamda_candidates(), min_success=config.min_success, **kwargs)
    else:
        lam = float(config.lamda)
    adv, success = hfc.hfc_attack(model, term, clean, targets, spec, lam=lam, **kwargs)
    return adv.numpy(), {"surrogate_success": float(success.float().mean()), "lamda": lam, "lamda_rule": rule,
                         "lamda_trials": trials, "step_size_256": step_256, "steps": steps}


def white_box_row(config: Config, victim: runs.Run) -> dict | None:
    """The victim's own HFC row for the same M and λ (gmm_attack.py's default folder), if made."""
    folder = gmm_attack.Config(arch=config.arch, name=config.name, dataset=config.dataset, attack=config.attack,
                               num_component=config.num_component, lamda=config.lamda,
                               term=config.term).results_dir(victim)
    if not (folder / runs.RESULTS).is_file():
        return None
    results = utils.read_json(folder / runs.RESULTS, "HFC results")
    mean, interval = report.mean_auc(results, "hfc")
    return {"results": str(folder / runs.RESULTS), "success": results["success"]["hfc"], "mean_auc": mean,
            "mean_auc_ci": interval, "n_eval": results["n_eval"], "lamda": results["lamda"]}


def markdown(result: dict) -> str:
    names = list(next((r["detectors"] for r in result["rows"].values() if r["detectors"]), {})) or ["detectors"]
    title = (f"**{result['dataset']}: AEs crafted on {result['surrogate']} ({result['surrogate_arch']}), scored on "
             f"{result['victim']} ({result['victim_arch']}); {result['attack']}, n_eval = {result['n_eval']}**")
    lines = [title, "", "| row | success on victim | on surrogate | mean AUC | " + " | ".join(names) + " |",
             "|" + "---|" * (len(names) + 4)]
    for row, r in result["rows"].items():
        unscored = f"too few to score ({r.get('n_success', 0)} of {result['n_eval']} fool the victim)"
        lines.append(f"| {row} | {report.cell(r['success'], r['success_ci'])} | {r['surrogate_success']:.3f} | "
                     f"{report.cell(r['mean_auc'], r['mean_auc_ci']) if r['detectors'] else unscored} | "
                     + " | ".join(f"{r['detectors'][n]['auc']:.3f}" if r["detectors"] else "—" for n in names) + " |")
    wb = result["white_box_hfc"]
    if wb:
        # The victim's own HFC results at the same M and λ: say on how many images and at which λ.
        lines.append(f"| white-box HFC (victim; λ {wb['lamda']:.3g}, n_eval {wb['n_eval']}) | {wb['success']:.3f} | — | {report.cell(wb['mean_auc'], wb['mean_auc_ci'])}"
                     " | " + " | ".join("" for _ in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    utils.run_cli(main)
