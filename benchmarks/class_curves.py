"""Success per task class against frames (ML10, ML45): training batches and held-out evaluations.

``benchmarks/learning.py`` writes ``<out>/per_class.png`` with these curves when its runs log
success per class. This script draws them again from a results folder, or from the run folders of
runs still in progress (``--work``: the ``<work>/<out name>`` folder learning.py trains in), and
prints one JSON line with each variant's latest figures per class::

    python benchmarks/class_curves.py benchmarks/results/learning/ml10_10137600frames
    python benchmarks/class_curves.py benchmarks/results/learning/ml10_10137600frames \\
        --work ~/htrmrl_runs/ml10_10137600frames --png /tmp/ml10_in_progress.png
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

# Each training batch holds a few trials per class (ML10: 32 trials over 10 classes), so the
# training curves are a running mean over this many batches (ML10: 307,200 frames, 2 epochs).
TRAIN_BATCHES_PER_POINT = 12


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values that are not NaN at each point (NaN: class not in that batch)."""
    present = ~np.isnan(values)
    sums = np.cumsum(np.where(present, values, 0.0))
    counts = np.cumsum(present)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def class_curves(results: list[dict], key: str, window: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Success per class against frames, the mean over seeds.

    Args:
        results: result files of one variant (``learning.py``'s ``<variant>/seed<S>.json``), each with
            ``success_per_class`` in its ``key`` entries.
        key: ``"evaluations"`` (held-out tasks) or ``"meta_train"`` (training batches).
        window: running mean over this many entries of each seed before averaging over seeds.

    Returns:
        ``{class: (frames [F], success [F])}`` over the frames any seed has; NaN where no seed has
        the class yet.
    """
    frames = np.array(sorted({entry["frames"] for r in results for entry in r[key]}), dtype=float)
    classes = sorted({name for r in results for entry in r[key] for name in entry.get("success_per_class", {})})
    curves = {}
    for name in classes:
        seeds = np.full((len(results), len(frames)), np.nan)
        for row, result in enumerate(results):
            at = np.searchsorted(frames, [entry["frames"] for entry in result[key]])
            values = np.array([entry.get("success_per_class", {}).get(name, np.nan) for entry in result[key]])
            seeds[row, at] = running_mean(values.astype(float), window)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # frames no seed has for this class stay NaN
            curves[name] = (frames, np.nanmean(seeds, axis=0))
    return curves


def latest(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Each class's last value that is not NaN."""
    last = {}
    for name, (_, success) in curves.items():
        known = success[~np.isnan(success)]
        if len(known):
            last[name] = round(float(known[-1]), 3)
    return last


def plot_per_class(path: Path, results: dict[str, list[dict]], title: str) -> None:
    """One row per variant: training batches (left, running mean) and held-out tasks (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(14, 3.6 * len(results)), squeeze=False, layout="constrained")
    panels = (("meta_train", TRAIN_BATCHES_PER_POINT, "training batches"), ("evaluations", 1, "held-out tasks"))
    for row, (variant, variant_results) in enumerate(results.items()):
        seeds = ", ".join(str(r["seed"]) for r in variant_results)
        for axis, (key, window, label) in zip(axes[row], panels):
            curves = class_curves(variant_results, key, window)
            for name, (frames, success) in curves.items():
                axis.plot(frames, success, label=name)
            smoothing = f", running mean of {window} batches" if window > 1 else ""
            axis.set_title(f"{variant} (seeds {seeds}): {label}{smoothing}", fontsize=10)
            axis.set_ylim(-0.02, 1.02)
            axis.grid(alpha=0.3)
            axis.set_ylabel("success")
            if len(curves) <= 12:  # ML45's 45 training classes: no legend
                axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        axes[row][0].set_xlabel("env frames")
        axes[row][1].set_xlabel("env frames")
    figure.suptitle(title)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def has_classes(results: dict[str, list[dict]]) -> bool:
    return any("success_per_class" in e for rs in results.values() for r in rs for e in r["evaluations"])


def load_results(out: Path, work: Path | None) -> dict[str, list[dict]]:
    """``{variant: [result per seed]}`` from ``out``'s result files and, with ``work``, the run folders
    of seeds without one (runs in progress)."""
    results: dict[str, list[dict]] = {}
    for file in sorted(out.glob("*/seed*.json")):
        results.setdefault(file.parent.name, []).append(json.loads(file.read_text()))
    if work is not None:
        from learning import read_curves  # this folder's script

        for runs in sorted(work.glob("*/seed*/runs")):
            variant, seed = runs.parent.parent.name, int(runs.parent.name.removeprefix("seed"))
            if any(r["seed"] == seed for r in results.get(variant, [])):
                continue
            if list(runs.glob("*/version_*/metrics.csv")):
                results.setdefault(variant, []).append({"seed": seed, **read_curves(runs)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a learning.py results folder (<out>/<variant>/seed<S>.json)")
    parser.add_argument("--work", type=Path, default=None, help="runs in progress: learning.py's <work>/<out name>")
    parser.add_argument("--png", type=Path, default=None, help="picture to write (default <out>/per_class.png)")
    args = parser.parse_args()
    results = load_results(args.out, args.work)
    if not has_classes(results):
        raise SystemExit(f"error: no success per class in {args.out} (or --work): ML10 / ML45 runs log it")
    plot_per_class(args.png or args.out / "per_class.png", results, f"{args.out.name}: success per task class")
    report = {}
    for variant, variant_results in results.items():
        report[variant] = {
            "seeds": [r["seed"] for r in variant_results],
            "frames": max(r["evaluations"][-1]["frames"] for r in variant_results),
            "held_out": latest(class_curves(variant_results, "evaluations")),
            "training": latest(class_curves(variant_results, "meta_train", TRAIN_BATCHES_PER_POINT)),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
