"""What a run leaves behind: meta_test.json, the adaptation curve, checkpoints, resume and validate."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import matplotlib.image
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_htrmrl.runs import experiment_of, find_checkpoint, share_run_directory
from tests.test_cli import CONFIGS, TINY, run_cli


def _run_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("runs/htrmrl/version_*"), key=lambda p: int(p.name.split("_")[1]))


def _frames(run: Path) -> list[float]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [float(row["train/frames"]) for row in rows if row.get("train/frames")]


def test_fit_writes_results_plot_and_checkpoint_metadata(tmp_path: Path) -> None:
    result, _ = run_cli(["fit", *CONFIGS, *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _run_dirs(tmp_path)
    results = json.loads((run / "meta_test.json").read_text())
    k = 2
    for key in (
        "success",
        "return",
        "success_per_episode",
        "return_per_episode",
        "per_task",
        "frames",
        "checkpoint",
        "benchmark",
        "num_trials",
        "deterministic",
    ):
        assert key in results, key
    assert len(results["success_per_episode"]) == len(results["return_per_episode"]) == k
    assert 0.0 <= results["success"] <= 1.0 and results["frames"] > 0
    assert results["per_task"] and all(name.startswith("goal_") for name in results["per_task"])
    assert all(0.0 <= value <= 1.0 for value in results["per_task"].values())
    image = matplotlib.image.imread(run / "adaptation_curve.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    meta = checkpoint["htrmrl"]
    assert meta["versions"]["torch"] and meta["versions"]["torchrl"]
    assert meta["benchmark"]["class"] == "PointRobot"
    assert "HierarchicalEncoder" in meta["config"]


def test_file_loggers_share_one_new_folder_without_a_deletion_warning(tmp_path: Path) -> None:
    (tmp_path / "htrmrl" / "version_0").mkdir(parents=True)  # an earlier run's folder
    classes = (TensorBoardLogger, CSVLogger)
    configs = [Namespace(init_args=Namespace(save_dir=str(tmp_path), name="htrmrl")) for _ in classes]
    share_run_directory(configs)
    assert [config.init_args.version for config in configs] == ["version_1", "version_1"]
    with warnings.catch_warnings(record=True) as caught:
        for cls, config in zip(classes, configs):
            cls(**vars(config.init_args)).experiment  # creates (TensorBoard) or finds (CSV) the folder
    assert not [w for w in caught if "will be deleted" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "htrmrl" / "version_1").is_dir()


def test_validate_reproduces_results_from_a_checkpoint(tmp_path: Path) -> None:
    result, _ = run_cli(["fit", *CONFIGS, *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _run_dirs(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    result, _ = run_cli(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _run_dirs(tmp_path)
    assert second != first, "validate must write into a new run directory"
    trained = json.loads((first / "meta_test.json").read_text())
    evaluated = json.loads((second / "meta_test.json").read_text())
    assert set(evaluated) == set(trained)
    assert evaluated["checkpoint"] == str(ckpt)
    assert evaluated["frames"] == trained["frames"]


def test_bad_checkpoints_fail_with_one_line(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    for path in (tmp_path / "missing.ckpt", truncated, foreign):
        result, seconds = run_cli(["fit", *CONFIGS, *TINY, "--ckpt_path", str(path)], tmp_path / "run")
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "ckpt_path" in errors[0], result.stderr[-2000:]
        assert not list((tmp_path / "run").glob("runs/htrmrl/version_*/checkpoints"))


def _saved_run(folder: Path, benchmark: dict, encoder: str, age_s: float) -> Path:
    """A version folder with a config.yaml and a (real, tiny) last.ckpt written ``age_s`` seconds ago."""
    (folder / "checkpoints").mkdir(parents=True)
    config = {"data": {"benchmark": benchmark}, "model": {"encoder": {"class_path": encoder}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes((Path(__file__).parent / "data" / "checkpoint_0.1.0" / "point_robot_tiny.ckpt").read_bytes())
    os.utime(last, (time.time() - age_s,) * 2)
    return last


def test_ckpt_path_last_never_crosses_experiments(tmp_path: Path) -> None:
    runs = tmp_path / "run" / "runs" / "htrmrl"
    reach_args = {"benchmark": "ML1", "task_name": "reach-v3"}
    reach = {"class_path": "lightning_htrmrl.envs.MetaWorld", "init_args": reach_args}
    point_robot = {"class_path": "lightning_htrmrl.envs.PointRobot", "init_args": {"num_goals": 40}}
    reach_last = _saved_run(runs / "version_0", reach, "lightning_htrmrl.models.HierarchicalEncoder", 60)
    _saved_run(runs / "version_1", point_robot, "lightning_htrmrl.models.FlatTransformerEncoder", 0)
    # The newest last.ckpt is another experiment's: `last` of ML1 reach / HTrMRL is the older one.
    config = {"data": {"benchmark": reach}, "model": {"encoder": {"class_path": "HierarchicalEncoder"}}}
    experiment = experiment_of(config)
    assert experiment == "MetaWorld ML1 reach-v3 / HierarchicalEncoder"
    assert find_checkpoint("last", runs, experiment) == reach_last
    # A point-robot HTrMRL run finds only other experiments' checkpoints: one line naming both.
    result, _ = run_cli(["fit", *CONFIGS, *TINY, "--ckpt_path", "last"], tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "PointRobot / FlatTransformerEncoder" in error
    assert "not this config's (PointRobot / HierarchicalEncoder)" in error
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]


def test_killed_run_resumes_and_continues_its_counters(tmp_path: Path) -> None:
    args = [*CONFIGS, *TINY, "--trainer.max_epochs", "200", "--data.iterations_per_epoch", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_htrmrl", "fit", *args],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        ckpt = None
        last = tmp_path / "runs/htrmrl/version_0/checkpoints/last.ckpt"
        while ckpt is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                if torch.load(last, map_location="cpu", weights_only=False)["epoch"] >= 2:
                    ckpt = last
            except (OSError, RuntimeError, EOFError, KeyError):
                continue  # not written yet, or being written
        assert ckpt is not None, "no checkpoint after 3 epochs"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved_frames = int(saved["state_dict"]["frames"])
    saved_epoch = saved["epoch"]
    result, _ = run_cli(
        [
            "fit",
            *args[:-4],
            "--trainer.max_epochs",
            str(saved_epoch + 2),
            "--data.iterations_per_epoch",
            "2",
            "--ckpt_path",
            str(ckpt),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, resumed = _run_dirs(tmp_path)
    frames = _frames(resumed)
    frames_per_batch = 4 * 10 * 2
    assert frames[0] == saved_frames + frames_per_batch, "the frame counter restarted instead of continuing"
    assert (first / "checkpoints" / "last.ckpt").is_file(), "the first run's checkpoint was touched"


def test_checkpoint_written_by_an_earlier_version_resumes_and_evaluates(tmp_path: Path) -> None:
    """``tests/data/checkpoint_0.1.0``: a tiny point-robot run (2 epochs, 160 frames) written before
    the package's modules were rearranged; it must keep loading, resuming and evaluating."""
    old = Path(__file__).parent / "data" / "checkpoint_0.1.0" / "point_robot_tiny.ckpt"
    result, _ = run_cli(["fit", *CONFIGS, *TINY, "--trainer.max_epochs", "3", "--ckpt_path", str(old)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _run_dirs(tmp_path)
    assert _frames(run) == [160 + 4 * 2 * 10], "the resumed run did not continue the old frame count"
    # it trained at a constant rate; the point-robot config now anneals: said, not silently restarted
    assert "model.lr_scheduler starts from its first step" in result.stderr
    result, _ = run_cli(["validate", *CONFIGS, *TINY, "--ckpt_path", str(old)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((_run_dirs(tmp_path)[-1] / "meta_test.json").read_text())
    assert evaluated["frames"] == 160 and evaluated["checkpoint"] == str(old)
