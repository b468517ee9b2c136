"""2-D point-robot goal reaching: a pure-torch task distribution for tests and quick experiments.

A point starts at the origin; an action in ``[-1, 1]^2`` moves it by ``max_step * action``. The goal
lies on the unit upper half-circle and is hidden from the observation (the position), so the agent
must find it by exploring and then return to it in later episodes of the trial. ``num_goals``
angles are spread evenly over ``(0, pi)``; even-indexed ones are train goals and odd-indexed ones
the held-out test goals, so the two splits interleave and never overlap.
"""

from __future__ import annotations

import math

import torch

from lightning_htrmrl.envs.base import Split, TaskDistribution, check_split
from lightning_htrmrl.envs.trial import TrialEnv
from lightning_htrmrl.validation import ConfigError, require_positive

_KEY = "data.benchmark.init_args"  # where the options live in the config (error messages)


class PointRobotEnv(TrialEnv):
    """Batched point-robot env; all slots step in one tensor op (thousands at once).

    Args:
        goals: ``[num_tasks, 2]`` goal positions of this split.
        sparse: if True the reward is 1 inside ``reward_radius`` of the goal and 0 elsewhere;
            otherwise it is minus the distance to the goal.
        max_step: largest move per step.
        success_radius: a step is a success when the point is this close to the goal.
        reward_radius: radius of the sparse reward.
        **trial_kwargs: forwarded to :class:`TrialEnv`.
    """

    def __init__(
        self,
        goals: torch.Tensor,
        *,
        sparse: bool = False,
        max_step: float = 0.1,
        success_radius: float = 0.1,
        reward_radius: float = 0.2,
        **trial_kwargs,
    ) -> None:
        super().__init__(num_tasks=len(goals), obs_dim=2, action_dim=2, **trial_kwargs)
        self.goals = goals.to(self.device, torch.float32)
        self.sparse = sparse
        self.max_step = max_step
        self.success_radius = success_radius
        self.reward_radius = reward_radius
        self._position = torch.zeros(self.num_envs, 2, device=self.device)
        self._goal = torch.zeros(self.num_envs, 2, device=self.device)

    def _assign_tasks(self, env_ids: torch.Tensor, task_ids: torch.Tensor) -> None:
        self._goal[env_ids] = self.goals[task_ids]

    def _reset_sim(self, env_ids: torch.Tensor) -> torch.Tensor:
        self._position[env_ids] = 0.0
        return self._position[env_ids].clone()

    def _step_sim(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._position = self._position + self.max_step * action.to(self._position)
        distance = (self._position - self._goal).norm(dim=-1)
        if self.sparse:
            reward = (distance <= self.reward_radius).float()
        else:
            reward = -distance
        return self._position.clone(), reward, distance <= self.success_radius


class PointRobot(TaskDistribution):
    """Point-robot goal reaching on the upper unit half-circle.

    Args:
        episode_length: ``L``, steps per episode.
        episodes_per_trial: ``K``, episodes per trial.
        num_goals: goal angles spread over ``(0, pi)``; half train (even), half test (odd).
        sparse: sparse reward (1 within ``reward_radius``) instead of minus the distance.
        max_step: largest move per step.
        success_radius: distance to the goal that counts as success.
        reward_radius: radius of the sparse reward.
    """

    obs_dim = 2
    action_dim = 2

    def __init__(
        self,
        episode_length: int = 50,
        episodes_per_trial: int = 4,
        num_goals: int = 40,
        sparse: bool = False,
        max_step: float = 0.1,
        success_radius: float = 0.1,
        reward_radius: float = 0.2,
    ) -> None:
        super().__init__(episode_length, episodes_per_trial)
        if num_goals < 2:
            raise ConfigError(f"{_KEY}.num_goals must be >= 2 (one train and one test goal), got {num_goals!r}")
        require_positive(f"{_KEY}.max_step", max_step)
        require_positive(f"{_KEY}.success_radius", success_radius)
        require_positive(f"{_KEY}.reward_radius", reward_radius)
        self.num_goals = num_goals
        self.sparse = sparse
        self.max_step = max_step
        self.success_radius = success_radius
        self.reward_radius = reward_radius

    def goal_angles(self, split: Split) -> torch.Tensor:
        """Goal angles (radians) of ``split``: ``[num_tasks]``."""
        check_split(split)
        angles = math.pi * (torch.arange(self.num_goals, dtype=torch.float64) + 0.5) / self.num_goals
        return angles[0::2] if split == "train" else angles[1::2]

    def goals(self, split: Split) -> torch.Tensor:
        """Goal positions of ``split``: ``[num_tasks, 2]``."""
        angles = self.goal_angles(split)
        return torch.stack([angles.cos(), angles.sin()], dim=-1).float()

    def task_names(self, split: Split) -> list[str]:
        return [f"goal_{math.degrees(a):.1f}deg" for a in self.goal_angles(split).tolist()]

    def make_env(
        self,
        split: Split,
        num_envs: int,
        seed: int = 0,
        cycle_tasks: bool = False,
        device: torch.device | str = "cpu",
    ) -> PointRobotEnv:
        return PointRobotEnv(
            self.goals(split),
            sparse=self.sparse,
            max_step=self.max_step,
            success_radius=self.success_radius,
            reward_radius=self.reward_radius,
            num_envs=num_envs,
            episode_length=self.episode_length,
            episodes_per_trial=self.episodes_per_trial,
            seed=seed,
            cycle_tasks=cycle_tasks,
            device=device,
        )
