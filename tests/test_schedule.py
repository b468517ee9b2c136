"""The learning-rate schedule follows the run's budget: epochs, wall-clock time, and across a resume."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_cli import CONFIGS, TINY, run_cli, stop_with_sigterm

BASE_LR = 1e-3


def _learning_rates(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as handle:
        return [float(row["train/lr"]) for row in csv.DictReader(handle) if row.get("train/lr")]


def test_the_schedule_ends_with_an_epoch_budget(tmp_path: Path) -> None:
    """2 epochs x 3 batches: the first batch initialises the input statistics, the 5 updates run at
    1, 3/4, 1/2, 1/4 and 0 x the base rate (point_robot.yaml's LinearToBudget, nothing to copy)."""
    args = ["fit", *CONFIGS, *TINY, "--data.iterations_per_epoch", "3", "--trainer.max_epochs", "2"]
    result, _ = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "htrmrl").iterdir()
    assert _learning_rates(run) == pytest.approx([BASE_LR * f for f in (1, 0.75, 0.5, 0.25, 0)], rel=1e-6, abs=1e-12)


def test_the_schedule_follows_a_time_budget(tmp_path: Path) -> None:
    """``--trainer.max_time`` well before ``max_epochs``: the rate falls with the elapsed training time."""
    args = ["fit", *CONFIGS, *TINY, "--data.iterations_per_epoch", "4", "--trainer.max_epochs", "10000",
            "--trainer.max_time", "00:00:00:15"]  # fmt: skip
    result, _ = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "htrmrl").iterdir()
    lrs = _learning_rates(run)
    assert len(lrs) >= 5
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[0] > 0.8 * BASE_LR and lrs[-1] < 0.25 * BASE_LR  # an epoch budget of 10,000 would barely move it


def test_a_resumed_run_continues_the_schedule(tmp_path: Path) -> None:
    """Stopped by SIGTERM after an epoch of 4 (3 batches each: 11 updates), resumed with
    ``--ckpt_path last``: the updates after the resume run at the rates of an uninterrupted run."""
    args = [*CONFIGS, *TINY, "--data.iterations_per_epoch", "3", "--trainer.max_epochs", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # Slow the batches down so that the stop lands before the end of the run.
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *args, "--data.num_envs", "64"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last = tmp_path / "runs" / "htrmrl" / "version_0" / "checkpoints" / "last.ckpt"
    stderr = stop_with_sigterm(process, last.exists, timeout=180)
    assert process.returncode == 143, stderr[-3000:]
    done = int(torch.load(last, map_location="cpu", weights_only=False)["state_dict"]["ppo_updates"])
    assert 2 <= done < 11
    result, _ = run_cli(["fit", *args, "--data.num_envs", "64", "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _learning_rates(tmp_path / "runs" / "htrmrl" / "version_1")
    assert resumed == pytest.approx([BASE_LR * (1 - u / 10) for u in range(done, 11)], rel=1e-6, abs=1e-12)
