"""Runs used the way people use them, through the CLI: ``--ckpt_path last/best``,
``--trainer.default_root_dir``, Ctrl-C and SIGTERM with collector processes, non-finite training,
and a fixed seed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_cli import CONFIGS, TINY, run_cli

FRAMES_PER_BATCH = 4 * 2 * 10  # TINY: 4 slots x one trial of 2 episodes x 10 steps


def _metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _frames(run: Path) -> list[float]:
    return [float(row["train/frames"]) for row in _metrics(run) if row.get("train/frames")]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_default_root_dir_and_ckpt_path_last_and_best(tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    # Everything a run writes lands under --trainer.default_root_dir; ./runs is not created.
    result, _ = run_cli(
        ["fit", *CONFIGS, *TINY, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root)], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
    first = root / "htrmrl" / "version_0"
    for name in ("metrics.csv", "config.yaml", "meta_test.json", "adaptation_curve.png", "checkpoints/last.ckpt"):
        assert (first / name).is_file(), name
    assert list(first.glob("events.out.tfevents.*")) and list(first.glob("checkpoints/best-*.ckpt"))
    saved_frames = _frames(first)[-1]

    # `last` is the newest last.ckpt of this run name: training continues from its frame count.
    resume = ["fit", *CONFIGS, *TINY, "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root)]
    result, _ = run_cli([*resume, "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ckpt_path last: {first / 'checkpoints' / 'last.ckpt'}" in result.stderr
    resumed = root / "htrmrl" / "version_1"
    assert _frames(resumed) == [saved_frames + FRAMES_PER_BATCH], "resumed from scratch instead of the checkpoint"

    # ... and after that resume, the resumed run's checkpoint is the newest.
    result, _ = run_cli([*resume, "--trainer.max_epochs", "4", "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ckpt_path last: {resumed / 'checkpoints' / 'last.ckpt'}" in result.stderr
    assert _frames(root / "htrmrl" / "version_2") == [saved_frames + 2 * FRAMES_PER_BATCH]

    # `best` evaluates the newest best checkpoint by held-out success.
    result, _ = run_cli(
        ["test", *CONFIGS, *TINY, "--trainer.default_root_dir", str(root), "--ckpt_path", "best"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (best,) = (root / "htrmrl" / "version_2" / "checkpoints").glob("best-*.ckpt")
    assert f"ckpt_path best: {best}" in result.stderr
    assert (root / "htrmrl" / "version_3" / "meta_test.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_non_finite_training_stops_with_one_error_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    args = ["fit", *CONFIGS, *TINY, "--trainer.max_epochs", "3", "--data.iterations_per_epoch", "3"]
    result, _ = run_cli([*args, "--model.optimizer.init_args.lr", "1e12"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    (error,) = _error_lines(result.stderr)
    assert "step " in error and "frame " in error and ("train/loss" in error or "weights" in error), error
    for checkpoint in tmp_path.rglob("*.ckpt"):
        weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(value).all() for value in weights.values()), checkpoint


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# The embedded default (ML1 reach-v3, 2 collector processes), shrunk.
ML1_TINY = [
    *TINY[: TINY.index("--data.benchmark.init_args.num_goals")],
    *TINY[TINY.index("--model.encoder.init_args.num_episodes") :],
    "--data.num_envs", "2", "--data.iterations_per_epoch", "2", "--meta_test.num_trials", "2",
]  # fmt: skip


@pytest.mark.parametrize(
    ("sent", "to_group", "exit_code"),
    [pytest.param(signal.SIGINT, True, 1, marks=pytest.mark.slow), (signal.SIGTERM, False, 143)],
    ids=["ctrl_c_to_the_process_group", "sigterm_to_the_main_process"],
)
def test_interrupt_with_collector_processes_exits_cleanly_and_resumes(
    tmp_path: Path, sent: signal.Signals, to_group: bool, exit_code: int
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *ML1_TINY, "--trainer.max_epochs", "1000"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    last = tmp_path / "runs/htrmrl/version_0/checkpoints/last.ckpt"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            if last.is_file() and len(_children(process.pid)) >= 2:
                break
        assert last.is_file(), "no checkpoint within 4 minutes"
        children = _children(process.pid)
        assert len(children) >= 2, "the collector processes are not running"
        time.sleep(1.0)  # somewhere inside the next batch
        os.killpg(process.pid, sent) if to_group else process.send_signal(sent)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the run did not exit within 60 s of the signal")
    assert process.returncode == exit_code, stderr[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "collector processes were left behind"
    # The checkpoint it had is intact, and `--ckpt_path last` resumes from it.
    saved = torch.load(last, map_location="cpu", weights_only=False)
    saved_frames = float(saved["state_dict"]["frames"])
    result, _ = run_cli(
        ["fit", *ML1_TINY, "--trainer.max_epochs", str(saved["epoch"] + 2), "--ckpt_path", "last"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _frames(tmp_path / "runs/htrmrl/version_1")[0] == saved_frames + FRAMES_PER_BATCH  # 2 processes x 2 slots


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path: Path) -> None:
    """Same seed and config, one process (with 2 collector processes): the same losses and held-out
    success, bitwise; another seed: other values. Times (``time/*``) differ, by nature."""
    args = ["fit", *CONFIGS, *TINY, "--data.num_collectors", "2", "--data.iterations_per_epoch", "2"]
    compared = (
        "train/loss_objective",
        "train/loss_critic",
        "train/kl_approx",
        "meta_test/success",
        "meta_train/success",
    )

    def figures(seed: int, folder: str) -> dict[str, list[str]]:
        result, _ = run_cli([*args, "--seed_everything", str(seed), "--data.seed", str(seed)], tmp_path / folder)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = _metrics(tmp_path / folder / "runs/htrmrl/version_0")
        return {key: [row[key] for row in rows if row.get(key)] for key in compared}

    first, again, other = figures(0, "a"), figures(0, "b"), figures(1, "c")
    assert all(first[key] for key in compared), first
    assert first == again
    assert first != other
