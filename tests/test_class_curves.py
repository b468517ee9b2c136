"""``benchmarks/class_curves.py``: success per task class against frames from learning result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from class_curves import class_curves, latest, running_mean  # noqa: E402


def result(seed: int, train: list[dict], test: list[dict]) -> dict:
    """A result file's per-class entries as ``learning.py`` writes them (frames 100, 200, ...)."""
    return {
        "seed": seed,
        "meta_train": [{"frames": 100 * (i + 1), "success_per_class": c} for i, c in enumerate(train)],
        "evaluations": [{"frames": 200 * (i + 1), "success": 0.0, "success_per_class": c} for i, c in enumerate(test)],
    }


def test_running_mean_skips_batches_without_the_class() -> None:
    values = np.array([1.0, np.nan, 0.0, 0.0, np.nan, np.nan])
    np.testing.assert_allclose(running_mean(values, 2), [1.0, 1.0, 0.0, 0.0, 0.0, np.nan])
    np.testing.assert_allclose(running_mean(values, 1), values)


def test_class_curves_average_seeds_per_class() -> None:
    seed0 = result(0, [{"reach": 1.0, "push": 0.0}, {"reach": 0.0}], [{"door": 0.5}])
    seed1 = result(1, [{"reach": 0.0, "push": 1.0}, {"reach": 1.0, "push": 1.0}], [{"door": 1.0}])
    train = class_curves([seed0, seed1], "meta_train")
    assert sorted(train) == ["push", "reach"]
    frames, reach = train["reach"]
    np.testing.assert_allclose(frames, [100, 200])
    np.testing.assert_allclose(reach, [0.5, 0.5])
    np.testing.assert_allclose(train["push"][1], [0.5, 1.0])  # seed 0 had no push trial in batch 2
    smoothed = class_curves([seed0], "meta_train", window=2)
    np.testing.assert_allclose(smoothed["reach"][1], [1.0, 0.5])
    np.testing.assert_allclose(smoothed["push"][1], [0.0, 0.0])  # batch 1's push trial carries over batch 2
    held_out = class_curves([seed0, seed1], "evaluations")
    assert latest(held_out) == {"door": 0.75}


def test_script_draws_the_picture_and_prints_the_latest_figures(tmp_path: Path) -> None:
    out = tmp_path / "ml10_test"
    for seed in (0, 1):
        (out / "htrmrl").mkdir(parents=True, exist_ok=True)
        entries = result(seed, [{"reach": 0.2 * seed}] * 3, [{"door": 0.1}, {"door": 0.3 + 0.2 * seed}])
        (out / "htrmrl" / f"seed{seed}.json").write_text(json.dumps(entries))
    command = [sys.executable, str(REPO / "benchmarks" / "class_curves.py"), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["htrmrl"]["seeds"] == [0, 1] and report["htrmrl"]["frames"] == 400
    assert report["htrmrl"]["held_out"] == {"door": pytest.approx(0.4)}
    assert report["htrmrl"]["training"] == {"reach": pytest.approx(0.1)}
    assert (out / "per_class.png").stat().st_size > 0


def test_script_refuses_results_without_classes(tmp_path: Path) -> None:
    (tmp_path / "reach" / "htrmrl").mkdir(parents=True)
    plain = {"seed": 0, "meta_train": [{"frames": 100}], "evaluations": [{"frames": 100, "success": 0.5}]}
    (tmp_path / "reach" / "htrmrl" / "seed0.json").write_text(json.dumps(plain))
    command = [sys.executable, str(REPO / "benchmarks" / "class_curves.py"), str(tmp_path / "reach")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0 and "no success per class" in done.stderr
