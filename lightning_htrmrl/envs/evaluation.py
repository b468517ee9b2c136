"""The trials of one evaluation, stepped in this process or in worker processes.

An evaluation of ``num_trials`` trials follows one fixed schedule: trial ``i`` runs task
``i % num_tasks`` of the split's task order (drawn from the evaluation seed). The schedule is cut
into ``world_size * num_workers`` interleaved parts, one per worker of every DDP process
(``TrialEnv.set_shard``), so every trial runs exactly once whatever the number of processes and
workers, and each part runs as few rounds of its slots as its share needs.
"""

from __future__ import annotations

from functools import partial

import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase, ParallelEnv

from lightning_htrmrl.envs.base import Split, TaskDistribution
from lightning_htrmrl.envs.trial import TrialEnv


def make_shard_env(
    benchmark: TaskDistribution,
    split: Split,
    num_envs: int,
    seed: int,
    part: int,
    parts: int,
    device: torch.device | str = "cpu",
) -> TrialEnv:
    """A ``cycle_tasks`` env of ``split`` that runs trials ``part, part + parts, ...`` (picklable)."""
    env = benchmark.make_env(split, num_envs, seed=seed, cycle_tasks=True, device=device)
    env.set_shard(part, parts)
    return env


class EvaluationTrials:
    """The share of ``num_trials`` trials of ``split`` that DDP process ``rank`` runs.

    With ``num_workers > 1`` the share's parts are stepped by a TorchRL ``ParallelEnv`` of that many
    worker processes (built once, kept between evaluations: the simulator runs on every core while
    the policy runs here, on one batch of all the workers' slots); with 1, by one env in this process.

    Args:
        benchmark: the task distribution.
        split: ``test`` or ``train``.
        num_trials: trials of the whole evaluation (all processes).
        num_envs: slots per part (at most the part's share).
        seed: fixes the task order (and seeds the simulators at every :meth:`run`).
        rank, world_size: this DDP process and the number of them.
        num_workers: worker processes of this DDP process.
        device: where the policy reads the observations.
    """

    def __init__(
        self,
        benchmark: TaskDistribution,
        split: Split,
        num_trials: int,
        num_envs: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        parts = world_size * num_workers
        largest_share = -(-num_trials // parts)
        # as few rounds as num_envs slots allow, then as few slots as those rounds need
        self.rounds = -(-largest_share // num_envs)
        self.slots = -(-largest_share // self.rounds)
        self.parts = [rank * num_workers + worker for worker in range(num_workers)]
        self.num_parts = parts
        # trials of each part that belong to the schedule (the last round may have spare slots)
        self.kept = [len(range(part, num_trials, parts)) for part in self.parts]
        self.trial_steps = benchmark.episodes_per_trial * benchmark.episode_length
        self.seed = seed
        make = [partial(make_shard_env, benchmark, split, self.slots, seed, part, parts) for part in self.parts]
        if num_workers == 1:
            self.env: EnvBase = make[0](device=device)
        else:
            self.env = ParallelEnv(
                num_workers,
                make,
                device=device,
                num_threads=torch.get_num_threads(),  # this process keeps its threads for training
                mp_start_method="spawn",
            )

    @property
    def num_trials_here(self) -> int:
        return sum(self.kept)

    @torch.no_grad()
    def run(self, policy) -> tuple[TensorDictBase, torch.Tensor]:
        """Run this process's share with a fresh ``policy``.

        Returns the trials ``[n, K*L]`` and their indices ``[n]`` in the evaluation's schedule.
        """
        # The same schedule (tasks, simulator seeds) at every evaluation, and the same seed in every
        # part: a trial does not depend on how many parts there are.
        self.env.set_seed(self.seed, static_seed=True)
        rounds = [self.env.rollout(self.trial_steps, policy, break_when_any_done=False) for _ in range(self.rounds)]
        # [rounds, workers, slots, K*L] -> per part, its trials in order (round-major, then slot)
        stacked = torch.stack(rounds).reshape(self.rounds, len(self.parts), self.slots, self.trial_steps)
        trials, indices = [], []
        for worker, (part, kept) in enumerate(zip(self.parts, self.kept, strict=True)):
            trials.append(stacked[:, worker].reshape(self.rounds * self.slots, self.trial_steps)[:kept])
            indices.append(torch.arange(kept) * self.num_parts + part)
        return torch.cat(trials), torch.cat(indices)

    def close(self) -> None:
        self.env.close(raise_if_closed=False)
