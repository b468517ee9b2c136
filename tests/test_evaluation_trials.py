"""The trials of an evaluation: every trial once, with the same result, at any number of processes and workers."""

from __future__ import annotations

import pytest
import torch

from lightning_htrmrl.envs import MetaWorld
from lightning_htrmrl.envs.evaluation import EvaluationTrials


def _by_trial(rollout, index) -> dict[int, tuple]:
    """Trial index -> (task, rewards [K*L], actions [K*L, A]) of one process's share."""
    return {
        int(i): (int(rollout["task_id"][row, 0]), rollout["next", "reward"][row], rollout["action"][row])
        for row, i in enumerate(index)
    }


@pytest.mark.parametrize(("num_trials", "num_envs", "world_size"), [
    (20, 10, 3), (20, 10, 4), (20, 3, 3), (7, 25, 4), (40, 10, 3),
])  # fmt: skip
def test_every_trial_runs_once_with_the_same_result_at_any_process_count(tiny, num_trials, num_envs, world_size):
    """The shares of all processes are the single-process schedule, each trial once on as many slots
    as it needs, and each trial (task, sampled actions, rewards) is the one a single process runs."""
    benchmark = tiny.point_robot()
    num_tasks = len(benchmark.task_names("test"))
    module = tiny.make_module(tiny.encoders["hierarchical"])
    single = EvaluationTrials(benchmark, "test", num_trials, num_envs, seed=3)
    rollout, index = single.run(module)
    assert sorted(index.tolist()) == list(range(num_trials)) and len(rollout) == num_trials
    reference = _by_trial(rollout, index)
    assert [reference[i][0] for i in range(num_trials)] == [
        int(single.benchmark.make_env("test", 1, seed=3, cycle_tasks=True)._task_order[i % num_tasks])
        for i in range(num_trials)
    ]
    shares = {}
    for rank in range(world_size):
        share = EvaluationTrials(benchmark, "test", num_trials, num_envs, seed=3, rank=rank, world_size=world_size)
        rollout, index = share.run(module)
        assert len(index) == share.num_trials_here <= share.largest_share
        if rollout is None:
            assert not share.parts  # more processes than parts
            continue
        assert len(rollout) == len(index)
        for i, trial in _by_trial(rollout, index).items():
            assert i not in shares
            shares[i] = trial
        share.close()
    assert sorted(shares) == list(range(num_trials))
    for i, (task, rewards, actions) in shares.items():
        assert task == reference[i][0]
        torch.testing.assert_close(actions, reference[i][2], rtol=0, atol=1e-5)
        torch.testing.assert_close(rewards, reference[i][1], rtol=0, atol=1e-5)


def test_an_evaluation_leaves_the_callers_random_streams_alone(tiny) -> None:
    benchmark = tiny.point_robot()
    module = tiny.make_module(tiny.encoders["hierarchical"])
    trials = EvaluationTrials(benchmark, "test", 4, 2, seed=3)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first, _ = trials.run(module)
    assert torch.equal(torch.rand(3), expected)
    again, _ = trials.run(module)  # the same trials at every evaluation
    assert torch.equal(again["action"], first["action"])


def test_worker_processes_run_the_same_trials_as_this_process() -> None:
    """ML1 at tiny sizes, sampling actions: 2 worker processes give the per-trial results of the
    same parts run in this process, and run them again identically."""
    from tests.conftest import make_module, tiny_hierarchical

    benchmark = MetaWorld("ML1", "reach-v3", episode_length=6, episodes_per_trial=2)
    module = make_module(tiny_hierarchical(), obs_dim=39, action_dim=4, episode_length=6, episodes_per_trial=2)
    parallel = EvaluationTrials(benchmark, "test", num_trials=7, num_envs=3, seed=5, num_workers=2)
    try:
        rollout, index = parallel.run(module)
        again, _ = parallel.run(module)
    finally:
        parallel.close()
    assert sorted(index.tolist()) == list(range(7))
    torch.testing.assert_close(again["next", "reward"], rollout["next", "reward"], rtol=0, atol=0)
    here = EvaluationTrials(benchmark, "test", num_trials=7, num_envs=3, seed=5)
    reference, reference_index = here.run(module)
    here.close()
    assert torch.equal(reference_index, index)
    assert torch.equal(reference["task_id"], rollout["task_id"])
    torch.testing.assert_close(rollout["observation"], reference["observation"], rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout["next", "reward"], reference["next", "reward"], rtol=0, atol=1e-5)
