"""The M and λ sweeps (docs/PROTOCOL.md §11): HFC with M mixture components per layer and class,
and HFC at every λ of a grid, on one trained model.

Each point is the main job's mixtures and HFC stages (``reproduce.plan``) with M or λ changed:
get_GMM.py ``-y M`` then gmm_attack.py ``-y M --lamda λ`` in the usual folders
(``gmm_M<y>/``, ``<ATTACK>/hfc_M<y>_lam<λ>/``), so a point already made with the same settings
from the current inputs is reused and every point is an ordinary HFC result. The model, the base
AEs and the detectors must exist (reproduce.py makes them, with any settings).

    python sweeps.py --dataset APTOS --m-values 1,2,4,8,16,64 --m-lamda 0.001 --lamda-values 0,1e-4,1e-3,1e-2,0.1,1

Writes ``runs_<DATASET>/<run>/sweeps/``: ``m_sweep.json`` and ``lambda_sweep.json`` (per point:
success, mean AUC over the seven detectors with its interval, each detector's AUC, the mean
mixture log-likelihood of the base and HFC AEs' features, seconds per image), a Markdown table
of each, and ``m_sweep.png`` / ``lambda_sweep.png``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cli
import gmm
import gmm_attack
import plots
import report
import reproduce
import runs
import utils

SWEEPS = ("m", "lambda")


@dataclass
class Config(cli.RunConfig):
    attack: str = cli.flag("I_FGSM_Linf_1", "base attack whose A_eval HFC attacks (its detectors score it)")
    sweeps: str = cli.flag("m,lambda", "which sweeps to run: m, lambda or both",
                           check=lambda t: None if t and set(t.split(",")) <= set(SWEEPS) else f"expected a comma "
                           f"list of {', '.join(SWEEPS)}")
    m_values: str = cli.flag("1,2,4,8,16,64", "M of the M sweep",
                             check=cli.number_list(lambda v: v >= 1, "at least one M ≥ 1", int))
    m_lamda: str = cli.flag("auto", "λ of every point of the M sweep, or 'auto' (each M its own, chosen on A_fit)",
                            check=gmm_attack.lamda_value)
    lamda_values: str = cli.flag("0,0.0001,0.001,0.01,0.1,1", "λ of the λ sweep",
                                 check=cli.number_list(lambda v: v >= 0, "at least one λ ≥ 0"))
    lamda_m: int = cli.flag(gmm.DEFAULT_NUM_COMPONENTS, "M of the λ sweep", check=cli.at_least(1))
    term: str = cli.flag(gmm_attack.DEFAULT_TERM, "form of the HFC term (gmm_attack.py --term)",
                         choices=tuple(gmm_attack.hfc.TERMS))
    class_loss: str = cli.flag(gmm_attack.DEFAULT_CLASS_LOSS, "gmm_attack.py --class-loss",
                               choices=gmm_attack.hfc.CLASS_LOSSES)
    limit: int | None = cli.flag(None, "attack only the first N images of A_eval", check=cli.at_least(2))

    def sweep_list(self) -> list[str]:
        return [s for s in SWEEPS if s in self.sweeps.split(",")]


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def point_stages(config: Config, num_component: int, lamda: str) -> list[reproduce.Stage]:
    """The main job's stages for one point; only the last two (mixtures, HFC) may be run here."""
    main_job = reproduce.Config(arch=config.arch, name=config.name, dataset=config.dataset, seed=config.seed,
                                device=config.device, threads=config.threads, attack=config.attack,
                                num_component=num_component, lamda=lamda)
    overrides = {"hfc": {"term": config.term, "class_loss": config.class_loss, "limit": config.limit}}
    return reproduce.plan(main_job, overrides)


# Which stage makes each input of the HFC stage that a sweep does not make itself.
MADE_BY = {"checkpoint": "train", "attack_set": "attack", "noise_set": "noise", "detectors": "detectors"}


def check_inputs(config: Config) -> None:
    """The model, the base AEs, the noise set and the detectors the HFC stage reads (its inputs in
    ``reproduce.plan``) must exist: one line naming the stage that makes the first one missing."""
    run_ = runs.Run.of(config)
    inputs = point_stages(config, config.lamda_m, "0")[-1].inputs
    for role, stage in MADE_BY.items():
        if not Path(inputs[role]).is_file():
            extra = f"--attack {config.attack}" if stage in ("attack", "detectors") else ""
            raise utils.UserError(f"missing {inputs[role]}; {run_.hint(stage, extra)} (or reproduce.py)")


def run_point(config: Config, num_component: int, lamda: str) -> dict:
    stages = point_stages(config, num_component, lamda)
    for stage in stages[-2:]:
        if stage.is_done():
            print(f"== {stage.name} (M = {num_component}, λ = {lamda}): up to date, reused")
        else:
            print(f"== {stage.name} (M = {num_component}, λ = {lamda})")
            stage.call(stage.config)
    results_file = stages[-1].summary
    return point_summary(utils.read_json(results_file, "HFC results"), results_file)


def point_summary(results: dict, results_file: Path) -> dict:
    mean, interval = report.mean_auc(results, "hfc")
    base_mean, _ = report.mean_auc(results, "base")
    seconds = results["seconds"]
    return {"num_component": results["num_component"], "lamda": results["lamda"], "lamda_rule": results["lamda_rule"],
            "success": results["success"]["hfc"], "success_ci": (results.get("success_ci") or {}).get("hfc"),
            "mean_auc": mean, "mean_auc_ci": interval, "base_mean_auc": base_mean,
            "auc": {name: row["hfc"]["auc"] for name, row in results["detectors"].items()},
            "mixture_log_likelihood": results["mixture_log_likelihood"],
            "seconds_per_image": seconds["attack_per_image"], "choose_lamda_seconds": seconds["choose_lamda"],
            "results": str(results_file)}


def markdown(title: str, points: list[dict], key: str) -> str:
    """The sweep as a table: one row per point (M sweep: M and the λ each point used)."""
    names = list(points[0]["auc"]) if points else []
    first = ["M", "λ"] if key == "M" else ["λ"]
    header = first + ["success", "mean AUC [95% CI]", *names, "log-lik. HFC AEs", "s/image"]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        cells = ([f"{p['num_component']:d}", f"{p['lamda']:.3g}"] if key == "M" else [f"{p['lamda']:.3g}"])
        cells += [f"{p['success']:.3f}", report.cell(p["mean_auc"], p["mean_auc_ci"]),
                  *(f"{p['auc'][n]:.3f}" for n in names), f"{p['mixture_log_likelihood']['hfc']:.4g}",
                  f"{p['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: Config) -> dict:
    started = time.perf_counter()
    run_ = runs.Run.of(config)
    out = run_.dir / "sweeps"
    check_inputs(config)
    written = {}
    for sweep in config.sweep_list():
        if sweep == "m":
            points = [run_point(config, m, config.m_lamda) for m in cli.numbers(config.m_values, int)]
            key, title = "M", f"{run_.dataset} / {config.arch} / {config.attack}: HFC against M (λ {config.m_lamda})"
        else:
            lamdas = [gmm_attack.hfc.lamda_text(v) for v in cli.numbers(config.lamda_values)]
            points = [run_point(config, config.lamda_m, lam) for lam in lamdas]
            key, title = "λ", f"{run_.dataset} / {config.arch} / {config.attack}: HFC against λ (M = {config.lamda_m})"
        result = {"dataset": run_.dataset, "arch": config.arch, "attack": config.attack, "sweep": sweep,
                  "term": config.term, "class_loss": config.class_loss, "points": points}
        text = markdown(title, points, key)
        utils.atomic_write_bytes(out / f"{sweep}_sweep.md", text.encode())
        plots.sweep_figure(out / f"{sweep}_sweep.png", result, "num_component" if sweep == "m" else "lamda", key)
        result["record"] = runs.record("sweeps", config.settings(), {p["results"]: Path(p["results"]) for p in points},
                                       [out / f"{sweep}_sweep.md", out / f"{sweep}_sweep.png"], folder=out)
        utils.write_json(out / f"{sweep}_sweep.json", result)
        written[sweep] = result
        print(text)
    print(f"sweeps: {time.perf_counter() - started:.0f} s -> {out}")
    return written


if __name__ == "__main__":
    utils.run_cli(main)
