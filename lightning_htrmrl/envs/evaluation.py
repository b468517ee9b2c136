"""The trials of one evaluation, stepped in this process or in worker processes.

An evaluation of ``num_trials`` trials follows one fixed schedule: trial ``i`` runs task
``i % num_tasks`` of the split's task order (drawn from the evaluation seed). The schedule is cut
into ``world_size * num_workers`` interleaved parts, one per worker of every DDP process
(``TrialEnv.set_shard``), so every trial runs exactly once whatever the number of processes and
workers, and each part runs as few rounds of its slots as its share needs.
"""

from __future__ import annotations

import copy
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from lightning_htrmrl.envs.base import Split, TaskDistribution
from lightning_htrmrl.envs.trial import TrialEnv
from lightning_htrmrl.models.policy import make_policy


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


_WORKER_ENV: TrialEnv | None = None  # an evaluation worker process's env


def _start_worker(benchmark: TaskDistribution, split: Split, num_envs: int, seed: int) -> None:
    global _WORKER_ENV
    torch.set_num_threads(1)  # one core per worker: the workers are as many as the cores
    _WORKER_ENV = make_shard_env(benchmark, split, num_envs, seed, part=0, parts=1)  # each run sets its part


def _run_part(
    policy: tuple, part: int, parts: int, rounds: int, seed: int, exploration: ExplorationType
) -> TensorDictBase:
    """In a worker: ``rounds`` rounds of part ``part`` of ``parts`` with a fresh copy of the policy."""
    encoder, actor, episode_length, past_windows = policy
    env = _WORKER_ENV
    env.set_shard(part, parts)
    env.set_seed(seed, static_seed=True)
    torch.manual_seed(int(np.random.SeedSequence([seed, part]).generate_state(1)[0]))  # the part's action noise
    acting = make_policy(encoder, actor, episode_length, seed, past_windows)
    steps = env.episodes_per_trial * env.episode_length
    with torch.no_grad(), set_exploration_type(exploration):
        return torch.cat([env.rollout(steps, acting, break_when_any_done=False) for _ in range(rounds)])


class EvaluationTrials:
    """The share of ``num_trials`` trials of ``split`` that DDP process ``rank`` runs.

    With ``num_workers > 1`` the share's parts run in that many worker processes (started at the
    first :meth:`run` and kept), each with its own envs and a copy of the policy on the CPU (as
    training's collector processes): the simulator and the policy use every core, and this process
    waits. With 1, the share runs in this process, on the module's device.

    Args:
        benchmark: the task distribution.
        split: ``test`` or ``train``.
        num_trials: trials of the whole evaluation (all processes).
        num_envs: slots per part at most.
        seed: fixes the task order (and seeds the simulators and, in workers, the action noise of
            every part at every :meth:`run`).
        rank, world_size: this DDP process and the number of them.
        num_workers: worker processes of this DDP process.
        device: where the policy runs in this process (``num_workers`` 1).
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
        self.seed = seed
        self.benchmark, self.split = benchmark, split
        self._env: TrialEnv | None = None
        self._pool: ProcessPoolExecutor | None = None
        if num_workers == 1:
            self._env = make_shard_env(benchmark, split, self.slots, seed, self.parts[0], parts, device)

    @property
    def num_trials_here(self) -> int:
        return sum(self.kept)

    @torch.no_grad()
    def run(self, module, exploration: ExplorationType = ExplorationType.RANDOM) -> tuple[TensorDictBase, torch.Tensor]:
        """Run this process's share with a fresh policy of ``module`` (a ``MetaPPO``).

        Returns the trials ``[n, K*L]`` and their indices ``[n]`` in the evaluation's schedule.
        """
        if self._env is not None:
            # The same schedule (tasks, simulator seeds) at every evaluation.
            self._env.set_seed(self.seed, static_seed=True)
            policy = module.make_policy(seed=self.seed)
            steps = self._env.episodes_per_trial * self._env.episode_length
            with set_exploration_type(exploration):
                rounds = [self._env.rollout(steps, policy, break_when_any_done=False) for _ in range(self.rounds)]
            per_part = [torch.cat(rounds)]
        else:
            per_part = [future.result() for future in self._submit(module, exploration)]
        trials = [rows[:kept] for rows, kept in zip(per_part, self.kept, strict=True)]
        indices = [torch.arange(kept) * self.num_parts + part for part, kept in zip(self.parts, self.kept, strict=True)]
        return torch.cat(trials).to(module.device), torch.cat(indices)

    def _submit(self, module, exploration: ExplorationType) -> list:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                len(self.parts),
                mp_context=multiprocessing.get_context("spawn"),  # forked torch threads may hang
                initializer=_start_worker,
                initargs=(self.benchmark, self.split, self.slots, self.seed),
            )
        encoder, actor = (copy.deepcopy(m).cpu() for m in (module.encoder, module.actor))
        policy = (encoder, actor, module.hparams.episode_length, module.hparams.past_windows)
        return [
            self._pool.submit(_run_part, policy, part, self.num_parts, self.rounds, self.seed, exploration)
            for part in self.parts
        ]

    def close(self) -> None:
        if self._env is not None:
            self._env.close(raise_if_closed=False)
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
