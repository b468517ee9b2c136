"""``benchmarks/learning.py`` on a tiny point-robot budget: real CLI runs, result files, resume, summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark script, not the product: about 2 minutes of CLI runs, in CI's slow run.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "learning.py"
TINY = [
    "data.num_envs=4",
    "data.iterations_per_epoch=1",
    "data.benchmark.init_args.episode_length=10",
    "data.benchmark.init_args.episodes_per_trial=2",
    "data.benchmark.init_args.num_goals=8",
    "meta_test.num_trials=4",
    "meta_test.num_envs=4",
    "model.encoder.init_args.num_episodes=2",
    "model.encoder.init_args.window=4",
    "model.encoder.init_args.d_model=16",
    "model.encoder.init_args.num_heads=2",
    "model.encoder.init_args.intra_layers=1",
    "model.encoder.init_args.ff_dim=16",
    "model.ppo_epochs=1",
    "model.episodes_per_minibatch=4",
]
FRAMES_PER_EPOCH = 4 * 10 * 2  # num_envs x L x K, one iteration per epoch


def run_benchmark(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--benchmark", "point_robot", "--variants", "htrmrl"]
    command += ["--frames", str(3 * FRAMES_PER_EPOCH), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    command += ["--set", *TINY, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_learning_benchmark_writes_results_and_resumes(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work" / "out" / "htrmrl"
    first = run_benchmark(tmp_path, "--seeds", "0", "--final-repeats", "0", "--keep-runs")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    (variant,) = summary["variants"]
    for key in ("variant", "seeds", "budget", "final_success_mean", "final_success_ci95", "minutes_to_0.8"):
        assert key in variant, f"{key} missing from the JSON line"
    assert variant["seeds"] == [0] and variant["budget"]["frames"] == 3 * FRAMES_PER_EPOCH
    assert variant["final_success_from"] == "last in-training evaluation"
    assert variant["final_frames_mean"] == 3 * FRAMES_PER_EPOCH
    assert "machine" in summary
    result = json.loads((out / "htrmrl" / "seed0.json").read_text())
    evaluations = result["evaluations"]
    assert [e["frames"] for e in evaluations] == [FRAMES_PER_EPOCH * k for k in (1, 2, 3)]
    assert all(e["minutes"] > 0 and e["success_ci95"] is not None for e in evaluations)
    assert [e["minutes"] for e in evaluations] == sorted(e["minutes"] for e in evaluations)
    assert len(evaluations[-1]["success_per_episode"]) == 2
    assert result["config"]["seed_everything"] == 0 and result["config"]["data"]["seed"] == 0
    assert result["command"][:4] == ["lightning_htrmrl", "fit", "--config", "conf/base.yaml"]  # repository-relative
    assert "final_evaluation" not in result

    # A finished run is not trained again; its kept run folder gives it the final evaluation
    # (3 x the 4 trials of one evaluation, the final weights); the new seed trains and is evaluated.
    second = run_benchmark(tmp_path, "--seeds", "0", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "htrmrl seed 0: done before" in second.stderr
    for seed in (0, 1):
        result = json.loads((out / "htrmrl" / f"seed{seed}.json").read_text())
        assert result["config"]["seed_everything"] == seed
        final = result["final_evaluation"]
        assert final["num_trials"] == 12 and final["frames"] == 3 * FRAMES_PER_EPOCH
        assert 0.0 <= final["success"] <= 1.0 and len(final["success_per_episode"]) == 2
    assert json.loads((out / "htrmrl" / "seed0.json").read_text())["evaluations"] == evaluations
    assert (work / "seed0" / "runs").is_dir() and not (work / "seed1" / "runs").exists()
    (variant,) = json.loads(second.stdout.strip().splitlines()[-1])["variants"]
    assert variant["seeds"] == [0, 1] and variant["final_success_from"] == "final evaluation, 12 trials"
    assert 0.0 <= variant["final_success_mean"] <= 1.0 and variant["final_success_ci95"] >= 0.0
    assert len(variant["final_success_per_episode"]) == 2
    report = json.loads((out / "learning.json").read_text())
    assert set(report["curves"]["htrmrl"]) == {"frames", "minutes"}
    assert (out / "learning.png").stat().st_size > 0

    # Summarising trains nothing: the seeds with result files are summarised.
    summary_only = run_benchmark(tmp_path, "--seeds", "0", "1", "2", "--summarize-only")
    assert summary_only.returncode == 0, summary_only.stderr[-3000:]
    assert json.loads(summary_only.stdout.strip().splitlines()[-1])["variants"][0]["seeds"] == [0, 1]
    assert not (out / "htrmrl" / "seed2.json").exists()

    # Results made with another config are never mixed in.
    third = run_benchmark(tmp_path, "--seeds", "0", "--set", "model.ppo_epochs=2")
    assert third.returncode != 0
    assert "another config" in third.stderr


def test_an_interrupted_run_continues_from_its_last_checkpoint(tmp_path: Path) -> None:
    """The benchmark stopped (SIGTERM) after the first epoch's checkpoint: started again, the run
    resumes from it instead of starting over, and its curve joins both parts."""
    import signal
    import time

    command = [sys.executable, str(SCRIPT), "--benchmark", "point_robot", "--variants", "htrmrl", "--seeds", "0"]
    epoch = 64 * 10 * 2  # 64 slots
    command += ["--frames", str(12 * epoch), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    command += ["--final-repeats", "0", "--set", *TINY, "data.num_envs=64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    work = tmp_path / "work" / "out" / "htrmrl" / "seed0"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not list(work.glob("runs/*/version_0/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert not (tmp_path / "out" / "htrmrl" / "seed0.json").exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--ckpt_path" in again.stderr and "last.ckpt" in again.stderr
    frames = [e["frames"] for e in json.loads((tmp_path / "out" / "htrmrl" / "seed0.json").read_text())["evaluations"]]
    assert frames == [epoch * k for k in range(1, 13)]  # the evaluations of both parts, each once
