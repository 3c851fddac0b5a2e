"""Per-image cost of each compare.py row against HFC's, on a clock other jobs do not move.

compare.py times each row's A_eval attack by the wall clock, which measures the machine's load as
much as the row when other jobs share the CPU (a row run beside two jobs looks twice as slow).
This benchmark builds every row as compare.py does (``compare._Stage``, in a run folder whose
stages are done) and times ``--steps`` steps of each on the same first ``--images`` A_eval images,
the rows alternating over ``--repeats`` rounds after one warm-up round. The clock is the process
CPU time by default (``--clock cpu``: other processes do not move it, as long as this one runs on
one thread, ``--threads 1``), or the wall clock. Term rows run at λ = 1 (the term is computed at
every step whatever λ is; λ = 0 would skip it), orthogonal PGD with its default rule. It prints
each row's median seconds per image and step and the ratio to HFC's, and writes them as JSON with
``--json``. Not part of the tests.

    python benchmarks/bench_compare.py --dataset CXR --attack I_FGSM_Linf_1 -y 8 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaptive  # noqa: E402
import compare  # noqa: E402
import opgd  # noqa: E402
import utils  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other flags go to compare.py's parser (--dataset, -a, --attack, -y, "
                                            "--threads, --rows, ...).")
    parser.add_argument("--images", type=int, default=4, help="A_eval images per timing (default: 4)")
    parser.add_argument("--steps", type=int, default=3, help="attack steps per timing (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the rows (default: 3)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="process CPU time (default) or wall time")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the markdown table of the ratios in these --json files (one column each) "
                             "and stop")
    return parser.parse_known_args(argv)


def markdown_table(paths: list[Path]) -> str:
    """Rows × the given results (--json files): the ratio to HFC, then HFC's own seconds."""
    results = [utils.read_json(path, "bench_compare result") for path in paths]
    rows = [row for row in results[0]["ratio_to_hfc"] if row != "HFC"]
    lines = ["| row | " + " | ".join(r["dataset"] for r in results) + " |", "|---|" + "---|" * len(results)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(
            f"{r['ratio_to_hfc'][row]:.2f}×" if row in r["ratio_to_hfc"] else "-" for r in results) + " |")
    lines.append("| HFC, seconds per image and step | " + " | ".join(
        f"{r['seconds_per_image_step']['HFC']:.3f}" for r in results) + " |")
    return "\n".join(lines)


def row_runner(stage, row: str, images: torch.Tensor, targets: np.ndarray, steps: int):
    """A function that attacks ``images`` with ``row`` for ``steps`` steps (the row built once)."""
    kwargs = dict(stage.attack_kwargs, steps=steps, progress=False)
    if row in compare.OPGD_ROWS:
        score = opgd.build(stage.fitted[compare.OPGD_ROWS[row]])
        return lambda: opgd.attack(stage.model, score, images, targets, stage.spec, rule=stage.config.opgd_rule,
                                   **kwargs)
    term = None if row == "base_same_schedule" else stage.term(row)
    lam = 0.0 if term is None else 1.0
    guides = term.draw(targets, stage.config.seed) if getattr(term, "per_image", False) else None
    return lambda: adaptive.attack(stage.model, term, images, targets, stage.spec, lam=lam, guides=guides, **kwargs)


def main(argv=None) -> dict:
    args, rest = parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return {}
    config = compare.Config.from_argv(rest)
    stage = compare._Stage(config)
    rows = [row for row in stage.rows if row != "base"]  # the base row is the stored base attack
    if "HFC" not in rows:
        raise utils.UserError("--rows must include HFC: every row's cost is given as a ratio to HFC's")
    n = min(args.images, len(stage.eval_pos))
    images, targets = torch.from_numpy(stage.clean[:n]), stage.targets[:n]
    runners = {row: row_runner(stage, row, images, targets, args.steps) for row in rows}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {row: [] for row in rows}
    for repeat in range(args.repeats + 1):  # round 0 warms up
        for row in rows:
            started = clock()
            runners[row]()
            if repeat:
                times[row].append((clock() - started) / (n * args.steps))
    per_step = {row: statistics.median(values) for row, values in times.items()}
    result = {"dataset": stage.run.dataset, "arch": config.arch, "attack": stage.spec.name, "clock": args.clock,
              "images": n, "steps": args.steps, "repeats": args.repeats, "threads": config.threads,
              "seconds_per_image_step": per_step,
              "ratio_to_hfc": {row: per_step[row] / per_step["HFC"] for row in rows}}
    print(f"{stage.run.dataset} / {config.arch} / {stage.spec.name}: {args.clock} seconds per image and step "
          f"({n} images, {args.steps} steps, median of {args.repeats} rounds)")
    for row in rows:
        print(f"  {row:<20} {per_step[row]:.4f}  ({result['ratio_to_hfc'][row]:.2f}x HFC)")
    if args.json is not None:
        utils.write_json(args.json, result)
    return result


if __name__ == "__main__":
    utils.run_cli(main)
