"""Task distributions as batched TorchRL envs that run whole trials."""

from lightning_htrmrl.envs.base import TaskDistribution
from lightning_htrmrl.envs.metaworld import MetaWorld, MetaWorldEnv
from lightning_htrmrl.envs.point_robot import PointRobot, PointRobotEnv
from lightning_htrmrl.envs.trial import TrialEnv

__all__ = ["MetaWorld", "MetaWorldEnv", "PointRobot", "PointRobotEnv", "TaskDistribution", "TrialEnv"]
