"""HFC against the competing adaptive attacks, on the same images and budget (docs/PROTOCOL.md §9).

For the A_eval images of the base attack's set A (the HFC row's images, the same targets), every
row is the one L∞ engine at HFC's schedule (α, T of ``hfc.hfc_schedule``), with HFC's rule of
returning the latest successful iterate, and a different ``extra`` term (``adaptive.py``):

- ``base``: the base AEs themselves (their own schedule); ``base_same_schedule``: λ = 0;
- ``HFC``: the matching gmm_attack.py results folder when its record has these settings, else HFC
  computed here by the same functions;
- ``random_guide`` (Sabour et al.), ``KD_constrained`` (Carlini & Wagner), ``LID_constrained``,
  ``MAHA_constrained``: terms built from the fitted detectors of the run;
- ``KD_constrained_stages``, ``KD_constrained_all`` (only when asked for): the KD-constrained term
  summed over the stage-end taps, or over every conv tap (KD's score layer added unless it is a copy
  of the last stage end's pooled map);
- ``OPGD_MAHA``, ``OPGD_KD``, ``OPGD_DNN``: orthogonal PGD (Bryniarski et al., ICLR 2022) against
  that one fitted detector's differentiable score (``opgd.py``), no λ (recorded as null); its
  TNR@90 threshold is set on A_fit's benign samples, and ``--opgd-rule`` says which images take a
  detector step (``success``, as Bryniarski et al.'s released attack: those already classified as
  the target; ``flagged``: those the detector flags at that threshold).

λ of each term row is ``--lamda`` or, with ``auto`` (the default), chosen on A_fit images only by
``hfc.choose_lambda`` (HFC's rule). Every row is scored against the seven fitted detectors by
``evaluation.score_table`` (one code path), with bootstrap intervals (``success_ci``, ``mean_auc_ci``,
and each detector's ``auc_ci`` and ``tnr90_ci``; by image, 1000 seeded resamples, 95%).

    python compare.py --dataset synthetic -a resnet50 --attack I_FGSM_Linf_6 -y 8

Writes ``runs_<DATASET>/<arch>/<ATTACK>/compare/``: ``compare.json``, ``compare.md``,
``compare.png`` (mean AUC against success), and one folder per row (``adv.npz``, checked like
every AE set, and ``row.json`` with its record). A row whose folder was made with the same
settings from the current inputs is reused, not recomputed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import adaptive
import aesets
import attacks
import cli
import detectors
import evaluation
import features
import gmm
import gmm_attack
import hfc
import metrics
import opgd
import plots
import report
import runs
import saver
import utils

DEFAULT_ROWS = ("base", "base_same_schedule", "HFC", "random_guide", "KD_constrained", "LID_constrained",
                "MAHA_constrained", "OPGD_MAHA", "OPGD_KD", "OPGD_DNN")
# Asked for by name only: the KD-constrained term on more layers than the detector scores, to see
# whether constraining the hierarchy helps a kernel density as the papers say it helps a mixture.
KD_LAYER_ROWS = {"KD_constrained_stages": "stages", "KD_constrained_all": "all"}
ROWS = DEFAULT_ROWS + tuple(KD_LAYER_ROWS)
TERM_ROWS = ("random_guide", "KD_constrained", "LID_constrained", "MAHA_constrained", *KD_LAYER_ROWS)
OPGD_ROWS = {"OPGD_MAHA": "MAHA", "OPGD_KD": "KD", "OPGD_DNN": "DNN"}  # row -> the detector it attacks
COMPARE_FILE = "compare.json"
ROW_FILE = "row.json"


def rows_value(text: str) -> str | None:
    """The domain of ``--rows``: a comma list of known row names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ROWS]
    if unknown or not names:
        return f"unknown row(s) {', '.join(unknown) or '(none given)'}; expected a comma list of {', '.join(ROWS)}"
    return None


@dataclass
class Config(gmm_attack.TermAttackConfig):
    lamda: str = cli.flag("auto", "λ of every term row, or 'auto': each row's own, chosen on A_fit by HFC's rule",
                          check=gmm_attack.lamda_value)
    rows: str = cli.flag(",".join(DEFAULT_ROWS), "comma list of rows to compute or reuse (also known: "
                         f"{', '.join(KD_LAYER_ROWS)}: the KD-constrained term on the stage-end taps or on "
                         "every conv tap)", check=rows_value)
    step_size: float | None = cli.flag(None, "step α in units of 1/256 (default: HFC's, hfc.hfc_schedule)",
                                       check=cli.positive)
    steps: int | None = cli.flag(None, "number of steps T (default: 2ε/α)", check=cli.at_least(1))
    term: str = cli.flag(gmm_attack.DEFAULT_TERM, "paper: each term in its own form; normalised: each layer's "
                                                  "value divided by its median on held-out clean images of the "
                                                  "target class (the run's validation images; HFC: get_GMM.py's "
                                                  "scales), averaged over layers; hinged: normalised, and HFC's "
                                                  "layers stop pulling at the clean median (the other terms "
                                                  "take the normalised form)", choices=tuple(hfc.TERMS))
    opgd_rule: str = cli.flag("success", "orthogonal PGD rows: the images that take a detector step -- success: "
                                         "those classified as their target (Bryniarski et al.), flagged: those "
                                         "above the detector's TNR@90 threshold", choices=attacks.ORTHOGONAL_RULES)
    limit: int | None = cli.flag(None, "attack only the first N images of A_eval", check=cli.at_least(2))
    batch_size: int = cli.flag(32, "attack batch size", short="-b", check=cli.at_least(1))

    def rows_asked(self) -> list[str]:
        asked = {t.strip() for t in self.rows.split(",") if t.strip()}
        return [row for row in ROWS if row in asked]

    def hfc_config(self) -> gmm_attack.Config:
        """gmm_attack.py's config for the HFC row: its results folder is reused when its record matches."""
        return gmm_attack.Config(
            arch=self.arch, name=self.name, dataset=self.dataset, seed=self.seed, device=self.device,
            threads=self.threads, attack=self.attack, noise=self.noise, num_component=self.num_component,
            **self.lamda_search(), step_size=self.step_size, steps=self.steps, term=self.term,
            limit=self.limit, batch_size=self.batch_size)


def main(argv=None) -> dict:
    return run(Config.from_argv(argv))


def row_settings(config: Config, row: str, step_256: float, steps: int) -> dict:
    """The settings that decide one row (its record's ``settings``; a row is reused when they match)."""
    settings = {"row": row, "dataset": config.dataset, "arch": config.arch, "attack": config.attack,
                "noise": config.noise, "limit": config.limit, "seed": config.seed}
    if row == "base":
        return settings
    settings.update(step_size_256=step_256, steps=steps, batch_size=config.batch_size, keep_successful=True)
    if row == "base_same_schedule":
        return settings
    if row in OPGD_ROWS:
        settings.update(detector=OPGD_ROWS[row], opgd_rule=config.opgd_rule, threshold_tpr=opgd.TNR_TPR)
        return settings
    settings.update(**config.lamda_search(), term=config.term)
    if row == "HFC":
        settings["num_component"] = config.num_component
    return settings


class _Stage:
    """What every row reads: the model, the protocol's sets, the detectors, and the lazily made
    pieces (mixtures, held-out features) that only some rows need."""

    def __init__(self, config: Config):
        problem = rows_value(config.rows)
        if problem:  # a Config built without the parser
            raise utils.UserError(f"--rows: {problem}")
        self.config = config
        self.spec = attacks.parse_attack(config.attack)
        if self.spec.method == "Noise":
            raise utils.UserError(f"--attack must be an attack, not the noise set {self.spec.name}")
        self.noise = evaluation.parse_noise(config.noise).name
        self.rows = config.rows_asked()
        self.run = runs.Run.of(config)
        self.device = utils.prepare_runtime(config.device, config.seed, config.threads)
        self.model, _ = saver.load_model(self.run.checkpoint, self.device, arch=config.arch,
                                         hint=self.run.hint("train"))
        self.sets = evaluation.load_protocol_sets(self.run, self.spec.name, self.noise)
        self.fitted = evaluation.load_fresh_detectors(self.run, self.spec.name, names=list(detectors.DETECTORS))
        self.mixtures = None
        if "HFC" in self.rows:
            self.mixtures = evaluation.load_fresh_mixtures(self.run, config.num_component,
                                                           need_scales=hfc.needs_scales(config.term))
        self.step_256, self.steps = hfc.hfc_schedule(self.run.dataset, config.arch, self.spec.eps_256,
                                                     config.step_size, config.steps)
        eval_pos = self.sets["eval"]
        self.eval_pos = eval_pos[:config.limit] if config.limit else eval_pos
        if len(self.eval_pos) < 2:
            raise utils.UserError(f"A_eval holds {len(self.eval_pos)} images; attack more images with gen_base_adv.py")
        base = self.sets["base"]
        self.clean = base["clean"][self.eval_pos]
        self.targets = base["targets"][self.eval_pos]
        # λ is chosen on these A_fit images, grouped by target as hfc_attack orders them anyway (so
        # that a per-image term's guides can be bound for the one batch the engine sees).
        tune = self.sets["fit"][:config.tune_images]
        self.tune_pos = tune[np.argsort(base["targets"][tune], kind="stable")]
        self.attack_kwargs = dict(step_size_256=self.step_256, steps=self.steps, seed=config.seed,
                                  batch_size=config.batch_size, device=self.device, keep_successful=True)
        self.out = self.run.compare_dir(self.spec.name)
        self._held_out = None

    # -- the artifacts a row is made from (its record's inputs)
    def inputs(self, row: str) -> dict[str, Path]:
        made_from = {"checkpoint": self.run.checkpoint,
                     "attack_set": self.run.ae_dir(self.spec.name) / aesets.AE_FILE,
                     "noise_set": self.run.ae_dir(self.noise) / aesets.AE_FILE,
                     "detectors": self.run.detectors_dir(self.spec.name) / runs.SUMMARY}
        if row in ("HFC", *TERM_ROWS):
            made_from["split"] = self.run.split
        if row == "HFC":
            made_from["mixtures"] = self.run.mixtures_dir(self.config.num_component) / runs.MIXTURES
            if self.hfc_folder() is not None:
                made_from["hfc_results"] = self.hfc_folder() / runs.RESULTS
        return made_from

    def hfc_folder(self) -> Path | None:
        """gmm_attack.py's results folder for the same settings, when it is up to date."""
        hfc_config = self.config.hfc_config()
        folder = hfc_config.results_dir(self.run)
        made_from = gmm_attack.stage_inputs(self.run, self.spec.name, self.spec.name, self.noise,
                                            self.config.num_component)
        return folder if runs.is_done(folder / runs.RESULTS, hfc_config.settings(), made_from) else None

    def held_out(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Pooled features and labels of the run's validation images (the normalised terms' scales)."""
        if self._held_out is None:
            feats = features.part_features(self.run, self.model, "val", self.device, self.config.batch_size)
            self._held_out = (feats.pooled, feats.labels)
        return self._held_out

    # -- the terms
    def term(self, row: str):
        normalise = hfc.needs_scales(self.config.term)
        where = dict(device=self.device, normalise=normalise)
        if row == "HFC":
            return hfc.HFCTerm(self.mixtures, device=self.device, **hfc.TERMS[self.config.term])
        if row == "random_guide":
            kd = self.fitted["KD"]  # its stored clean training features are the guides' pool
            term = adaptive.RandomGuide([kd.train_features_.get(i) for i in range(len(self.model.layer_names))],
                                        kd.train_labels_, gmm.select_layers(self.model),
                                        num_classes=self.model.num_classes, **where)
        elif row == "KD_constrained":
            term = adaptive.KDConstrained(self.fitted["KD"], **where)
        elif row in KD_LAYER_ROWS:
            kd = self.fitted["KD"]
            layers = detectors.resolve_layers(KD_LAYER_ROWS[row], self.model, len(self.model.layer_names),
                                              conv_only=True)
            if kd.score_layer_ not in self.model.pooled_copy_layers:  # a copy would count the last stage twice
                layers = sorted(set(layers) | {kd.score_layer_})
            term = adaptive.KDConstrained(kd, layers=layers, **where)
        elif row == "LID_constrained":
            term = adaptive.LIDConstrained(self.fitted["LID"], num_classes=self.model.num_classes, **where)
        elif row == "MAHA_constrained":
            term = adaptive.MAHAConstrained(self.fitted["MAHA"], **where)
        else:
            raise ValueError(f"no term for row {row!r}")
        if normalise:
            pooled, labels = self.held_out()
            if term.per_image:
                with term.guiding(term.draw(labels, self.config.seed + 1), labels):
                    term.fit_scales(pooled, labels)
            else:
                term.fit_scales(pooled, labels)
        return term

    def layer_names(self, term) -> list[str] | None:
        layers = getattr(term, "layers", None)
        return None if layers is None else [self.model.layer_names[i] for i in layers]

    # -- the rows
    def opgd_row(self, row: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """Orthogonal PGD on A_eval against one detector, its threshold set on A_fit's benign set."""
        name, base, fit = OPGD_ROWS[row], self.sets["base"], self.sets["fit"]
        score = opgd.build(self.fitted[name])
        where = dict(device=self.device, batch_size=self.config.batch_size)
        started = time.perf_counter()
        threshold = opgd.calibrate(score, self.model, base["clean"][fit], self.sets["noisy"][fit], **where)
        calibrate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        adv, success = opgd.attack(self.model, score, torch.from_numpy(self.clean), self.targets, self.spec,
                                   rule=self.config.opgd_rule, **self.attack_kwargs)
        seconds = time.perf_counter() - started
        adv, success = adv.numpy(), success.numpy()
        undetected = success & (opgd.score_images(self.model, score, adv, **where) <= threshold)
        info = {"lamda": None, "lamda_rule": "none: orthogonal PGD has no λ", "tune_seconds": calibrate_seconds,
                "attack_seconds": seconds, "seconds_per_image": seconds / len(self.eval_pos),
                "step_size_256": self.step_256, "steps": self.steps, "detector": name,
                "opgd_rule": self.config.opgd_rule, "threshold": float(threshold),
                "undetected_success": float(undetected.mean()),
                "layers": [self.model.layer_names[i] for i in score.layers], "source": "computed"}
        return adv, success, info

    def attack_row(self, row: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """Attack A_eval for a term row (λ chosen on A_fit when asked); returns adv, success, info."""
        config, base = self.config, self.sets["base"]
        lam = None if config.lamda == "auto" else float(config.lamda)
        term = None if row == "base_same_schedule" else self.term(row)
        guides = term.draw(base["targets"], config.seed) if getattr(term, "per_image", False) else None
        trials, rule, tune_seconds = [], "given", 0.0
        if row == "base_same_schedule":
            lam, rule = 0.0, "none: the base method at HFC's schedule"
        elif lam is None:
            started = time.perf_counter()
            tune = self.tune_pos
            kwargs = dict(self.attack_kwargs)
            grid = config.lamda_candidates()
            print(f"{row}: choosing λ on {len(tune)} A_fit images (grid {grid}, success ≥ {config.min_success:.0%})")
            binding = contextlib.nullcontext()
            if guides is not None:
                binding = term.guiding(guides[tune], base["targets"][tune])
                kwargs["batch_size"] = len(tune)  # one engine batch: the guides are bound for exactly it
            with binding:
                lam, trials, rule = hfc.choose_lambda(self.model, term, torch.from_numpy(base["clean"][tune]),
                                                      base["targets"][tune], self.spec, grid=grid,
                                                      min_success=config.min_success, **kwargs)
            tune_seconds = time.perf_counter() - started
        started = time.perf_counter()
        adv, success = adaptive.attack(self.model, term, torch.from_numpy(self.clean), self.targets, self.spec,
                                       lam=lam, guides=None if guides is None else guides[self.eval_pos],
                                       **self.attack_kwargs)
        seconds = time.perf_counter() - started
        info = {"lamda": float(lam), "lamda_rule": rule, "lamda_trials": trials, "tune_seconds": tune_seconds,
                "attack_seconds": seconds, "seconds_per_image": seconds / len(self.eval_pos),
                "step_size_256": self.step_256, "steps": self.steps, "term": config.term,
                "layers": self.layer_names(term) if term is not None else None, "source": "computed"}
        return adv.numpy(), success.numpy(), info

    def make_row(self, row: str) -> tuple[np.ndarray, np.ndarray, dict, dict | None]:
        """(adv, success, info, detector reports or None to score here) of one row."""
        base = self.sets["base"]
        if row == "base":
            meta = base.get("meta", {})
            engine = meta.get("settings", {})
            info = {"lamda": 0.0, "seconds_per_image": meta.get("seconds_per_image"),
                    "step_size_256": engine.get("step_size_256"), "steps": engine.get("steps"),
                    "source": str(self.run.ae_dir(self.spec.name))}
            return base["adv"][self.eval_pos], base["success"][self.eval_pos], info, None
        if row == "HFC" and self.hfc_folder() is not None:
            folder = self.hfc_folder()
            hfc_set = aesets.load_ae_set(folder, hint=evaluation.REMAKE_HINT)
            if np.array_equal(hfc_set["index"], base["index"][self.eval_pos]):
                results = utils.read_json(folder / runs.RESULTS, "HFC results")
                print(f"HFC: reusing {folder} (made with these settings)")
                info = {"lamda": float(results["lamda"]), "lamda_rule": results.get("lamda_rule"),
                        "lamda_trials": results.get("lamda_trials", []),
                        "tune_seconds": results["seconds"]["choose_lamda"],
                        "attack_seconds": results["seconds"]["attack"],
                        "seconds_per_image": results["seconds"]["attack_per_image"],
                        "step_size_256": results["step_size_256"], "steps": results["steps"],
                        "term": self.config.term, "layers": [self.model.layer_names[i] for i in self.mixtures.layers],
                        "source": str(folder)}
                reports = {name: per_row["hfc"] for name, per_row in results["detectors"].items()}
                if set(results.get("mean_auc_of") or []) == set(report.DETECTOR_ORDER):
                    info["mean_auc_ci"] = (results.get("mean_auc_ci") or {}).get("hfc")
                return hfc_set["adv"], hfc_set["success"], info, reports
        adv, success, info = self.opgd_row(row) if row in OPGD_ROWS else self.attack_row(row)
        return adv, success, info, None

    def score(self, row: str, adv: np.ndarray, success: np.ndarray) -> tuple[dict | None, list | None]:
        """{detector: report} of one row and its mean AUC's interval; (None, None) when no AE succeeded."""
        if not np.asarray(success, bool).any():
            return None, None  # nothing to detect: reported as null
        scored = evaluation.score_table(self.model, self.fitted, self.clean, self.sets["noisy"][self.eval_pos],
                                        {row: (adv, success)}, device=self.device,
                                        batch_size=self.config.batch_size, mean_of=report.DETECTOR_ORDER)
        return {name: per_row[row] for name, per_row in scored.table.items()}, scored.mean_auc_ci.get(row)

    def compute(self, row: str, settings: dict) -> dict:
        adv, success, info, reports = self.make_row(row)
        mean_auc_ci = info.pop("mean_auc_ci", None)
        if reports is None:
            reports, mean_auc_ci = self.score(row, adv, success)
        success = np.asarray(success, bool)
        # The same seeded draws of the images as score_table's, so the same interval.
        result = {"success": float(success.mean()), "n_success": int(success.sum()), **info,
                  "mean_auc": None, "detectors": None,
                  "success_ci": metrics.success_interval(success), "mean_auc_ci": None}
        if reports is not None:
            result["detectors"] = {name: {"auc": float(reports[name]["auc"]), "tnr90": float(reports[name]["tnr90"]),
                                          **{key: reports[name][key] for key in report.CI_FIELDS
                                             if key in reports[name]}}
                                   for name in report.DETECTOR_ORDER}
            result["mean_auc"] = float(np.mean([m["auc"] for m in result["detectors"].values()]))
            result["mean_auc_ci"] = mean_auc_ci
        layer_auc = {name: reports[name]["layer_auc"] for name in report.DETECTOR_ORDER
                     if reports is not None and "layer_auc" in reports[name]}
        base = self.sets["base"]
        meta = {"attack": self.spec.name, "row": row, "dataset": self.run.dataset, "arch": self.config.arch,
                "lamda": result["lamda"], "step_size_256": result["step_size_256"], "steps": result["steps"],
                "seed": self.config.seed, "images_of": "A_eval"}
        with utils.replacing_dir(self.out / row) as staging:
            aesets.save_ae_set(staging, clean=self.clean, adv=adv, labels=base["labels"][self.eval_pos],
                               targets=self.targets, success=success, index=base["index"][self.eval_pos],
                               eps=self.spec.eps, meta=meta)
            record = runs.record("compare", settings, self.inputs(row),
                                 [staging / aesets.AE_FILE, staging / aesets.SUMMARY_FILE], folder=staging)
            utils.write_json(staging / ROW_FILE, {"row": row, "result": result, "layer_auc": layer_auc,
                                                  "record": record})
        return result


def run(config: Config) -> dict:
    """Compute (or reuse) every asked row, then write compare.json, compare.md and compare.png."""
    stage = _Stage(config)
    rows: dict[str, dict] = {}
    for row in stage.rows:
        settings = row_settings(config, row, stage.step_256, stage.steps)
        folder = stage.out / row
        if runs.is_done(folder / ROW_FILE, settings, stage.inputs(row)):
            rows[row] = utils.read_json(folder / ROW_FILE, "compare row")["result"]
            print(f"== {row}: up to date, reused ({folder})")
            continue
        print(f"== {row}")
        rows[row] = stage.compute(row, settings)
        print(f"   success {rows[row]['success']:.3f}, mean AUC "
              + ("-" if rows[row]["mean_auc"] is None else f"{rows[row]['mean_auc']:.3f}")
              + ("" if rows[row]["lamda"] is None else f", λ = {rows[row]['lamda']:.3g}"))
    compare = {"dataset": stage.run.dataset, "arch": config.arch, "attack": stage.spec.name,
               "epsilon_256": stage.spec.eps_256, "step_size_256": stage.step_256, "steps": stage.steps,
               "n_eval": len(stage.eval_pos), "term": config.term, "lamda": config.lamda, "rows": rows}
    out = stage.out
    markdown = report.format_compare_table(compare, "md")
    utils.atomic_write_bytes(out / "compare.md", markdown.encode())
    plots.auc_vs_success(out / "compare.png", compare)
    made_from = {}
    for row in stage.rows:
        made_from.update(stage.inputs(row))
        made_from[f"row {row}"] = out / row / ROW_FILE
    compare["record"] = runs.record("compare", config.settings(), made_from,
                                    [out / "compare.md", out / "compare.png"], folder=out)
    utils.write_json(out / COMPARE_FILE, compare)
    print(report.format_compare_table(compare, "text"))
    print(f"-> {out}")
    return compare


if __name__ == "__main__":
    utils.run_cli(main)
