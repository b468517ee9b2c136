"""Every config fragment parses, composes with every benchmark and model, and ML1 reach trains via the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from lightning_htrmrl.cli import main
from tests.test_cli import CONF, TINY, run_cli

BENCHMARKS = sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
FRAGMENT_FOLDERS = ("ablation", "trainer", "experiment", "logger")
FRAGMENTS = sorted(str(p.relative_to(CONF)) for folder in FRAGMENT_FOLDERS for p in (CONF / folder).glob("*.yaml"))


def _print_config(configs: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["fit", "--config", str(CONF / "base.yaml")]
    for name in configs:
        args += ["--config", str(CONF / name)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_the_shipped_configs_are_the_repository_configs() -> None:
    assert {"point_robot", "ml1_reach", "ml1_push", "ml1_pick_place", "ml10", "ml45"} <= set(BENCHMARKS)
    assert {"htrmrl", "trmrl", "mlp"} <= set(MODELS)


@pytest.mark.parametrize("benchmark", BENCHMARKS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_on_every_benchmark_parses(benchmark: str, model: str, capsys) -> None:
    config = _print_config([f"benchmark/{benchmark}.yaml", f"model/{model}.yaml"], capsys)
    assert config["model"]["encoder"]["class_path"].endswith(
        {"htrmrl": "HierarchicalEncoder", "trmrl": "FlatTransformerEncoder", "mlp": "MLPEncoder"}[model]
    )
    assert config["data"]["benchmark"]["class_path"].startswith("lightning_htrmrl.envs.")


def test_shipped_lr_schedules_follow_the_budget(capsys) -> None:
    # a schedule with its own length outlasts (or ends before) a run whose budget changes
    schedules = {}
    for benchmark in BENCHMARKS:
        config = _print_config([f"benchmark/{benchmark}.yaml", "model/htrmrl.yaml"], capsys)
        if config["model"]["lr_scheduler"] is not None:
            schedules[benchmark] = config["model"]["lr_scheduler"]["class_path"]
    assert {"ml1_reach", "ml1_push", "ml1_pick_place", "point_robot"} <= set(schedules)
    assert set(schedules.values()) == {"lightning_htrmrl.schedule.LinearToBudget"}, schedules


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_every_fragment_composes(fragment: str, capsys) -> None:
    benchmark = "benchmark/ml1_reach.yaml"
    if fragment.startswith("experiment/paper_"):
        benchmark = {"ml1": "benchmark/ml1_reach.yaml"}.get(
            fragment.split("_")[1][:-5], f"benchmark/{fragment.split('_')[1]}"
        )
    config = _print_config([benchmark, "model/htrmrl.yaml", fragment], capsys)
    assert config["model"]["encoder"]["init_args"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "logger").glob("*.yaml")))
def test_a_logger_file_replaces_the_loggers_and_keeps_the_run_folder(name: str, capsys) -> None:
    loggers = _print_config(["benchmark/point_robot.yaml", "model/htrmrl.yaml", f"logger/{name}.yaml"], capsys)
    classes = [logger["class_path"].rsplit(".", 1)[-1] for logger in loggers["trainer"]["logger"]]
    assert classes[0] == "CSVLogger" and "TensorBoardLogger" not in classes
    assert {"csv": "CSVLogger", "wandb": "WandbLogger", "mlflow": "MLFlowLogger"}[name] in classes


def test_ablation_values_reach_the_model(capsys) -> None:
    base = ["benchmark/point_robot.yaml", "model/htrmrl.yaml"]
    assert (
        _print_config([*base, "ablation/no_state.yaml"], capsys)["model"]["encoder"]["init_args"]["state_embedding_dim"]
        == 0
    )
    assert _print_config([*base, "ablation/inter_positional.yaml"], capsys)["model"]["encoder"]["init_args"][
        "inter_positional"
    ]
    assert (
        _print_config([*base, "ablation/episodes_n2.yaml"], capsys)["model"]["encoder"]["init_args"]["num_episodes"]
        == 2
    )
    assert _print_config([*base, "ablation/window_t5.yaml"], capsys)["model"]["encoder"]["init_args"]["window"] == 5
    flat = _print_config([*base, "ablation/flat.yaml"], capsys)["model"]["encoder"]
    assert flat["class_path"].endswith("FlatTransformerEncoder") and flat["init_args"]["num_episodes"] == 4
    # ML1 reach hides the puck (it names each training goal); ML1 push needs it
    reach = _print_config(["benchmark/ml1_reach.yaml", "model/htrmrl.yaml"], capsys)["data"]["benchmark"]
    assert reach["init_args"]["hidden_observation_dims"] == [4, 5, 6, 22, 23, 24]
    push = _print_config(["benchmark/ml1_push.yaml", "model/htrmrl.yaml"], capsys)["data"]["benchmark"]
    assert not push["init_args"]["hidden_observation_dims"]


def test_tiny_ml1_reach_fit_through_the_cli(tmp_path: Path) -> None:
    """The embedded default (no --config: ML1 reach-v3, HTrMRL, 2 collector processes), shrunk."""
    env_args = TINY[: TINY.index("--data.benchmark.init_args.num_goals")]
    model_args = TINY[TINY.index("--model.encoder.init_args.num_episodes") :]
    args = [
        "fit",
        *env_args,
        *model_args,
        "--data.num_envs",
        "2",
        "--meta_test.num_trials",
        "2",
        "--meta_test.every_n_epochs",
        "1",
    ]
    result, _ = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("runs/htrmrl/version_0/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    frames = [float(r["train/frames"]) for r in rows if r.get("train/frames")]
    assert frames == [2 * 2 * 10 * 2]  # 2 collector processes x 2 slots x one trial of 2 x 10 steps
    assert any(r.get("meta_test/success_ep2") for r in rows)


@pytest.mark.parametrize("experiment", sorted(p.name for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_files_stand_alone(experiment: str, capsys) -> None:
    """``htrmrl fit --config conf/experiment/X.yaml`` alone: its ``defaults:`` bring base, benchmark,
    model and trainer; the printed config (reusable as a file) names no defaults."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "experiment" / experiment), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    benchmark = config["data"]["benchmark"]
    assert benchmark["class_path"].endswith("MetaWorld") and benchmark["init_args"]["episode_length"] == 500
    expected = {"paper_ml1.yaml": "ML1", "paper_ml10.yaml": "ML10", "paper_ml45.yaml": "ML45"}[experiment]
    assert benchmark["init_args"]["benchmark"] == expected
    assert config["model"]["encoder"]["class_path"].endswith("HierarchicalEncoder")
    assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["logger"]
    assert config.get("defaults") is None
