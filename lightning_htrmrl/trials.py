"""Whole-trial arithmetic shared by collection, training and evaluation.

A *trial* is ``K`` episodes of ``L`` steps on one task; a batch of trials is a TensorDict
``[B, K*L]``. Every step carries the RL^2 token ``[s_t, a_{t-1}, r_{t-1}, done_{t-1}]``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

REWARD_ENTRY = -2  # index of r_{t-1} in a token


def token_dim(obs_dim: int, action_dim: int) -> int:
    """Size of the token ``[s_t, a_{t-1}, r_{t-1}, done_{t-1}]``."""
    return obs_dim + action_dim + 2


def last_step_of_episode(step_in_episode: torch.Tensor, episode_length: int) -> torch.Tensor:
    """Whether each step is the last of its episode (same shape as ``step_in_episode``)."""
    return step_in_episode == episode_length - 1


def episode_outcomes(trials: TensorDictBase, episodes_per_trial: int, episode_length: int):
    """Success and return of every episode of ``[B, K*L]`` trials: two ``[B, K]`` tensors.

    An episode is a success if ``success`` is set at any of its steps; its return is the sum of
    the (scaled) rewards.
    """
    shape = (-1, episodes_per_trial, episode_length)
    success = trials["next", "success"].reshape(shape).any(-1).float()
    returns = trials["next", "reward"].reshape(shape).sum(-1)
    return success, returns


def trial_metrics(trials: TensorDictBase, episodes_per_trial: int, episode_length: int, prefix: str) -> dict:
    """``{prefix}/success``, ``{prefix}/return`` and their ``_ep{k}`` per episode index (scalars) of
    a batch of whole trials ``[B, K*L]``."""
    success, returns = episode_outcomes(trials, episodes_per_trial, episode_length)
    metrics = {f"{prefix}/success": success.mean(), f"{prefix}/return": returns.mean()}
    for episode in range(episodes_per_trial):
        metrics[f"{prefix}/success_ep{episode + 1}"] = success[:, episode].mean()
        metrics[f"{prefix}/return_ep{episode + 1}"] = returns[:, episode].mean()
    return metrics
