"""The config-level description of a task distribution.

A :class:`TaskDistribution` is cheap to build: it validates its options and knows the dimensions
the model needs (``obs_dim``, ``action_dim``) and the trial structure (``episode_length``,
``episodes_per_trial``), without constructing any simulator. Environments are built only by
:meth:`TaskDistribution.make_env`, after the model is on its device.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch

from lightning_htrmrl.envs.trial import TrialEnv
from lightning_htrmrl.trials import token_dim
from lightning_htrmrl.validation import ConfigError, require_positive

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


class TaskDistribution(abc.ABC):
    """A meta-RL task distribution with a train split and a held-out test split.

    Args:
        episode_length: ``L``, steps per episode.
        episodes_per_trial: ``K``, episodes per trial (tasks change only between trials).
    """

    obs_dim: int
    action_dim: int

    def __init__(self, episode_length: int, episodes_per_trial: int) -> None:
        require_positive("data.benchmark.init_args.episode_length", episode_length)
        require_positive("data.benchmark.init_args.episodes_per_trial", episodes_per_trial)
        self.episode_length = episode_length
        self.episodes_per_trial = episodes_per_trial

    @property
    def token_dim(self) -> int:
        """Size of the RL^2 token ``[s, a_prev, r_prev, done_prev]``."""
        return token_dim(self.obs_dim, self.action_dim)

    @abc.abstractmethod
    def task_names(self, split: Split) -> list[str]:
        """Human-readable name of every task id of ``split`` (index = task id)."""

    @abc.abstractmethod
    def make_env(
        self,
        split: Split,
        num_envs: int,
        seed: int = 0,
        cycle_tasks: bool = False,
        device: torch.device | str = "cpu",
    ) -> TrialEnv:
        """Build a batched env of ``num_envs`` slots over the tasks of ``split``."""

    def describe(self) -> dict:
        """Facts stored with checkpoints and results (benchmark, version, splits)."""
        return {
            "class": type(self).__name__,
            "episode_length": self.episode_length,
            "episodes_per_trial": self.episodes_per_trial,
            "num_train_tasks": len(self.task_names("train")),
            "num_test_tasks": len(self.task_names("test")),
        }


def check_split(split: str, key: str = "split") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``split`` is ``train`` or ``test``."""
    if split not in SPLITS:
        raise ConfigError(f"{key} must be one of {list(SPLITS)}, got {split!r}")
