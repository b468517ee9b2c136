"""The trials of an evaluation: every trial once at any number of processes and workers."""

from __future__ import annotations

import pytest
import torch
from torchrl.envs.utils import ExplorationType

from lightning_htrmrl.envs import MetaWorld
from lightning_htrmrl.envs.evaluation import EvaluationTrials


@pytest.mark.parametrize(("num_trials", "num_envs", "world_size", "workers"), [
    (20, 10, 1, 1), (20, 10, 3, 1), (20, 10, 4, 1), (20, 3, 3, 2), (7, 25, 4, 1), (40, 10, 3, 1),
])  # fmt: skip
def test_every_trial_runs_exactly_once_at_any_process_count(tiny, num_trials, num_envs, world_size, workers) -> None:
    """The shares of all processes (and of their workers) are the single-process schedule, each trial
    once, and no process steps a round it does not use."""
    benchmark = tiny.point_robot()
    num_tasks = len(benchmark.task_names("test"))
    module = tiny.make_module(tiny.encoders["hierarchical"])
    indices, tasks = [], []
    for rank in range(world_size):
        # the worker processes are stood in for by envs in this process: the same parts of the schedule
        shares = [
            EvaluationTrials(benchmark, "test", num_trials, num_envs, seed=3, rank=rank * workers + worker,
                             world_size=world_size * workers)
            for worker in range(workers)
        ]  # fmt: skip
        for share in shares:
            # spare slots (all parts run the same rounds): fewer than one per round and per trial short
            assert share.rounds * share.slots - share.num_trials_here <= share.rounds
            rollout, index = share.run(module)
            assert len(rollout) == len(index) == share.num_trials_here
            indices += index.tolist()
            tasks += rollout["task_id"][:, 0].tolist()
            share.close()
    assert sorted(indices) == list(range(num_trials))
    by_index = dict(zip(indices, tasks, strict=True))
    single = EvaluationTrials(benchmark, "test", num_trials, num_envs, seed=3)
    rollout, index = single.run(module)
    assert index.tolist() == list(range(num_trials))
    assert [by_index[i] for i in range(num_trials)] == rollout["task_id"][:, 0].tolist()
    assert sorted(set(tasks)) == list(range(min(num_tasks, num_trials)))


def test_worker_processes_run_the_same_trials_as_this_process() -> None:
    """ML1 at tiny sizes, acting with the mean: 2 worker processes give the per-trial results of the
    same parts run in this process."""
    from tests.conftest import make_module, tiny_hierarchical

    benchmark = MetaWorld("ML1", "reach-v3", episode_length=6, episodes_per_trial=2)
    module = make_module(tiny_hierarchical(), obs_dim=39, action_dim=4, episode_length=6, episodes_per_trial=2)
    parallel = EvaluationTrials(benchmark, "test", num_trials=6, num_envs=3, seed=5, num_workers=2)
    try:
        rollout, index = parallel.run(module, ExplorationType.DETERMINISTIC)
        again, _ = parallel.run(module, ExplorationType.DETERMINISTIC)
    finally:
        parallel.close()
    assert sorted(index.tolist()) == list(range(6))
    torch.testing.assert_close(again["next", "reward"], rollout["next", "reward"], rtol=0, atol=0)
    in_process = []
    for worker in range(2):
        share = EvaluationTrials(benchmark, "test", num_trials=6, num_envs=3, seed=5, rank=worker, world_size=2)
        trials, part_index = share.run(module, ExplorationType.DETERMINISTIC)
        share.close()
        in_process.append((part_index, trials))
    reference = torch.cat([trials for _, trials in in_process])
    assert torch.equal(torch.cat([i for i, _ in in_process]), index)
    assert torch.equal(reference["task_id"], rollout["task_id"])
    torch.testing.assert_close(rollout["observation"], reference["observation"], rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout["next", "reward"], reference["next", "reward"], rtol=0, atol=1e-5)
