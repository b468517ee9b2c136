"""Trial bookkeeping shared by every task distribution.

A *trial* is ``K`` consecutive episodes of ``L`` steps on one task. :class:`TrialEnv` is a batched
TorchRL :class:`~torchrl.envs.EnvBase` of ``M`` independent slots; each slot runs trial after trial.
From TorchRL's point of view a whole trial is one trajectory: ``done`` is set only at the trial's
last step, tasks are resampled only at a trial start, and the simulator is reset in place between
the episodes of a trial (the next observation after an episode's last step is the first
observation of the next episode, as in RL^2).

Every step emits the RL^2 token ``[s_t, a_{t-1}, r_{t-1}, done_{t-1}]``
(zeros for the previous action, reward and done at a trial start), together with the episode index
within the trial, the step index within the episode, the task id and a per-step ``success`` flag.

Subclasses implement the simulator: :meth:`_assign_tasks`, :meth:`_reset_sim`, :meth:`_step_sim`.
"""

from __future__ import annotations

import abc

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from lightning_htrmrl.trials import token_dim


class TrialEnv(EnvBase):
    """Batched env of ``num_envs`` slots that each run trials of ``episodes_per_trial`` episodes.

    Args:
        num_envs: ``M``, number of independent slots stepped as one batch.
        num_tasks: number of tasks in this split; a slot draws a task id in ``[0, num_tasks)`` at
            every trial start.
        obs_dim: size of the simulator's observation ``s_t``.
        action_dim: size of the action; actions are clipped to ``[-1, 1]``.
        episode_length: ``L``, steps per episode.
        episodes_per_trial: ``K``, episodes per trial.
        seed: seeds the task sampler (and, through :meth:`_seed_sim`, the simulator).
        cycle_tasks: if True, slot ``i`` gets entry ``(j * M + i) % num_tasks`` of a fixed
            permutation of the tasks (drawn from ``seed``) at its ``j``-th trial, so consecutive
            trials cover every task before repeating one (used for evaluation). Otherwise tasks
            are drawn uniformly at random.
        device: device of the emitted tensors.

    Output keys (batch ``[M]``): ``observation [M, obs_dim]``, ``token [M, obs_dim + action_dim + 2]``,
    ``episode_idx [M]``, ``step_in_episode [M]``, ``task_id [M]``, ``success [M]`` (bool, this step),
    ``reward [M, 1]`` and the done keys ``[M, 1]``.
    """

    def __init__(
        self,
        *,
        num_envs: int,
        num_tasks: int,
        obs_dim: int,
        action_dim: int,
        episode_length: int,
        episodes_per_trial: int,
        seed: int = 0,
        cycle_tasks: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.num_envs = num_envs
        self.num_tasks = num_tasks
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.episode_length = episode_length
        self.episodes_per_trial = episodes_per_trial
        self.cycle_tasks = cycle_tasks
        self.token_dim = token_dim(obs_dim, action_dim)
        self._seed = seed
        self._task_order = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed))
        self._shard = (0, 1)
        self._trials_started = torch.zeros(num_envs, dtype=torch.long)
        self._episode_idx = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._step_idx = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._task_id = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._observation = torch.zeros(num_envs, obs_dim, device=self.device)
        self._token = torch.zeros(num_envs, self.token_dim, device=self.device)
        self._make_specs()

    # ------------------------------------------------------------------ simulator hooks
    @abc.abstractmethod
    def _assign_tasks(self, env_ids: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Give slots ``env_ids [n]`` the tasks ``task_ids [n]`` (called at a trial start)."""

    @abc.abstractmethod
    def _reset_sim(self, env_ids: torch.Tensor) -> torch.Tensor:
        """Reset the simulator of slots ``env_ids [n]`` on their current task; returns ``[n, obs_dim]``."""

    @abc.abstractmethod
    def _step_sim(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step all slots with ``action [M, action_dim]``.

        Returns ``observation [M, obs_dim]``, ``reward [M]`` and ``success [M]`` (bool).
        """

    def _seed_sim(self, seed: int) -> None:
        """Seed the simulator (optional)."""

    # ------------------------------------------------------------------ TorchRL API
    def _make_specs(self) -> None:
        m = self.batch_size
        index = Unbounded(shape=m, dtype=torch.long, device=self.device)
        self.observation_spec = Composite(
            observation=Unbounded(shape=(*m, self.obs_dim), device=self.device),
            token=Unbounded(shape=(*m, self.token_dim), device=self.device),
            episode_idx=index,
            step_in_episode=index.clone(),
            task_id=index.clone(),
            success=Categorical(2, shape=m, dtype=torch.bool, device=self.device),
            shape=m,
        )
        self.action_spec = Bounded(-1.0, 1.0, shape=(*m, self.action_dim), device=self.device)
        self.reward_spec = Unbounded(shape=(*m, 1), device=self.device)
        flag = Categorical(2, shape=(*m, 1), dtype=torch.bool, device=self.device)
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=m)

    def _draw_tasks(self, env_ids: torch.Tensor) -> torch.Tensor:
        if self.cycle_tasks:
            slots = env_ids.cpu()
            local = self._trials_started[slots] * self.num_envs + slots
            tasks = self._task_order[self.global_trials(local) % self.num_tasks]
        else:
            # Counter-based draws: the task of a slot's j-th trial depends only on (seed, slot, j),
            # so a run resumed from a checkpoint (which stores j) continues the same task sequence.
            slots = env_ids.cpu()
            tasks = torch.tensor(
                [self._task_draw(int(slot), int(self._trials_started[slot])) for slot in slots], dtype=torch.long
            )
        self._trials_started[env_ids.cpu()] += 1
        return tasks.to(self.device)

    def _task_draw(self, slot: int, trial: int) -> int:
        generator = torch.Generator().manual_seed(hash((self._seed, slot, trial)) & 0x7FFF_FFFF_FFFF_FFFF)
        return int(torch.randint(self.num_tasks, (1,), generator=generator))

    def start_at_trial(self, trial: int) -> None:
        """Continue the task sequence as if every slot had already started ``trial`` trials."""
        self._trials_started.fill_(trial)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(self.num_envs)
        else:
            mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        env_ids = mask.nonzero().squeeze(-1)
        if len(env_ids):
            task_ids = self._draw_tasks(env_ids)
            self._assign_tasks(env_ids, task_ids)
            self._task_id[env_ids] = task_ids
            self._episode_idx[env_ids] = 0
            self._step_idx[env_ids] = 0
            obs = self._reset_sim(env_ids).to(self.device, torch.float32)
            self._observation[env_ids] = obs
            self._token[env_ids] = 0.0
            self._token[env_ids, : self.obs_dim] = obs
        done = torch.zeros(self.num_envs, 1, dtype=torch.bool, device=self.device)
        return self._emit(
            success=torch.zeros(self.num_envs, dtype=torch.bool, device=self.device),
            done=done,
            terminated=done.clone(),
            truncated=done.clone(),
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").clamp(-1.0, 1.0)
        obs, reward, success = self._step_sim(action)
        obs = obs.to(self.device, torch.float32)
        reward = reward.to(self.device, torch.float32)
        self._step_idx += 1
        episode_over = self._step_idx >= self.episode_length
        trial_over = episode_over & (self._episode_idx >= self.episodes_per_trial - 1)
        next_episode = episode_over & ~trial_over
        if next_episode.any():
            env_ids = next_episode.nonzero().squeeze(-1)
            obs[env_ids] = self._reset_sim(env_ids).to(self.device, torch.float32)
            self._episode_idx[env_ids] += 1
            self._step_idx[env_ids] = 0
        self._observation = obs
        self._token = torch.cat(
            [
                obs,
                action.to(torch.float32),
                reward.unsqueeze(-1),
                episode_over.unsqueeze(-1).to(torch.float32),
            ],
            dim=-1,
        )
        done = trial_over.unsqueeze(-1)
        out = self._emit(
            success=success.to(self.device, torch.bool),
            done=done,
            terminated=torch.zeros_like(done),
            truncated=done.clone(),
        )
        out.set("reward", reward.unsqueeze(-1))
        return out

    def _emit(self, **extra: torch.Tensor) -> TensorDict:
        return TensorDict(
            {
                "observation": self._observation.clone(),
                "token": self._token.clone(),
                "episode_idx": self._episode_idx.clone(),
                "step_in_episode": self._step_idx.clone(),
                "task_id": self._task_id.clone(),
                **extra,
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def set_shard(self, part: int, parts: int) -> None:
        """Take every ``parts``-th trial of the ``cycle_tasks`` schedule, starting at trial ``part``.

        Trial ``i`` of the single-env schedule runs task ``i % num_tasks`` of the fixed task order;
        this env's ``l``-th trial (round ``l // num_envs``, slot ``l % num_envs``) is trial
        ``l * parts + part`` of it. ``parts`` envs with equal ``seed`` and shards ``0 .. parts - 1``
        then run disjoint trials that together are the single-env schedule, whatever their
        ``num_envs``.
        """
        self._shard = (part, parts)

    def global_trials(self, local: torch.Tensor) -> torch.Tensor:
        """Index in the single-env ``cycle_tasks`` schedule of this env's trials ``local`` (see :meth:`set_shard`)."""
        part, parts = self._shard
        return local * parts + part

    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            return
        # Seeding restarts the task schedule, so equal seeds give equal task sequences.
        self._seed = seed
        self._trials_started.zero_()
        self._seed_sim(seed)
