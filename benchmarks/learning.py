"""Learning benchmark: held-out success of config variants x seeds for a fixed budget, with confidence intervals.

Every (variant, seed) is one ``htrmrl fit`` run through the CLI, one at a time (training uses every
core), for ``--minutes`` of wall clock or ``--frames`` env frames. From the run's own
``metrics.csv`` it keeps every held-out evaluation (success with its 95 % interval over trials,
success and return per episode index of the trial, frames, minutes) and writes one result file per
finished run, ``<out>/<variant>/seed<S>.json``. A result file that exists is not run again, so an
interrupted benchmark continues where it stopped; a file made with another resolved config is
refused (use another ``--out``). A run that was stopped before it finished (Ctrl-C, SIGTERM, the
machine going away) continues from its last epoch's ``last.ckpt`` (``--ckpt_path``) when the
benchmark is started again with the same config, and its curve joins the folders of both parts.

After training, the run's final weights (its ``last.ckpt``) are evaluated once more with
``htrmrl validate`` on ``--final-repeats`` times the trials of one in-training evaluation (ML1: 3
trials on each of the 50 held-out goals): one 50-trial evaluation moves by about +-0.05 on
identical weights, as much as the effects to decide on. A result file without this final
evaluation gets it when its run folder is still there (``--keep-runs``).

Then, per variant: the final held-out success (the final evaluation where every seed has one,
else the last in-training evaluation) as the mean over seeds with a Student-t 95 % confidence
interval, the final success per episode index, and the first minute and frame count at which the
seed-mean success of the in-training evaluations reaches ``--target``. ``<out>/learning.json`` holds
the curves and the summary, ``<out>/learning.png`` held-out success vs frames and vs minutes (mean
line, band = 95 % interval over seeds) and, where the runs log success per task class (ML10, ML45),
``<out>/per_class.png`` (``class_curves.py``). The last stdout line is one JSON object.

Variants are model configs (``htrmrl``, ``trmrl``, ``mlp`` = ``conf/model/<name>.yaml``) or
``NAME=conf/a.yaml,conf/b.yaml`` (files composed after ``conf/base.yaml`` and the benchmark
config; ``NAME=conf/model/htrmrl.yaml,--model.entropy_coeff=0.01`` also passes CLI options).
Usage::

    python benchmarks/learning.py --variants htrmrl trmrl mlp --seeds 0 1 2 --minutes 30
    python benchmarks/learning.py --benchmark point_robot --variants htrmrl --seeds 0 1 2 --minutes 5
    python benchmarks/learning.py --variants htrmrl mlp --seeds 0 1 2 --minutes 30 --summarize-only
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from class_curves import has_classes, plot_per_class  # this folder's module

from lightning_htrmrl.statistics import confidence_half_width, difference_half_width

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MODEL_VARIANTS = ("htrmrl", "trmrl", "mlp")
# Keys of a resolved config that may differ between runs of the same variant and seed.
RUN_SPECIFIC_KEYS = ("config", "ckpt_path")
# Where a run writes its files: no part of what is learned.
OUTPUT_KEYS = ("logger", "default_root_dir")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``htrmrl`` or ``NAME=conf/a.yaml,--key=value`` -> (name, extra CLI arguments)."""
    if "=" not in spec.split(",")[0] or spec.startswith("--"):
        if spec not in MODEL_VARIANTS:
            raise SystemExit(f"error: --variants: unknown variant {spec!r}; use one of {MODEL_VARIANTS} or NAME=FILES")
        return spec, ["--config", str(CONF / "model" / f"{spec}.yaml")]
    name, items = spec.split("=", 1)
    args: list[str] = []
    for item in items.split(","):
        if item.startswith("--"):
            args.extend(item.split("=", 1))
        else:
            path = Path(item) if Path(item).is_absolute() else REPO / item
            if not path.is_file():
                raise SystemExit(f"error: --variants: {name}: no such config file: {item}")
            args.extend(["--config", str(path)])
    return name, args


def fit_command(benchmark: str, variant_args: list[str], seed: int, budget: dict, extra: list[str]) -> list[str]:
    """The ``htrmrl fit`` command line of one run (a frame budget is added as ``max_epochs`` later)."""
    command = [sys.executable, "-m", "lightning_htrmrl", "fit"]
    command += ["--config", str(CONF / "base.yaml"), "--config", str(CONF / "benchmark" / f"{benchmark}.yaml")]
    command += variant_args
    command += ["--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.enable_progress_bar", "false"]
    if budget["minutes"] is not None:
        total = int(round(budget["minutes"] * 60))
        command += [
            "--trainer.max_epochs",
            "-1",
            "--trainer.max_time",
            f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}",
        ]
    return command + extra


def resolved_config(command: list[str], cwd: Path) -> dict:
    """The config the command would run with (``--print_config``), without run-specific keys."""
    printed = subprocess.run(command + ["--print_config"], cwd=cwd, capture_output=True, text=True, check=True)
    config = yaml.safe_load(printed.stdout)
    for key in RUN_SPECIFIC_KEYS:
        config.pop(key, None)
    return config


def without_output_keys(config: dict) -> dict:
    """The config without where and which files the run writes (``trainer.logger``,
    ``default_root_dir``, the ``ModelCheckpoint`` callbacks)."""
    trainer = {key: value for key, value in config.get("trainer", {}).items() if key not in OUTPUT_KEYS}
    callbacks = trainer.get("callbacks")
    if isinstance(callbacks, list):
        trainer["callbacks"] = [
            c
            for c in callbacks
            if not (isinstance(c, dict) and str(c.get("class_path", "")).endswith("ModelCheckpoint"))
        ]
    return {**config, "trainer": trainer}


def same_config(stored: dict, current: dict) -> bool:
    """Whether a stored run's config is the current one; options added to the code since then
    (absent from ``stored``) are taken to be at the default they had before."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return all(key in current and same_config(value, current[key]) for key, value in stored.items())
    return stored == current


def frames_per_epoch(config: dict) -> int:
    data, benchmark = config["data"], config["data"]["benchmark"]["init_args"]
    trial = benchmark["episode_length"] * benchmark["episodes_per_trial"]
    return data["num_collectors"] * data["num_envs"] * data["trials_per_env"] * trial * data["iterations_per_epoch"]


def read_curve(run: Path) -> dict:
    """Held-out evaluations and the last training-batch figures from a run's ``metrics.csv``."""
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))

    def value(row: dict, key: str) -> float | None:
        text = row.get(key, "")
        return float(text) if text not in ("", None) else None

    evaluations, frames = [], 0.0
    episodes = sorted(int(k.rsplit("ep", 1)[1]) for k in rows[0] if k.startswith("meta_test/success_ep"))
    # ML10 / ML45: success per task class, held-out and training (absent for one class)
    test_classes = [k for k in rows[0] if k.startswith("meta_test/success_class/")]
    train_classes = [k for k in rows[0] if k.startswith("meta_train/success_class/")]

    def per_class(row: dict, keys: list[str]) -> dict:
        return {key.rsplit("/", 1)[1]: value(row, key) for key in keys if value(row, key) is not None}

    for row in rows:
        frames = value(row, "train/frames") or frames
        success = value(row, "meta_test/success")
        if success is None:
            continue
        evaluations.append(
            {
                "frames": int(frames),
                "minutes": value(row, "time/elapsed_min"),
                "eval_s": value(row, "time/eval_s"),
                "success": success,
                "success_ci95": value(row, "meta_test/success_ci95"),
                "success_per_episode": [value(row, f"meta_test/success_ep{k}") for k in episodes],
                "return_per_episode": [value(row, f"meta_test/return_ep{k}") for k in episodes],
                **({"success_per_class": per_class(row, test_classes)} if test_classes else {}),
            }
        )
    train_rows = [row for row in rows if value(row, "meta_train/success") is not None]
    # The training batches' success (train tasks, sampled actions): what choices are made on.
    meta_train_curve = [
        {
            "frames": int(value(row, "train/frames")),
            "success_per_episode": [round(value(row, f"meta_train/success_ep{k}"), 4) for k in episodes],
            **({"success_per_class": per_class(row, train_classes)} if train_classes else {}),
        }
        for row in train_rows
    ]
    last = train_rows[-3:]
    meta_train = {
        "success": float(np.mean([value(r, "meta_train/success") for r in last])) if last else None,
        "success_per_episode": [float(np.mean([value(r, f"meta_train/success_ep{k}") for r in last])) for k in episodes]
        if last
        else None,
    }
    elapsed = max((value(r, "time/elapsed_min") or 0.0 for r in rows), default=0.0)
    return {
        "evaluations": evaluations,
        "meta_train_final": meta_train,
        "meta_train": meta_train_curve,
        "elapsed_min": elapsed,
    }


def run_in_own_group(command: list[str], cwd: Path, log) -> int:
    """Run a training in its own process group; if this script is stopped (Ctrl-C, SIGTERM), the
    training and its collector processes are stopped too (SIGINT, then SIGKILL after 30 s)."""
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def latest_run(root: Path) -> Path | None:
    """The newest ``<root>/<name>/version_N`` folder a run wrote (None if there is none)."""
    return max(root.glob("*/version_*"), key=lambda p: p.stat().st_mtime, default=None)


def final_evaluation(run: Path, repeats: int, log) -> dict:
    """Held-out success of a run's final weights: ``htrmrl validate`` of its ``last.ckpt`` with its own
    config on ``repeats`` times the trials of its in-training evaluations (same tasks, same order)."""
    trials = repeats * json.loads((run / "meta_test.json").read_text())["num_trials"]
    out = run.parents[2] / "final_evaluation"
    command = [sys.executable, "-m", "lightning_htrmrl", "validate", "--config", str(run / "config.yaml")]
    command += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--meta_test.num_trials", str(trials)]
    command += ["--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"]
    returncode = run_in_own_group(command, run.parents[2], log)
    if returncode != 0:
        raise SystemExit(f"error: final evaluation of {run} failed (exit {returncode}); see {log.name}")
    results = json.loads((latest_run(out) / "meta_test.json").read_text())
    keys = ("num_trials", "frames", "success", "success_ci95", "success_per_episode", "return_per_episode")
    return {key: results[key] for key in keys}


def checkpoint_frames(run: Path) -> int:
    """The env frames trained on by the weights in a run's ``last.ckpt``."""
    import torch

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return int(checkpoint["state_dict"]["frames"])


def add_final_evaluation(result: dict, work: Path, repeats: int, result_file: Path) -> dict:
    """Evaluate the final weights of a finished run (its folder under ``work``) and rewrite its result file."""
    run = latest_run(work / "runs")
    if run is None or not (run / "checkpoints" / "last.ckpt").is_file():
        return result
    what = f"[learning] {result['variant']} seed {result['seed']}"
    final_frames, saved_frames = result["evaluations"][-1]["frames"], checkpoint_frames(run)
    if saved_frames != final_frames:  # e.g. runs from before last.ckpt was written every epoch
        print(
            f"{what}: no final evaluation: last.ckpt holds the weights at {saved_frames} frames, not the final "
            f"ones at {final_frames}",
            file=sys.stderr,
        )
        return result
    print(f"{what}: final evaluation", file=sys.stderr, flush=True)
    with (work / "final_evaluation.log").open("w") as log:
        result = {**result, "final_evaluation": final_evaluation(run, repeats, log)}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def run_folders(root: Path) -> list[Path]:
    """The ``<root>/<name>/version_N`` folders of one (variant, seed), oldest first (a resumed
    run continues in a new one)."""

    def number(run: Path) -> int:
        digits = run.name.removeprefix("version_")
        return int(digits) if digits.isdigit() else -1

    return sorted(root.glob("*/version_*"), key=number)


def resumable_checkpoint(work: Path, config: dict) -> Path | None:
    """The ``last.ckpt`` of an interrupted run of ``config`` in ``work`` (None: start afresh)."""
    for run in reversed(run_folders(work / "runs")):
        checkpoint, saved = run / "checkpoints" / "last.ckpt", run / "config.yaml"
        if checkpoint.is_file() and saved.is_file():
            stored = yaml.safe_load(saved.read_text())
            for key in RUN_SPECIFIC_KEYS:
                stored.pop(key, None)
            if same_config(without_output_keys(stored), without_output_keys(config)):
                return checkpoint
            return None
    return None


def read_curves(root: Path) -> dict:
    """:func:`read_curve` over the run folders of a run and its resumes, joined in order."""
    curves = [read_curve(run) for run in run_folders(root) if (run / "metrics.csv").is_file()]
    joined = {**curves[-1], "evaluations": [], "meta_train": []}
    for curve in curves:
        for key in ("evaluations", "meta_train"):
            seen = joined[key][-1]["frames"] if joined[key] else -1
            joined[key] += [entry for entry in curve[key] if entry["frames"] > seen]
    joined["elapsed_min"] = max(curve["elapsed_min"] for curve in curves)
    return joined


def run_one(name: str, command: list[str], config: dict, seed: int, work: Path, result_file: Path) -> dict:
    """Train one (variant, seed), continuing an interrupted run of the same config, and write its result file."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = resumable_checkpoint(work, config)
    if checkpoint is None:
        shutil.rmtree(work / "runs", ignore_errors=True)
    log = work / "fit.log"
    resume = [] if checkpoint is None else ["--ckpt_path", str(checkpoint)]
    print(f"[learning] {name} seed {seed}: {' '.join(command[2:] + resume)}", file=sys.stderr, flush=True)
    with log.open("a") as handle:
        returncode = run_in_own_group(command + resume, work, handle)
    if returncode != 0:
        raise SystemExit(f"error: {name} seed {seed} failed (exit {returncode}); see {log}")
    curve = read_curves(work / "runs")
    if not curve["evaluations"]:
        raise SystemExit(f"error: {name} seed {seed} logged no held-out evaluation; see {log}")
    # The command as run from the repository root, so result files read the same on every machine.
    portable = [part.removeprefix(f"{REPO}/") for part in command[2:]]
    result = {"variant": name, "seed": seed, "command": portable, "config": config, **curve}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def step_curve(evaluations: list[dict], axis: str, grid: np.ndarray) -> np.ndarray:
    """Held-out success on ``grid`` (the latest evaluation at or before each point; NaN before the first)."""
    xs = np.array([e[axis] for e in evaluations], dtype=float)
    ys = np.array([e["success"] for e in evaluations], dtype=float)
    index = np.searchsorted(xs, grid, side="right") - 1
    return np.where(index >= 0, ys[np.clip(index, 0, None)], np.nan)


def first_reaching(grid: np.ndarray, mean: np.ndarray, target: float) -> float | None:
    reached = np.nonzero(np.nan_to_num(mean, nan=-1.0) >= target)[0]
    return float(grid[reached[0]]) if len(reached) else None


def summarize(name: str, results: list[dict], budget: dict, target: float) -> tuple[dict, dict]:
    """Per-variant summary and mean curves (vs frames and vs minutes)."""
    finals = [r["evaluations"][-1] for r in results]
    last_success = [f["success"] for f in finals]
    # The final evaluation (more trials) decides where every seed has one; never a mix of both.
    if all("final_evaluation" in r for r in results):
        finals_decided = [r["final_evaluation"] for r in results]
        final_source = f"final evaluation, {finals_decided[0]['num_trials']} trials"
    else:
        finals_decided, final_source = finals, "last in-training evaluation"
    success = [f["success"] for f in finals_decided]
    per_episode = np.array([f["success_per_episode"] for f in finals_decided])
    curves, reach = {}, {}
    for axis, top in (("frames", max(f["frames"] for f in finals)), ("minutes", max(f["minutes"] for f in finals))):
        grid = np.linspace(0.0, top, 200)
        seeds = np.stack([step_curve(r["evaluations"], axis, grid) for r in results])
        mean = seeds.mean(0)
        half = (
            np.array([confidence_half_width(list(column)) or 0.0 for column in seeds.T])
            if len(results) > 1
            else np.zeros_like(mean)
        )
        curves[axis] = {"grid": grid.tolist(), "mean": mean.tolist(), "ci95": np.nan_to_num(half).tolist()}
        reach[axis] = first_reaching(grid, mean, target)
    summary = {
        "variant": name,
        "seeds": [r["seed"] for r in results],
        "budget": budget,
        "final_success_mean": float(np.mean(success)),
        "final_success_ci95": confidence_half_width(success),
        "final_success_per_seed": success,
        "final_success_per_episode": per_episode.mean(0).round(4).tolist(),
        "final_success_from": final_source,
        "last_evaluation_success_per_seed": last_success,
        # less noisy than one evaluation: each seed's mean over its last 3 evaluations
        "late_success_mean": float(np.mean([np.mean([e["success"] for e in r["evaluations"][-3:]]) for r in results])),
        "final_frames_mean": float(np.mean([f["frames"] for f in finals])),
        "final_meta_train_success_mean": float(np.mean([r["meta_train_final"]["success"] for r in results])),
        f"minutes_to_{target}": reach["minutes"],
        f"frames_to_{target}": reach["frames"],
        "eval_share": float(
            np.mean(
                [
                    sum(e["eval_s"] or 0.0 for e in r["evaluations"]) / 60.0 / max(r["elapsed_min"], 1e-9)
                    for r in results
                ]
            )
        ),
    }
    return summary, curves


def plot(path: Path, curves: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4), layout="constrained")
    for axis, key, label in ((axes[0], "frames", "env frames"), (axes[1], "minutes", "wall-clock minutes")):
        for name, variant in curves.items():
            curve = variant[key]
            grid, mean, half = (np.array(curve[k]) for k in ("grid", "mean", "ci95"))
            (line,) = axis.plot(grid, mean, label=name)
            axis.fill_between(grid, mean - half, mean + half, color=line.get_color(), alpha=0.2)
        axis.set_xlabel(label)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out success (mean over seeds)")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center")  # off the curves
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``): minutes from different CPUs are not comparable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="ml1_reach", help="conf/benchmark/<name>.yaml")
    parser.add_argument("--variants", nargs="+", default=list(MODEL_VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    budget_group = parser.add_mutually_exclusive_group(required=True)
    budget_group.add_argument("--minutes", type=float, help="wall-clock budget of each run")
    budget_group.add_argument("--frames", type=int, help="env-frame budget of each run (rounded up to whole epochs)")
    parser.add_argument("--target", type=float, default=0.8, help="held-out success for minutes_to_<target>")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/...)")
    parser.add_argument("--work", type=Path, default=REPO / "runs_learning", help="where run folders go")
    parser.add_argument(
        "--final-repeats",
        type=int,
        default=3,
        help="evaluate each run's final weights on this many times the trials of one evaluation (0: off)",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="CLI options for every run, e.g. data.num_envs=8",
    )
    parser.add_argument("--keep-runs", action="store_true", help="keep run folders (checkpoints) after a run")
    parser.add_argument(
        "--summarize-only", action="store_true", help="train nothing: summarise the seeds that have result files"
    )
    args = parser.parse_args()
    if not (CONF / "benchmark" / f"{args.benchmark}.yaml").is_file():
        choices = sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml"))
        raise SystemExit(f"error: --benchmark: unknown {args.benchmark!r}; choose one of {choices}")
    if args.final_repeats < 0:
        raise SystemExit(f"error: --final-repeats must be >= 0 (0: no final evaluation), got {args.final_repeats}")
    budget = {"minutes": args.minutes, "frames": args.frames}
    budget_name = f"{args.minutes:g}min" if args.minutes is not None else f"{args.frames}frames"
    out = args.out or REPO / "benchmarks" / "results" / "learning" / f"{args.benchmark}_{budget_name}"
    extra = [part for item in args.set for part in f"--{item.removeprefix('--')}".split("=", 1)]
    variants = [parse_variant(spec) for spec in args.variants]

    summaries, curves, results_by_variant = [], {}, {}
    for name, variant_args in variants:
        results = []
        for seed in args.seeds:
            command = fit_command(args.benchmark, variant_args, seed, budget, extra)
            work = args.work / out.name / name / f"seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            config = resolved_config(command, work)
            if args.frames is not None:  # whole epochs (Lightning counts optimizer steps, not batches)
                epochs = -(-args.frames // frames_per_epoch(config))
                command += ["--trainer.max_epochs", str(epochs)]
                config["trainer"]["max_epochs"] = epochs
            result_file = out / name / f"seed{seed}.json"
            if args.summarize_only and not result_file.is_file():
                continue
            trained = not result_file.is_file()
            if not trained:
                result = json.loads(result_file.read_text())
                if not same_config(without_output_keys(result["config"]), without_output_keys(config)):
                    raise SystemExit(
                        f"error: {result_file} was made with another config for {name!r}; pass another --out"
                    )
                print(f"[learning] {name} seed {seed}: done before ({result_file})", file=sys.stderr)
            else:
                result = run_one(name, command, config, seed, work, result_file)
            if args.final_repeats > 0 and "final_evaluation" not in result and not args.summarize_only:
                result = add_final_evaluation(result, work, args.final_repeats, result_file)
            if trained and not args.keep_runs:
                shutil.rmtree(work / "runs", ignore_errors=True)
            results.append(result)
        if not results:
            raise SystemExit(f"error: no result files for {name!r} in {out}")
        summary, curve = summarize(name, results, budget, args.target)
        summaries.append(summary)
        curves[name] = curve
        results_by_variant[name] = results

    # Every other variant against the first: difference of the final success means, Welch 95 % interval.
    reference = summaries[0]
    for summary in summaries[1:]:
        ours, theirs = summary["final_success_per_seed"], reference["final_success_per_seed"]
        summary[f"minus_{reference['variant']}"] = {
            "final_success": float(np.mean(ours) - np.mean(theirs)),
            "ci95": difference_half_width(ours, theirs),
        }
    seeds = sorted({seed for summary in summaries for seed in summary["seeds"]})
    title = f"{args.benchmark}: held-out success, seeds {seeds}, budget {budget_name}"
    report = {"benchmark": args.benchmark, "budget": budget, "machine": machine(), "variants": summaries}
    (out / "learning.json").write_text(json.dumps({**report, "curves": curves}, indent=1))
    plot(out / "learning.png", curves, title)
    if has_classes(results_by_variant):
        plot_per_class(out / "per_class.png", results_by_variant, f"{args.benchmark}: success per task class")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
