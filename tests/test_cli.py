"""The ``htrmrl`` CLI, each run in its own process (``python -m lightning_htrmrl``)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CONFIGS = [
    "--config", str(CONF / "base.yaml"),
    "--config", str(CONF / "benchmark" / "point_robot.yaml"),
    "--config", str(CONF / "model" / "htrmrl.yaml"),
]  # fmt: skip
TINY = [
    "--trainer.max_epochs", "1",
    "--data.iterations_per_epoch", "1",
    "--data.num_envs", "4",
    "--data.benchmark.init_args.episode_length", "10",
    "--data.benchmark.init_args.episodes_per_trial", "2",
    "--data.benchmark.init_args.num_goals", "8",
    "--model.encoder.init_args.num_episodes", "2",
    "--model.encoder.init_args.window", "4",
    "--model.encoder.init_args.d_model", "16",
    "--model.encoder.init_args.num_heads", "2",
    "--model.encoder.init_args.intra_layers", "1",
    "--model.encoder.init_args.ff_dim", "16",
    "--model.encoder.init_args.state_embedding_dim", "8",
    "--model.actor_hidden", "[16]",
    "--model.critic_hidden", "[16]",
    "--model.ppo_epochs", "1",
    "--model.episodes_per_minibatch", "4",
]  # fmt: skip


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m lightning_htrmrl ARGS`` in its own process; returns (result, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lightning_htrmrl", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.perf_counter() - start


def stop_with_sigterm(process: subprocess.Popen, ready, timeout: float = 240) -> str:
    """Wait until ``ready()`` (or ``timeout`` s), send SIGTERM, wait for the exit; returns stderr."""
    try:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        return process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------- fit
def test_tiny_fit_writes_metrics(tmp_path: Path) -> None:
    # two batches so that time/fps and time/collect_s (measured between batches) are logged too
    args = ["fit", *CONFIGS, *TINY, "--data.iterations_per_epoch", "2"]
    result, _ = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((tmp_path / "runs").rglob("metrics.csv"))
    assert len(files) == 1, files
    with files[0].open() as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    expected = [
        "train/frames",
        "time/fps",
        "time/collect_s",
        "time/update_s",
        "meta_test/success",
        "meta_test/success_ep1",
        "meta_test/success_ep2",
        "meta_test/return_ep1",
        "meta_test/return_ep2",
        "meta_train/success",
        "train/loss_objective",
        "train/loss_critic",
        "train/clip_fraction",
        "train/kl_approx",
        "train/ESS",
        "train/explained_variance",
    ]
    missing = [key for key in expected if key not in columns]
    assert not missing, f"missing metrics {missing}; got {sorted(columns)}"
    for key in expected:
        assert any(row[key] not in ("", None) for row in rows), f"{key} never logged"
    frames = [float(row["train/frames"]) for row in rows if row["train/frames"]]
    assert frames == [4 * 2 * 10, 2 * 4 * 2 * 10]  # M * K * L frames per batch, x-axis in env frames
    # the wall time of an iteration splits into waiting for the collector and the PPO update
    (timed,) = [row for row in rows if row["time/fps"]]
    iteration_s = float(timed["time/collect_s"]) + float(timed["time/update_s"])
    assert float(timed["time/fps"]) == pytest.approx(4 * 2 * 10 / iteration_s, rel=1e-3)
    assert list((tmp_path / "runs").rglob("*.ckpt")), "no checkpoint written"


def test_lr_schedule_steps_once_per_ppo_iteration(tmp_path: Path) -> None:
    # Any torch scheduler is stepped once per PPO update; the first batch only initialises the input
    # statistics, so the two PPO updates run at lr x 1 and x 3/4 of LinearLR(total_iters=4).
    schedule = ["--model.lr_scheduler", "torch.optim.lr_scheduler.LinearLR",
                "--model.lr_scheduler.start_factor", "1.0", "--model.lr_scheduler.end_factor", "0.0",
                "--model.lr_scheduler.total_iters", "4"]  # fmt: skip
    result, _ = run_cli(["fit", *CONFIGS, *TINY, "--data.iterations_per_epoch", "3", *schedule], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with metrics.open() as handle:
        lrs = [float(row["train/lr"]) for row in csv.DictReader(handle) if row.get("train/lr")]
    assert lrs == pytest.approx([1e-3, 0.75e-3])


@pytest.mark.parametrize(
    ("stop", "epochs"),
    [(["--trainer.max_epochs", "3"], 3), (["--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:02"], None)],
    ids=["max_epochs", "max_time"],
)
def test_sparse_evaluation_still_evaluates_the_final_weights(tmp_path: Path, stop: list[str], epochs: int) -> None:
    # every 2nd epoch, plus the last one however the fit ends; the best checkpoint monitors the
    # evaluation and must survive the epochs without one
    args = ["fit", *CONFIGS, *TINY, *stop, "--data.iterations_per_epoch", "3", "--meta_test.every_n_epochs", "2"]
    result, _ = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with metrics.open() as handle:
        rows = list(csv.DictReader(handle))
    last = max(int(row["epoch"]) for row in rows if row.get("train/frames"))
    assert epochs is None or last == epochs - 1
    evaluated = [int(row["epoch"]) for row in rows if row.get("meta_test/success")]
    assert evaluated == sorted({epoch for epoch in range(1, last + 1, 2)} | {last})
    checkpoints = sorted(path.name for path in (tmp_path / "runs").rglob("*.ckpt"))
    assert "last.ckpt" in checkpoints and any(name.startswith("best-epoch=") for name in checkpoints), checkpoints


# ---------------------------------------------------------------------------------------------- bad inputs
BAD_INPUTS = {  # name: (extra arguments, the key the error line must name)
    "unknown_option": (["--model.no_such_option", "3"], "model.no_such_option"),
    "num_episodes_0": (["--model.encoder.init_args.num_episodes", "0"], "model.encoder.init_args.num_episodes"),
    "window_0": (["--model.encoder.init_args.window", "0"], "model.encoder.init_args.window"),
    "episodes_per_trial_0": (["--data.benchmark.init_args.episodes_per_trial", "0"], "episodes_per_trial"),
    "lr_negative": (["--model.optimizer.init_args.lr", "-1"], "model.optimizer.init_args.lr"),
    "num_episodes_gt_episodes_per_trial": (
        ["--model.encoder.init_args.num_episodes", "3"],
        "model.encoder.init_args.num_episodes",
    ),
    "window_gt_episode_length": (["--model.encoder.init_args.window", "11"], "model.encoder.init_args.window"),
    "unknown_benchmark_class": (
        ["--data.benchmark.class_path", "lightning_htrmrl.envs.NoSuchBenchmark"],
        "data.benchmark",
    ),
    "benchmark_not_a_task_distribution": (["--data.benchmark.class_path", "torch.nn.Linear"], "data.benchmark"),
    "config_not_yaml": (["--config", str(REPO / "tests" / "data" / "not_yaml.yaml")], "not_yaml.yaml"),
    "config_missing": (["--config", str(REPO / "tests" / "data" / "missing.yaml")], "missing.yaml"),
    "config_is_a_folder": (["--config", str(REPO / "tests" / "data")], "tests/data"),
    "fewer_slots_than_processes": (
        ["--config", str(CONF / "trainer" / "ddp.yaml"), "--trainer.devices", "3", "--data.num_envs", "2"],
        "data.num_envs (2) must be >= the number of processes (3",
    ),
    "ckpt_path_last_nothing_to_resume": (["--ckpt_path", "last"], "ckpt_path last"),
    "ckpt_path_best_nothing_to_evaluate": (["--ckpt_path", "best"], "ckpt_path best"),
}


# Starting Python + torch + Lightning costs ~7 s per process on the shared 2-core machine, so the bad
# inputs and the encoder swaps run from one warm interpreter: it imports the CLI once, then forks one
# child process per case, which runs ``python -m lightning_htrmrl`` (the package's __main__) with its
# own argv, cwd, stdout, stderr and exit code. The plain ``python -m lightning_htrmrl`` entry point is
# exercised end to end by the other tests of this file.
FORK_DRIVER = r"""
import json, os, runpy, sys, time, traceback
import lightning_htrmrl.cli  # warm import, shared by the forked children
cases = json.loads(sys.argv[1])
results = {}
for name, case in cases.items():
    sys.stdout.flush(); sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, filename in ((1, "stdout.txt"), (2, "stderr.txt")):
                os.dup2(os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["htrmrl", *case["argv"]]
            try:
                runpy.run_module("lightning_htrmrl", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit:
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[name] = {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}
print(json.dumps(results))
"""


# Encoder swaps by config only: the baseline files replace the encoder (class and every init_arg).
TINY_ENV = TINY[: TINY.index("--model.encoder.init_args.num_episodes")]
SWAPS = {
    "mlp": (["--config", str(CONF / "model" / "mlp.yaml")], "MLPEncoder"),
    "trmrl": (["--config", str(CONF / "model" / "trmrl.yaml"), "--model.encoder.init_args.num_layers", "1"],
              "FlatTransformerEncoder"),
}  # fmt: skip


@pytest.fixture(scope="module")
def forked_runs(tmp_path_factory) -> dict[str, dict]:
    """Run every bad input and every encoder swap in its own (forked) process and its own empty directory."""
    root = tmp_path_factory.mktemp("forked")
    cases = {}
    for name, (extra, _) in BAD_INPUTS.items():
        cases[name] = ["fit", *CONFIGS, *TINY, *extra]
    for name, (extra, _) in SWAPS.items():
        cases[f"swap_{name}"] = ["fit", *CONFIGS, *extra, *TINY_ENV]
    cases = {name: {"cwd": str(root / name), "argv": argv} for name, argv in cases.items()}
    for case in cases.values():
        Path(case["cwd"]).mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    driver = subprocess.run(
        [sys.executable, "-c", FORK_DRIVER, json.dumps(cases)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        cwd = Path(cases[name]["cwd"])
        result["cwd"] = cwd
        result["stdout"] = (cwd / "stdout.txt").read_text()
        result["stderr"] = (cwd / "stderr.txt").read_text()
    return results


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_early_with_one_clear_line(forked_runs, name: str) -> None:
    run = forked_runs[name]
    _, key = BAD_INPUTS[name]
    stderr = run["stderr"]
    assert run["returncode"] == 2, f"exit code {run['returncode']}; stderr tail:\n{stderr[-2000:]}"
    errors = _error_lines(stderr)
    assert len(errors) == 1, f"expected one 'error:' line, got {errors}"
    assert key in errors[0], f"{key!r} not named in {errors[0]!r}"
    assert "Traceback" not in stderr
    # nothing was built, trained, logged or checkpointed
    assert sorted(p.name for p in run["cwd"].iterdir()) == ["stderr.txt", "stdout.txt"], "files were written"
    assert "Epoch" not in run["stdout"] + stderr
    assert run["seconds"] < 30


@pytest.mark.parametrize("name", list(SWAPS))
def test_baseline_encoders_are_drop_in_swaps_by_config(forked_runs, name: str) -> None:
    run = forked_runs[f"swap_{name}"]
    assert run["returncode"] == 0, run["stderr"][-3000:]
    _, encoder_class = SWAPS[name]
    output = run["stdout"] + run["stderr"]
    # the model summary's row (plain table, or rich's box drawing where `rich` is installed)
    assert re.search(rf"[|│] encoder +[|│] {encoder_class} ", output), output[-2000:]
    assert "max_epochs=1` reached" in output
    assert list((run["cwd"] / "runs").rglob("metrics.csv"))


# ---------------------------------------------------------------------------------------------- configs
INTERPOLATED = """\
data:
  num_envs: 6
  iterations_per_epoch: ${data.num_envs}
  benchmark:
    init_args:
      episode_length: 12
model:
  encoder:
    init_args:
      d_model: 24
      ff_dim: ${model.encoder.init_args.d_model}
"""

EARLY = """\
data:
  num_envs: 99
  benchmark:
    class_path: lightning_htrmrl.envs.PointRobot
    init_args:
      episode_length: 99
"""


def test_print_config_roundtrip_override_order_and_interpolation(tmp_path: Path) -> None:
    (tmp_path / "late.yaml").write_text(INTERPOLATED)
    (tmp_path / "early.yaml").write_text(EARLY)
    # later --config files override earlier ones; keys they do not set are kept
    result, _ = run_cli(["fit", *CONFIGS, "--config", str(tmp_path / "late.yaml"), "--print_config"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    config = yaml.safe_load(printed)
    benchmark = config["data"]["benchmark"]
    assert benchmark["class_path"] == "lightning_htrmrl.envs.PointRobot"
    assert benchmark["init_args"]["episode_length"] == 12  # late.yaml beats point_robot.yaml (50)
    assert benchmark["init_args"]["episodes_per_trial"] == 4  # kept from point_robot.yaml
    assert config["data"]["num_envs"] == 6
    # OmegaConf interpolations inside a config file are resolved
    assert config["data"]["iterations_per_epoch"] == 6
    assert config["model"]["encoder"]["init_args"]["d_model"] == 24
    assert config["model"]["encoder"]["init_args"]["ff_dim"] == 24
    assert config["model"]["encoder"]["init_args"]["num_heads"] == 4  # kept from htrmrl.yaml
    assert "${" not in printed
    # nothing is trained by --print_config
    assert not (tmp_path / "runs").exists()

    # the printed config is a valid --config; it overrides an earlier file and reprints identically
    (tmp_path / "printed.yaml").write_text(printed)
    result, _ = run_cli(
        ["fit", "--config", str(tmp_path / "early.yaml"), "--config", str(tmp_path / "printed.yaml"), "--print_config"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load(result.stdout) == config


def test_fit_help_lists_model_and_data_options(tmp_path: Path) -> None:
    result, _ = run_cli(["fit", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for option in (
        "--model.encoder",
        "--model.optimizer",
        "--model.advantage_horizon",
        "--model.gamma",
        "--model.ppo_epochs",
        "--data.benchmark",
        "--data.num_envs",
        "--data.iterations_per_epoch",
        "--trainer.max_epochs",
        "--config",
        "--print_config",
    ):
        assert option in result.stdout, f"{option} missing from fit --help"
    # dimensions are linked from the data module, not user options
    assert "--model.obs_dim" not in result.stdout
