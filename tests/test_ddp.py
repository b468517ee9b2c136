"""Real 2-process DDP runs (gloo on CPU), each in its own subprocess so ports and env vars do not leak."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import CONF, CONFIGS, TINY

DDP_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
DDP = ["--config", str(CONF / "trainer" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DDP_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return env


def _fit(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _metrics(run_root: Path) -> list[dict[str, str]]:
    (path,) = run_root.glob("runs/htrmrl/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def _check_ddp_run(rows: list[dict[str, str]], frames_per_batch: int) -> None:
    spread = _column(rows, "ddp/weight_spread")
    assert spread and max(spread) == 0.0, f"weights differ across processes: {spread}"
    identical = _column(rows, "ddp/identical_task_fraction")
    assert identical and identical[0] < 1.0, "both processes collected the same tasks"
    frames = _column(rows, "train/frames")
    # Frames count both processes: the configured meta-batch is split, the total is unchanged.
    assert frames[:2] == [frames_per_batch, 2 * frames_per_batch]
    assert _column(rows, "meta_test/success"), "meta-test evaluation was not reduced and logged"


def test_two_process_point_robot_fit_stays_in_sync(tmp_path: Path) -> None:
    args = [
        *CONFIGS,
        *TINY,
        *DDP,
        "--trainer.max_epochs",
        "2",
        "--data.num_envs",
        "8",
        "--data.iterations_per_epoch",
        "2",
    ]
    result = _fit(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ddp_run(_metrics(tmp_path), frames_per_batch=8 * 10 * 2)


def test_two_process_ml1_reach_fit_stays_in_sync(tmp_path: Path) -> None:
    args = [
        "--config", str(CONF / "base.yaml"),
        "--config", str(CONF / "benchmark" / "ml1_reach.yaml"),
        "--config", str(CONF / "model" / "htrmrl.yaml"),
        *TINY[: TINY.index("--data.benchmark.init_args.num_goals")],
        *TINY[TINY.index("--model.encoder.init_args.num_episodes"):],
        *DDP,
        "--data.num_envs", "2", "--data.num_collectors", "1", "--data.iterations_per_epoch", "2",
        "--meta_test.num_trials", "2", "--meta_test.every_n_epochs", "1",
    ]  # fmt: skip
    result = _fit(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ddp_run(_metrics(tmp_path), frames_per_batch=2 * 10 * 2)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def _local_rank(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"LOCAL_RANK="):
            return item.split(b"=", 1)[1].decode()
    return None


def test_killing_one_rank_ends_the_job_nonzero(tmp_path: Path) -> None:
    args = [*CONFIGS, *TINY, *DDP, "--trainer.max_epochs", "1000", "--data.num_envs", "8"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *args],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        rank1 = None
        while rank1 is None and time.monotonic() < deadline and process.poll() is None:
            rank1 = next((pid for pid in _children(process.pid) if _local_rank(pid) == "1"), None)
            time.sleep(0.5)
        assert rank1 is not None, "rank 1 never started"
        # Let both ranks reach training (the run directory exists once the loggers are set up).
        while not list(tmp_path.glob("runs/htrmrl/version_*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = process.wait(timeout=180)
        assert returncode != 0
        assert time.monotonic() - killed_at < 180
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            pytest.fail("the job kept running after one rank died")
