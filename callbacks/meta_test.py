"""Meta-test evaluation: trials on held-out tasks, logged as the adaptation curve."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.aggregation import MeanMetric
from torchrl.envs.utils import ExplorationType, set_exploration_type

from lightning_htrmrl.envs.base import ConfigError, Split, check_split
from lightning_htrmrl.envs.trial import TrialEnv


class MetaTestEvaluation(Callback):
    """Every ``every_n_epochs`` epochs, run ``num_trials`` trials of ``K`` episodes on ``split`` tasks.

    Memory is kept across the episodes of a trial and cleared between trials, exactly as in
    training. Logs ``{prefix}/success``, ``{prefix}/return`` and, for ``k = 1..K``,
    ``{prefix}/success_ep{k}`` and ``{prefix}/return_ep{k}`` (an episode is a success if the task is
    solved at any of its steps). Under DDP each process evaluates its own share of the tasks and the
    means are reduced with torchmetrics, so the numbers do not depend on the number of processes.

    Args:
        every_n_epochs: evaluation period in training epochs.
        num_trials: trials per evaluation; ``None``: one per task of ``split``. Tasks are assigned
            in a fixed order, so the same tasks are evaluated every time and ``num_trials`` equal to
            the number of tasks covers each exactly once.
        num_envs: env slots stepped as one batch; ``None``: ``min(num_trials, data.num_envs)``.
        split: ``test`` (held-out tasks) or ``train``.
        deterministic: act with the distribution's mean instead of sampling (default: sample, as
            exploration in early episodes is part of in-context adaptation).
        seed: seeds the evaluation envs and memory; the same tasks are used at every evaluation.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_trials: int | None = None,
        num_envs: int | None = None,
        split: Split = "test",
        deterministic: bool = False,
        seed: int = 12345,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"MetaTestEvaluation.every_n_epochs must be >= 1, got {every_n_epochs}")
        for key, value in (("num_trials", num_trials), ("num_envs", num_envs)):
            if value is not None and value < 1:
                raise ConfigError(f"meta_test.{key} must be >= 1 or null, got {value}")
        check_split(split)
        self.every_n_epochs = every_n_epochs
        self.num_trials = num_trials
        self.num_envs = num_envs
        self.split = split
        self.deterministic = deterministic
        self.seed = seed
        self.prefix = "meta_test" if split == "test" else "meta_train_eval"
        self._env: TrialEnv | None = None
        self.last_results: dict[str, float] = {}

    def _trials(self, trainer: Trainer) -> int:
        return self.num_trials or len(trainer.datamodule.benchmark.task_names(self.split))

    def _get_env(self, trainer: Trainer, pl_module: LightningModule) -> TrialEnv:
        if self._env is None:
            datamodule = trainer.datamodule
            num_envs = self.num_envs or min(self._trials(trainer), datamodule.num_envs)
            self._env = datamodule.benchmark.make_env(
                self.split, num_envs, seed=self.seed, cycle_tasks=True, device=pl_module.device
            )
        return self._env

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Run the trials and return the synced metrics."""
        env = self._get_env(trainer, pl_module)
        env.set_seed(self.seed)
        env.set_shard(trainer.global_rank, trainer.world_size)
        policy = pl_module.make_policy(seed=self.seed)
        exploration = ExplorationType.DETERMINISTIC if self.deterministic else ExplorationType.RANDOM
        k, length = env.episodes_per_trial, env.episode_length
        # Under DDP every process runs its share of the trials; the means are synced below.
        num_trials = -(-self._trials(trainer) // trainer.world_size)
        rounds = -(-num_trials // env.num_envs)
        with set_exploration_type(exploration):
            # Each rollout starts with a reset, i.e. a new trial on the next tasks of the schedule.
            rollouts = [env.rollout(k * length, policy, break_when_any_done=False) for _ in range(rounds)]
        rollout = torch.cat(rollouts, dim=0)[:num_trials]
        success = rollout["next", "success"].reshape(-1, k, length).any(-1).float()
        returns = rollout["next", "reward"].reshape(-1, k, length).sum(-1)
        per_episode = {"success": success, "return": returns}
        metrics: dict[str, torch.Tensor] = {}
        for name, values in per_episode.items():
            metrics[f"{self.prefix}/{name}"] = self._mean(values, pl_module)
            for episode in range(k):
                metrics[f"{self.prefix}/{name}_ep{episode + 1}"] = self._mean(values[:, episode], pl_module)
        return metrics

    @staticmethod
    def _mean(values: torch.Tensor, pl_module: LightningModule) -> torch.Tensor:
        metric = MeanMetric().to(pl_module.device)
        metric.update(values.to(pl_module.device))
        return metric.compute()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        metrics = self.evaluate(trainer, pl_module)
        self.last_results = {key: float(value) for key, value in metrics.items()}
        pl_module.log_dict(metrics, batch_size=1)
        pl_module.log(f"{self.prefix}_success", metrics[f"{self.prefix}/success"], prog_bar=True, logger=False, batch_size=1)
