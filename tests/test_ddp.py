"""Real 2-process DDP runs (gloo on CPU), each in its own subprocess so ports and env vars do not leak."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import CONF, CONFIGS, REPO, TINY, stop_with_sigterm
from tests.test_readme import readme_commands

DDP_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
DDP = ["--config", str(CONF / "trainer" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(port: int | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DDP_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port or _free_port()), PYTHONPATH=str(REPO))  # fmt: skip
    return env


def _htrmrl(args: list[str], cwd: Path, subcommand: str = "fit", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_htrmrl", subcommand, *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _fit(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return _htrmrl(args, cwd, "fit", timeout)


def _metrics(run_root: Path, version: str = "*") -> list[dict[str, str]]:
    (path,) = run_root.glob(f"runs/htrmrl/{version}/metrics.csv")
    return list(csv.DictReader(path.open()))


def _meta_test(run_root: Path, version: str) -> dict:
    return json.loads((run_root / "runs" / "htrmrl" / version / "meta_test.json").read_text())


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


# The point robot's 20 held-out goals (40 goals), at the tiny sizes.
POINT_ROBOT_20_GOALS = [*CONFIGS, *TINY, "--data.benchmark.init_args.num_goals", "40",
                        "--meta_test.num_trials", "20", "--meta_test.num_envs", "10"]  # fmt: skip


def _ddp(processes: int) -> list[str]:
    return [*DDP[:-4], "--trainer.devices", str(processes), "--trainer.accelerator", "cpu"]


@pytest.mark.slow
def test_three_processes_with_uneven_shares_train_in_sync_and_evaluate_each_goal_once(tmp_path: Path) -> None:
    """8 slots over 3 processes (3, 3, 2): frames count the 8 slots, the weights stay identical, every
    held-out goal is evaluated once; the final checkpoint evaluated with 1 and with 3 processes gives
    the same per-task results."""
    args = [*POINT_ROBOT_20_GOALS, *_ddp(3), "--trainer.max_epochs", "2", "--data.num_envs", "8",
            "--data.iterations_per_epoch", "2"]  # fmt: skip
    result = _fit(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ddp_run(_metrics(tmp_path, "version_0"), frames_per_batch=8 * 10 * 2)
    fitted = _meta_test(tmp_path, "version_0")
    assert fitted["num_trials"] == 20 and len(fitted["per_task"]) == 20
    assert set(fitted["trials_per_task"].values()) == {1}
    checkpoint = str(tmp_path / "runs" / "htrmrl" / "version_0" / "checkpoints" / "last.ckpt")
    evaluate = [*POINT_ROBOT_20_GOALS, "--ckpt_path", checkpoint]
    one = _htrmrl([*evaluate, "--trainer.devices", "1"], tmp_path, "validate")
    assert one.returncode == 0, one.stderr[-3000:]
    three = _htrmrl([*evaluate, *_ddp(3)], tmp_path, "validate")
    assert three.returncode == 0, three.stderr[-3000:]
    single, spread = _meta_test(tmp_path, "version_1"), _meta_test(tmp_path, "version_2")
    assert single["trials_per_task"] == spread["trials_per_task"] == fitted["trials_per_task"]
    assert single["per_task"] == pytest.approx(spread["per_task"], abs=1e-6)
    assert single["per_task"] == pytest.approx(fitted["per_task"], abs=1e-6)  # the weights of the last evaluation
    assert single["success_per_episode"] == pytest.approx(spread["success_per_episode"], abs=1e-6)


@pytest.mark.slow
def test_four_processes_on_ml1_with_more_processes_than_evaluation_parts(tmp_path: Path) -> None:
    """ML1 reach at tiny sizes, 6 slots over 4 processes (2, 2, 1, 1); the 6 held-out trials are 3
    parts of 2 slots, so one process evaluates nothing and the means are still those of the 6."""
    args = [
        "--config", str(CONF / "base.yaml"),
        "--config", str(CONF / "benchmark" / "ml1_reach.yaml"),
        "--config", str(CONF / "model" / "htrmrl.yaml"),
        *TINY[: TINY.index("--data.benchmark.init_args.num_goals")],
        *TINY[TINY.index("--model.encoder.init_args.num_episodes"):],
        *_ddp(4),
        "--data.num_envs", "6", "--data.num_collectors", "1", "--data.iterations_per_epoch", "2",
        "--meta_test.num_trials", "6", "--meta_test.num_envs", "2", "--meta_test.num_workers", "1",
    ]  # fmt: skip
    result = _fit(args, tmp_path, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ddp_run(_metrics(tmp_path), frames_per_batch=6 * 10 * 2)
    results = _meta_test(tmp_path, "version_0")
    assert sum(results["trials_per_task"].values()) == 6 and set(results["trials_per_task"].values()) == {1}


TINY_SIZES = [*TINY[TINY.index("--data.benchmark.init_args.episode_length"):][:4],
              *TINY[TINY.index("--model.encoder.init_args.num_episodes"):]]  # fmt: skip
TINY_TRAINING = [*TINY_SIZES, "--trainer.max_epochs", "2", "--data.iterations_per_epoch", "2"]


def _absolute(words: list[str]) -> list[str]:
    return [str(REPO / word) if word.startswith("conf/") else word for word in words]


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["ml10", "point_robot"])
def test_the_readme_ddp_commands_run_as_written(tmp_path: Path, benchmark: str) -> None:
    """Each ``htrmrl fit ... conf/trainer/ddp.yaml`` command of the README, on the CPU at tiny sizes,
    one collector per process (ML10 over 4 processes: 10 slots shared 3, 3, 2, 2)."""
    commands = [words for words in readme_commands("htrmrl") if "conf/trainer/ddp.yaml" in words]
    assert len(commands) == 2
    (words,) = [words for words in commands if f"conf/benchmark/{benchmark}.yaml" in words]
    tiny = [*TINY_TRAINING, "--trainer.accelerator", "cpu", "--data.num_collectors", "1",
            "--meta_test.num_workers", "1"]  # fmt: skip
    if benchmark == "ml10":  # uneven shares; 20 of the 250 held-out tasks
        tiny += ["--data.num_envs", "10", "--meta_test.num_trials", "20", "--meta_test.num_envs", "10"]
    result = _htrmrl([*_absolute(words[2:]), *tiny], tmp_path, words[1], timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    num_envs = {"ml10": 10, "point_robot": 64}[benchmark]
    assert int(words[words.index("--trainer.devices") + 1]) > 1
    rows = _metrics(tmp_path)
    assert _column(rows, "train/frames")[:2] == [num_envs * 20, 2 * num_envs * 20]
    assert max(_column(rows, "ddp/weight_spread")) == 0.0
    results = _meta_test(tmp_path, "version_0")
    assert sum(results["trials_per_task"].values()) == results["num_trials"]
    if benchmark == "ml10":  # success per class, training (all 10 classes, over all processes) and held-out
        train_columns = {key for key in rows[0] if key.startswith("meta_train/success_class/")}
        assert 5 <= len(train_columns) <= 10 and all(key.endswith("-v3") for key in train_columns)  # 40 trials drawn
        assert all(0.0 <= value <= 1.0 for key in train_columns for value in _column(rows, key))
        held_out = {name: _column(rows, f"meta_test/success_class/{name}")[-1] for name in results["per_class"]}
        assert len(held_out) > 1 and held_out == pytest.approx(results["per_class"])


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_in_sync_into_one_run_folder(tmp_path: Path) -> None:
    """The README's two-node command, run twice on this machine (node ranks 0 and 1, one gloo process
    each), at tiny sizes."""
    (words,) = readme_commands("torchrun")
    port = _free_port()
    module = words.index("-m")
    launcher = [word if word != "29500" else str(port) for word in words[1:module]]
    config = _absolute(words[module + 2 :])
    args = [*config, *TINY_TRAINING, "--data.benchmark.init_args.num_goals", "40",
            "--meta_test.num_trials", "20", "--meta_test.num_envs", "10", "--data.num_envs", "8"]  # fmt: skip

    def node(rank: int) -> list[str]:
        at = launcher.index("--node_rank") + 1
        return [*launcher[:at], str(rank), *launcher[at + 1 :]]

    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *node(rank), "-m", "lightning_htrmrl", *args],
            cwd=tmp_path, env=_env(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        errors = [process.communicate(timeout=300)[1] for process in nodes]
    finally:
        for process in nodes:
            process.kill()
    assert [process.returncode for process in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert [p.name for p in (tmp_path / "runs" / "htrmrl").iterdir()] == ["version_0"]
    _check_ddp_run(_metrics(tmp_path), frames_per_batch=8 * 10 * 2)
    assert set(_meta_test(tmp_path, "version_0")["trials_per_task"].values()) == {1}


def _expected_tasks(rank: int, world_size: int, num_envs: int, trial: int) -> list[int]:
    """The tasks process ``rank``'s slots draw at their ``trial``-th trial (data.seed 0, tiny point robot)."""
    import numpy as np

    from lightning_htrmrl.data import make_train_env
    from lightning_htrmrl.envs import PointRobot

    benchmark = PointRobot(episode_length=10, episodes_per_trial=2, num_goals=40)
    seed = int(np.random.SeedSequence([0, rank, 0]).generate_state(1)[0])
    slots = num_envs // world_size + (rank < num_envs % world_size)
    return make_train_env(benchmark, slots, seed, trial).reset()["task_id"].tolist()


@pytest.mark.slow
def test_two_processes_stopped_by_sigterm_resume_their_frames_and_task_sequences(tmp_path: Path) -> None:
    batch_frames = 8 * 10 * 2
    args = [*POINT_ROBOT_20_GOALS, *_ddp(2), "--data.num_envs", "8", "--data.iterations_per_epoch", "1",
            "--trainer.callbacks+=tests.task_log.TaskLog"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *args, "--trainer.max_epochs", "1000"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last = tmp_path / "runs" / "htrmrl" / "version_0" / "checkpoints" / "last.ckpt"
    log = tmp_path / "tasks_rank1.jsonl"
    stderr = stop_with_sigterm(process, lambda: last.exists() and len(log.read_text().splitlines()) >= 3)
    assert process.returncode == 143, stderr[-3000:]
    assert "resume with --ckpt_path last" in stderr
    import torch

    stopped = torch.load(last, map_location="cpu", weights_only=False)
    frames, epoch = int(stopped["state_dict"]["frames"]), stopped["epoch"]
    assert frames >= 2 * batch_frames
    result = _fit([*args, "--trainer.max_epochs", str(epoch + 2), "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _column(_metrics(tmp_path, "version_1"), "train/frames")
    assert resumed[0] == frames + batch_frames
    for rank in (0, 1):
        batches = [json.loads(line) for line in (tmp_path / f"tasks_rank{rank}.jsonl").read_text().splitlines()]
        after = [b for b in batches if b["frames"] == frames + batch_frames][-1]  # the resumed run's first
        assert after["tasks"] == _expected_tasks(rank, 2, 8, frames // batch_frames)
        assert batches[0]["tasks"] == _expected_tasks(rank, 2, 8, 0)
