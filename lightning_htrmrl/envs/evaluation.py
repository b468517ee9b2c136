"""The trials of one evaluation, cut into parts that any number of processes and workers can run.

An evaluation of ``num_trials`` trials follows one fixed schedule: trial ``i`` runs task
``i % num_tasks`` of the split's task order (drawn from the evaluation seed). The schedule is cut
into ``P = ceil(num_trials / num_envs)`` interleaved parts (``TrialEnv.set_shard``): part ``p``
runs trials ``p, p + P, ...`` as one round of that many slots, with its simulators, window
sampling and action noise seeded from ``(seed, p)``. The layout depends only on ``num_trials``,
``num_envs`` and ``seed``: DDP process ``r`` of ``W`` runs parts ``r, r + W, ...``, spread over
its worker processes, so every trial runs exactly once, no slot is stepped that is not used, and a
trial's result does not depend on how many processes or workers ran the evaluation.
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


def part_seed(seed: int, part: int) -> int:
    """Seed of part ``part``'s simulators, window sampling and action noise."""
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def play_part(
    env: TrialEnv, acting, part: int, parts: int, seed: int, exploration: ExplorationType
) -> TensorDictBase:
    """One round of part ``part`` of ``parts`` on ``env`` (as many slots as the part has trials).

    ``acting`` builds the policy from the part's seed. The action noise is drawn from the part's
    seed inside a forked RNG, so the caller's random streams (e.g. training's) are left as they were.
    """
    env.set_shard(part, parts)
    env.set_seed(seed, static_seed=True)
    steps = env.episodes_per_trial * env.episode_length
    devices = [env.device] if torch.device(env.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), set_exploration_type(exploration):
        torch.manual_seed(seed)
        return env.rollout(steps, acting(seed), break_when_any_done=False)


_WORKER_ENVS: dict[int, TrialEnv] = {}  # an evaluation worker process's envs, by number of slots


def _start_worker() -> None:
    torch.set_num_threads(1)  # one core per worker: the workers are as many as the cores


def _run_part(
    benchmark: TaskDistribution, split: Split, slots: int, seed: int, policy: tuple, part: int, parts: int,
    exploration: ExplorationType,
) -> TensorDictBase:  # fmt: skip
    """In a worker: part ``part`` of ``parts`` of the evaluation of ``seed``, with a fresh copy of the policy."""
    encoder, actor, episode_length, past_windows = policy
    if slots not in _WORKER_ENVS:  # the task order is drawn from the evaluation's seed
        _WORKER_ENVS[slots] = make_shard_env(benchmark, split, slots, seed, part, parts)
    acting = lambda s: make_policy(encoder, actor, episode_length, s, past_windows)  # noqa: E731
    return play_part(_WORKER_ENVS[slots], acting, part, parts, part_seed(seed, part), exploration)


class EvaluationTrials:
    """The parts of ``num_trials`` trials of ``split`` that DDP process ``rank`` runs.

    With ``num_workers > 1`` the parts run in that many worker processes (started at the first
    :meth:`run` and kept), each with its own envs and a copy of the policy on the CPU (as training's
    collector processes): the simulator and the policy use every core, and this process waits.
    With 1, the parts run in this process, on the module's device.

    Args:
        benchmark: the task distribution.
        split: ``test`` or ``train``.
        num_trials: trials of the whole evaluation (all processes).
        num_envs: slots of one part at most (``ceil(num_trials / num_envs)`` parts).
        seed: fixes the task order and the seeds of every part (the same at every :meth:`run`).
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
        self.num_parts = -(-num_trials // num_envs)
        self.num_trials = num_trials
        self.parts = list(range(rank, self.num_parts, world_size))
        self.seed = seed
        self.benchmark, self.split, self.device = benchmark, split, device
        self.num_workers = min(num_workers, len(self.parts)) or 1
        self.largest_share = max(
            sum(self.part_size(p) for p in range(r, self.num_parts, world_size)) for r in range(world_size)
        )
        self._envs: dict[int, TrialEnv] = {}
        self._pool: ProcessPoolExecutor | None = None

    def part_size(self, part: int) -> int:
        """Trials (and slots) of ``part``: ``ceil`` or ``floor`` of ``num_trials / num_parts``."""
        return len(range(part, self.num_trials, self.num_parts))

    @property
    def num_trials_here(self) -> int:
        return sum(self.part_size(part) for part in self.parts)

    @torch.no_grad()
    def run(
        self, module, exploration: ExplorationType = ExplorationType.RANDOM
    ) -> tuple[TensorDictBase | None, torch.Tensor]:
        """Run this process's parts with fresh policies of ``module`` (a ``MetaPPO``).

        Returns the trials ``[n, K*L]`` (``None`` if this process has no part) and their indices
        ``[n]`` in the evaluation's schedule.
        """
        if self.num_workers == 1:
            per_part = [self._run_here(module, part, exploration) for part in self.parts]
        else:
            per_part = [future.result() for future in self._submit(module, exploration)]
        indices = [torch.arange(self.part_size(part)) * self.num_parts + part for part in self.parts]
        if not per_part:
            return None, torch.zeros(0, dtype=torch.long)
        return torch.cat(per_part).to(module.device), torch.cat(indices)

    def _run_here(self, module, part: int, exploration: ExplorationType) -> TensorDictBase:
        slots = self.part_size(part)
        if slots not in self._envs:
            self._envs[slots] = make_shard_env(self.benchmark, self.split, slots, self.seed, part, self.num_parts,
                                               self.device)  # fmt: skip
        env = self._envs[slots]
        return play_part(env, module.make_policy, part, self.num_parts, part_seed(self.seed, part), exploration)

    def _submit(self, module, exploration: ExplorationType) -> list:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),  # forked torch threads may hang
                initializer=_start_worker,
            )
        encoder, actor = (copy.deepcopy(m).cpu() for m in (module.encoder, module.actor))
        policy = (encoder, actor, module.hparams.episode_length, module.hparams.past_windows)
        return [
            self._pool.submit(
                _run_part, self.benchmark, self.split, self.part_size(part), self.seed, policy, part,
                self.num_parts, exploration,
            )  # fmt: skip
            for part in self.parts
        ]

    def close(self) -> None:
        for env in self._envs.values():
            env.close(raise_if_closed=False)
        self._envs = {}
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
