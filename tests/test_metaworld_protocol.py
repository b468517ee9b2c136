"""Meta-World's own ``metalearning_evaluation`` of a trained policy (``--meta_test.protocol metaworld``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_htrmrl.envs import MetaWorld
from lightning_htrmrl.metaworld_protocol import MetaWorldProtocol, evaluate
from lightning_htrmrl.module import MetaPPO
from lightning_htrmrl.validation import ConfigError
from tests.conftest import ENCODER_FACTORIES, make_module, tiny_hierarchical
from tests.test_cli import CONFIGS, TINY, run_cli

# The embedded default (ML1 reach-v3, HTrMRL), shrunk: K = 2 episodes of L = 10 steps.
ML1_TINY = [
    *TINY[: TINY.index("--data.benchmark.init_args.num_goals")],
    *TINY[TINY.index("--model.encoder.init_args.num_episodes") :],
    "--data.num_envs", "2", "--meta_test.num_trials", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def reach_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a tiny ML1 reach-v3 run through the CLI."""
    folder = tmp_path_factory.mktemp("reach")
    result, _ = run_cli(["fit", *ML1_TINY], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "runs/htrmrl/version_0/checkpoints/last.ckpt"


def _meta_test(folder: Path, version: int) -> dict:
    return json.loads((folder / f"runs/htrmrl/version_{version}/meta_test.json").read_text())


@pytest.mark.slow
def test_official_protocol_measures_what_ours_measures(reach_checkpoint: Path, tmp_path: Path) -> None:
    """Same checkpoint, same 50 held-out goals, acting with the mean: our trials of K = 2 episodes and
    Meta-World's evaluator with 1 adaptation + 1 evaluation episode of L steps, 50 rounds of its one
    sub-env, play the same trajectories, so episode 2's success (and, where nothing succeeds early,
    its return) agree exactly."""
    common = ["test", *ML1_TINY, "--ckpt_path", str(reach_checkpoint), "--meta_test.deterministic", "true"]
    result, _ = run_cli([*common, "--meta_test.num_trials", "50", "--meta_test.num_envs", "50"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    official = [
        "--meta_test.protocol", "metaworld",
        "--meta_test.metaworld.num_evals", "50",
        "--meta_test.metaworld.adaptation_episodes", "1",
        "--meta_test.metaworld.evaluation_episodes", "1",
        "--meta_test.metaworld.max_episode_steps", "10",
        "--meta_test.metaworld.num_workers", "2",
    ]  # fmt: skip
    result, _ = run_cli([*common, *official], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = _meta_test(tmp_path, 0), _meta_test(tmp_path, 1)
    assert ours["protocol"] == "trials" and theirs["protocol"] == "metaworld"
    assert theirs["settings"] == {
        "num_evals": 50,
        "adaptation_episodes": 1,
        "evaluation_episodes": 1,
        "max_episode_steps": 10,
        "meta_batch_size": 1,
        "num_workers": 2,
        "adaptation_steps": 1,
    }
    assert theirs["evaluator"] == "metaworld.evaluation.metalearning_evaluation"
    assert list(theirs["per_class"]) == ["reach-v3"] and theirs["checkpoint"] == str(reach_checkpoint)
    assert len(theirs["success_per_round"]) == 50
    assert theirs["success"] == pytest.approx(ours["success_per_episode"][1], abs=1e-6)
    if ours["success_per_episode"][1] == 0.0:  # no episode ended early: whole episodes compare
        reward_scale = ours["benchmark"]["reward_scale"]
        assert theirs["return"] == pytest.approx(ours["return_per_episode"][1] / reward_scale, rel=1e-4)


SLOW = pytest.mark.slow  # the other encoders: CI runs them with -m slow


@pytest.mark.parametrize("encoder", ["hierarchical", pytest.param("flat", marks=SLOW), pytest.param("mlp", marks=SLOW)])
def test_every_encoder_on_episodes_longer_and_shorter_than_training(encoder: str) -> None:
    """Trained with L = 8; evaluated on episodes of up to 24 steps that end on success (sampled actions)."""
    module = make_module(ENCODER_FACTORIES[encoder], obs_dim=39, action_dim=4, past_windows="max_reward")
    benchmark = MetaWorld("ML1", "reach-v3", episode_length=8, episodes_per_trial=3, hidden_observation_dims=[4, 5])
    protocol = MetaWorldProtocol(
        num_evals=2,
        adaptation_episodes=2,
        evaluation_episodes=2,
        max_episode_steps=24,
        meta_batch_size=5,
        num_workers=1,  # two short rounds: starting worker processes would take longer than they save
    )
    results = evaluate(module, benchmark, protocol, deterministic=False, seed=0)
    assert len(results["success_per_round"]) == 2 and 0.0 <= results["success"] <= 1.0
    assert results["settings"]["max_episode_steps"] == 24 and results["settings"]["meta_batch_size"] == 5
    assert torch.isfinite(torch.tensor(results["return"]))


def _heads_for_the_goals() -> MetaPPO:
    """A tiny module whose mean action moves the hand towards reach-v3's goals (+y), with noise
    (std 0.5): some evaluation episodes succeed and end early, the others run to the step limit."""
    module = make_module(tiny_hierarchical(), obs_dim=39, action_dim=4, init_std=0.5)
    last = [layer for layer in module.actor.modules() if isinstance(layer, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    return module


def test_parallel_rounds_give_the_sequential_results() -> None:
    """Sampled actions, same seed: 2 worker processes give every round the result it has in-process."""
    module = _heads_for_the_goals()
    benchmark = MetaWorld("ML1", "reach-v3", episode_length=8, episodes_per_trial=3)
    results = {}
    for workers in (1, 2):
        protocol = MetaWorldProtocol(
            num_evals=4, adaptation_episodes=1, evaluation_episodes=2, max_episode_steps=30, num_workers=workers
        )
        results[workers] = evaluate(module, benchmark, protocol, deterministic=False, seed=0)
    sequential, parallel = results[1], results[2]
    assert parallel["settings"]["num_workers"] == 2 and sequential["settings"]["num_workers"] == 1
    assert 0.0 < max(sequential["success_per_round"]) < 1.0  # episodes that end on success, and others
    for key in ("success_per_round", "per_class", "return", "success", "success_ci95"):
        assert parallel[key] == sequential[key], key


@pytest.mark.slow
def test_parallel_rounds_give_the_sequential_results_on_ml10() -> None:
    module = make_module(tiny_hierarchical(), obs_dim=39, action_dim=4)
    benchmark = MetaWorld("ML10", None, episode_length=8, episodes_per_trial=3)
    results = [
        evaluate(
            module,
            benchmark,
            MetaWorldProtocol(
                num_evals=3, adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=10, num_workers=workers
            ),
            deterministic=False,
            seed=1,
        )
        for workers in (1, 2)
    ]
    for key in ("success_per_round", "per_class", "return"):
        assert results[0][key] == results[1][key], key


@pytest.mark.parametrize("num_workers", [0, -1, 1.5, True, "2"])
def test_bad_num_workers_names_the_key(num_workers) -> None:
    with pytest.raises(ConfigError, match=r"meta_test\.metaworld\.num_workers"):
        MetaWorldProtocol(num_workers=num_workers)


@pytest.mark.slow
def test_ml10_held_out_classes() -> None:
    module = make_module(tiny_hierarchical(), obs_dim=39, action_dim=4)
    benchmark = MetaWorld("ML10", None, episode_length=8, episodes_per_trial=3)
    protocol = MetaWorldProtocol(
        num_evals=1, adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=8, meta_batch_size=5
    )
    results = evaluate(module, benchmark, protocol, deterministic=True, seed=0)
    assert sorted(results["per_class"]) == sorted(benchmark.classes("test"))


def test_wrong_benchmark_fails_with_one_line_naming_both(reach_checkpoint: Path, tmp_path: Path) -> None:
    cases = {
        # a point-robot checkpoint, evaluated with the embedded default (ML1 reach-v3)
        "point_robot": (["fit", *CONFIGS, *TINY], ["PointRobot", "Meta-World ML1 reach-v3"]),
    }
    result, _ = run_cli(cases["point_robot"][0], tmp_path / "pr")
    assert result.returncode == 0, result.stderr[-3000:]
    point_robot = tmp_path / "pr/runs/htrmrl/version_0/checkpoints/last.ckpt"
    runs = [
        (["test", "--ckpt_path", str(point_robot)], ["PointRobot", "Meta-World ML1 reach-v3"]),
        (
            ["test", "--ckpt_path", str(reach_checkpoint), "--data.benchmark.init_args.task_name", "push-v3"],
            ["Meta-World ML1 reach-v3", "Meta-World ML1 push-v3"],
        ),
        (["test", *CONFIGS], ["PointRobot"]),  # no checkpoint: the benchmark itself is not Meta-World
    ]
    for args, names in runs:
        result, _ = run_cli([*args, "--meta_test.protocol", "metaworld"], tmp_path / "eval")
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(name in errors[0] for name in names), errors
        assert not (tmp_path / "eval" / "runs").exists()
