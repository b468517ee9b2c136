"""MetaPPO: the LightningModule that trains a context encoder + Gaussian actor/critic with PPO.

One training step consumes one batch of whole trials ``[B, K * L]`` from the collector:

1. evaluate the critic on the features the policy computed at collection (the batch was collected
   with the current weights) and run :class:`~torchrl.objectives.value.GAE` along the collected
   rows of whole trials (a trial is one long episode: exploration in episode 1 is credited by later
   episodes);
2. split the trials into episode records (each with the past windows chosen at collection);
3. ``ppo_epochs`` passes over minibatches of episodes from a TorchRL replay buffer, each pass
   recomputing features with gradients and calling :class:`~torchrl.objectives.ClipPPOLoss`,
   ``self.manual_backward``, ``self.clip_gradients`` and ``optimizer.step()``;
4. merge the batch's tokens into the encoder's input-normalisation statistics (used from the next
   collection on; the very first batch only initialises them and is not trained on).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, SamplerWithoutReplacement, TensorDictReplayBuffer
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.objectives.value.functional import reward2go

from lightning_htrmrl.callbacks.class_success import ClassSuccess
from lightning_htrmrl.callbacks.clock import FrameRate, fit_timer, training_minutes
from lightning_htrmrl.finite import raise_if_not_finite
from lightning_htrmrl.memory import WINDOW_SELECTIONS, WindowSelection, episode_records
from lightning_htrmrl.models import ContextEncoder, HierarchicalEncoder, make_actor, make_critic, make_policy
from lightning_htrmrl.models.heads import Distribution
from lightning_htrmrl.models.normalization import RunningMeanStd
from lightning_htrmrl.runs import CHECKPOINT_KEY, library_versions
from lightning_htrmrl.schedule import LinearToBudget, budget_progress
from lightning_htrmrl.trials import last_step_of_episode, trial_metrics
from lightning_htrmrl.validation import ConfigError, require_non_negative, require_positive

EncoderFactory = Callable[[int, int], ContextEncoder]
LOSS_KEYS = ("loss_objective", "loss_critic", "loss_entropy")
DIAGNOSTIC_KEYS = ("entropy", "clip_fraction", "kl_approx", "explained_variance", "ESS")
UPDATE_KEYS = (
    "past_windows",
    "past_valid",
    *(("steps", key) for key in ("token", "observation", "action", "action_log_prob", "advantage", "value_target")),
)


def check_optimization(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer and the scheduler on a probe parameter now, so that bad arguments fail
    before any heavy work (they are built for real in ``configure_optimizers``, inside ``fit``)."""
    try:
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as error:  # torch's own checks, e.g. "Invalid learning rate: -1"
        words = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "momentum": "momentum"}
        words |= {"weight_decay": "weight_decay", "dampening": "dampening"}
        key = next((name for word, name in words.items() if word in str(error)), "")
        raise ConfigError(f"model.optimizer.init_args{'.' + key if key else ''}: {error}") from None
    for group in probe.param_groups:
        if "lr" in group and not group["lr"] > 0:
            raise ConfigError(f"model.optimizer.init_args.lr must be > 0, got {group['lr']}")
    if lr_scheduler is not None:
        try:
            lr_scheduler(probe)
        except ValueError as error:  # torch's own checks, e.g. LinearLR's start_factor
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"model.lr_scheduler.init_args: {error}") from None


class MetaPPO(LightningModule):
    """PPO on whole trials for an in-context (RL^2-style) meta-RL policy.

    Args:
        obs_dim, action_dim, episode_length, episodes_per_trial: linked from the data module by the
            CLI (never set them in YAML).
        encoder: context encoder class and hyper-parameters, called as ``encoder(obs_dim, action_dim)``.
        actor_hidden, critic_hidden: hidden sizes of the tanh MLP heads.
        distribution: ``normal`` (the paper's Gaussian; the env clips actions) or ``tanh_normal``.
        init_std: initial action standard deviation.
        gamma, gae_lambda: discount and GAE lambda.
        advantage_horizon: ``trial`` (bootstrap across the episodes of a trial, done only at its end)
            or ``episode`` (every episode end is terminal).
        clip_epsilon, entropy_coeff, critic_coeff, normalize_advantage: ClipPPOLoss settings.
        normalize_rewards: divide the rewards used for GAE and the critic by the running standard
            deviation of the discounted trial return (the token and the logged returns keep the raw
            reward); keeps value targets O(1) whatever the reward scale of the benchmark.
        normalize_inputs: standardise the encoder's tokens and states per feature with running
            statistics of the collected tokens (``encoder.input_norm``). The first batch only
            initialises them (no update: it was collected without them); afterwards they are
            updated after each PPO update, so a batch is trained with the statistics it was
            collected with. Synced across DDP processes, saved in checkpoints.
        past_windows: how the window of each past episode is chosen when an episode starts:
            ``uniform`` (a uniformly drawn start, as in the paper) or ``max_reward`` (the window
            ending at that episode's highest-reward step). The starts are stored in the batch, so
            training recomputes exactly what was collected either way.
        ppo_epochs: passes over the batch per training step.
        episodes_per_minibatch: episodes per gradient step, over all DDP processes.
        max_grad_norm: gradient-norm clip.
        optimizer: optimizer class and arguments (``lr`` must be > 0).
        lr_scheduler: optional learning-rate schedule. ``lightning_htrmrl.schedule.LinearToBudget``
            (the shipped configs' CleanRL-style annealing) follows the fit's budget by itself, epochs
            or ``max_time``; any other ``torch.optim.lr_scheduler`` class is stepped once per PPO
            update. ``None``: constant.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        episode_length: int,
        episodes_per_trial: int,
        encoder: EncoderFactory = HierarchicalEncoder,
        actor_hidden: list[int] = [64, 64],  # noqa: B006 (read-only; jsonargparse needs a literal)
        critic_hidden: list[int] = [64, 64],  # noqa: B006
        distribution: Distribution = "normal",
        init_std: float = 1.0,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        advantage_horizon: Literal["trial", "episode"] = "trial",
        clip_epsilon: float = 0.2,
        entropy_coeff: float = 0.0,
        critic_coeff: float = 0.5,
        normalize_advantage: bool = True,
        normalize_rewards: bool = True,
        normalize_inputs: bool = True,
        past_windows: WindowSelection = "uniform",
        ppo_epochs: int = 4,
        episodes_per_minibatch: int = 32,
        max_grad_norm: float = 0.5,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        for key, value in (
            ("ppo_epochs", ppo_epochs),
            ("episodes_per_minibatch", episodes_per_minibatch),
            ("init_std", init_std),
            ("clip_epsilon", clip_epsilon),
            ("max_grad_norm", max_grad_norm),
        ):
            require_positive(f"model.{key}", value)
        for key, sizes in (("actor_hidden", actor_hidden), ("critic_hidden", critic_hidden)):
            if any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes):
                raise ConfigError(f"model.{key} must be layer widths >= 1, got {list(sizes)}")
        require_non_negative("model.entropy_coeff", entropy_coeff)
        require_positive("model.critic_coeff", critic_coeff)
        if past_windows not in WINDOW_SELECTIONS:
            raise ConfigError(f"model.past_windows must be one of {list(WINDOW_SELECTIONS)}, got {past_windows!r}")
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= gae_lambda <= 1.0:
            raise ConfigError(f"model.gamma and model.gae_lambda must lie in [0, 1], got {gamma}, {gae_lambda}")
        self.save_hyperparameters(ignore=["encoder", "optimizer", "lr_scheduler"])
        self.encoder = encoder(obs_dim, action_dim)
        if self.encoder.window > episode_length:
            raise ConfigError(
                f"model.encoder.init_args.window (T={self.encoder.window}) must be <= the episode length "
                f"({episode_length})"
            )
        if self.encoder.num_episodes > episodes_per_trial:
            raise ConfigError(
                f"model.encoder.init_args.num_episodes (N={self.encoder.num_episodes}) must be <= "
                f"episodes_per_trial ({episodes_per_trial}): memory never spans trials"
            )
        self.actor = make_actor(self.encoder.out_features, action_dim, actor_hidden, distribution, init_std)
        self.critic = make_critic(self.encoder.out_features, critic_hidden)
        self.loss_module = ClipPPOLoss(
            self.actor,
            self.critic,
            clip_epsilon=clip_epsilon,
            entropy_bonus=entropy_coeff > 0,
            entropy_coeff=entropy_coeff,
            critic_coeff=critic_coeff,
            loss_critic_type="l2",
            normalize_advantage=normalize_advantage,
        )
        self.advantage_module = GAE(gamma=gamma, lmbda=gae_lambda, value_network=None)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        check_optimization(optimizer, lr_scheduler)
        self.automatic_optimization = False
        self.register_buffer("frames", torch.zeros((), dtype=torch.long))
        self.register_buffer("ppo_updates", torch.zeros((), dtype=torch.long))  # PPO updates of the fit
        self.return_stats = RunningMeanStd()
        self._buffer: TensorDictReplayBuffer | None = None
        self.resolved_config: str | None = None  # set by the CLI; stored in checkpoints

    # ------------------------------------------------------------------ policies
    def make_policy(self, seed: int = 0):
        """A fresh collection/evaluation policy (own memory, shared weights)."""
        return make_policy(self.encoder, self.actor, self.hparams.episode_length, seed, self.hparams.past_windows)

    # ------------------------------------------------------------------ training
    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def configure_callbacks(self) -> list[Callback]:
        """The frame-rate log, training success per task class, and a training clock (Lightning's
        Timer) where ``max_time`` has not installed one already."""
        has_timer = self._trainer is not None and fit_timer(self.trainer) is not None
        return [FrameRate(), ClassSuccess()] + ([] if has_timer else [Timer()])

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def episode_records(self, trials: TensorDictBase) -> TensorDict:
        """``[B, K*L]`` trials -> ``[B*K]`` episode records (see :func:`~lightning_htrmrl.memory.episode_records`)."""
        return episode_records(trials, self.encoder.num_episodes, self.encoder.window, self.hparams.episode_length)

    def episode_features(self, records: TensorDictBase) -> torch.Tensor:
        """Features of every step of the episode records ``[E]`` -> ``[E, L, F]``."""
        steps = records["steps"]
        return self.encoder(steps["token"], steps["observation"], records["past_windows"], records["past_valid"])

    @torch.no_grad()
    def recompute_log_prob(self, trials: TensorDictBase) -> torch.Tensor:
        """Log-probs of the collected actions under the current weights, ``[B*K, L]`` (parity check)."""
        records = self.episode_records(trials)
        steps = records["steps"].clone(False)
        steps["features"] = self.episode_features(records)
        return self.actor.get_dist(steps).log_prob(steps["action"])

    @torch.no_grad()
    def estimate_advantage(self, trials: TensorDictBase) -> None:
        """Write ``state_value``, ``advantage`` and ``value_target`` ``[B, K*L, 1]`` into ``trials``.

        Values come from the current critic on the features the policy computed at collection
        (batches are collected with the current weights, so they equal a recompute). GAE runs along
        each collected row of whole trials ``[B, K*L]``, the layout the collector produced.
        """
        values = self.critic(trials.select("features"))["state_value"]
        if self.hparams.advantage_horizon == "episode":
            done = last_step_of_episode(trials["step_in_episode"], self.hparams.episode_length).unsqueeze(-1)
        else:
            done = trials["next", "done"]
        next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
        reward = trials["next", "reward"]
        if self.hparams.normalize_rewards:
            returns = reward2go(reward, done, self.hparams.gamma, time_dim=-2)
            # Every process normalises with the same statistics (those of all processes' returns).
            self.return_stats.update(returns, self.all_gather if self._world_size > 1 else None)
            reward = reward / self.return_stats.std
        gae_input = TensorDict(
            {
                "state_value": values,
                "next": {"state_value": next_values, "reward": reward, "done": done, "terminated": done},
            },
            batch_size=trials.shape,
        )
        self.advantage_module(gae_input)
        trials.update(gae_input.select("state_value", "advantage", "value_target"))

    def _episode_buffer(self, num_episodes: int) -> TensorDictReplayBuffer:
        """An empty replay buffer of ``num_episodes`` episode records (one PPO batch)."""
        if (
            self._buffer is None
            or self._buffer.storage.max_size != num_episodes
            or self._buffer.storage.device != self.device
        ):
            self._buffer = TensorDictReplayBuffer(
                storage=LazyTensorStorage(num_episodes, device=self.device), sampler=SamplerWithoutReplacement()
            )
        self._buffer.empty()
        return self._buffer

    def minibatch_sizes(self, num_episodes: int) -> tuple[list[int], list[float]]:
        """This process's minibatch sizes for one pass over its ``num_episodes`` episodes, and the
        weight of each minibatch's loss.

        ``episodes_per_minibatch`` counts episodes over all DDP processes, so a gradient step sees
        the same number of episodes at any process count. Every process makes the same number of
        steps (DDP averages their gradients at each one); when the processes hold different numbers
        of episodes (uneven shares of ``data.num_envs``), a process's loss is weighted by its share
        of the step's episodes, so the averaged gradient is that of the mean over all of them.
        With one process: ``ceil(n / episodes_per_minibatch)`` near-equal minibatches of weight 1.
        """
        if self._world_size > 1:
            counts = self.all_gather(torch.tensor(num_episodes, device=self.device)).flatten().tolist()
        else:
            counts = [num_episodes]
        steps = min(-(-sum(counts) // self.hparams.episodes_per_minibatch), min(counts))
        sizes = [[len(chunk) for chunk in torch.arange(count).tensor_split(steps)] for count in counts]
        totals = [sum(column) for column in zip(*sizes, strict=True)]
        rank = self.global_rank if self._world_size > 1 else 0
        weights = [size * len(counts) / total for size, total in zip(sizes[rank], totals, strict=True)]
        return sizes[rank], weights

    def set_learning_rate(self) -> float:
        """Apply the schedule's rate for the coming PPO update and return it.

        ``LinearToBudget`` is set from the fraction of the fit's budget spent; another scheduler is
        stepped after every update but the first (manual optimization: Lightning leaves stepping to us).
        """
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, LinearToBudget):
            first_batch_trains = not self.hparams.normalize_inputs
            scheduler.set_progress(budget_progress(self.trainer, int(self.ppo_updates), first_batch_trains))
        elif scheduler is not None and self.ppo_updates > 0:
            scheduler.step()
        return self.optimizers().param_groups[0]["lr"]

    def ppo_update(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """GAE, then ``ppo_epochs`` passes over minibatches of episodes; returns the mean losses."""
        optimizer = self.optimizers()
        self.estimate_advantage(batch)
        # The buffer holds what the minibatches read: the encoder's inputs and the loss's keys.
        records = self.episode_records(batch).select(*UPDATE_KEYS)
        buffer = self._episode_buffer(len(records))
        buffer.extend(records)
        sizes, weights = self.minibatch_sizes(len(records))
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        updates = 0
        for _ in range(self.hparams.ppo_epochs):
            for size, weight in zip(sizes, weights, strict=True):
                minibatch = buffer.sample(size)  # without replacement: a pass covers every episode once
                steps = minibatch["steps"].clone(False)
                steps["features"] = self.episode_features(minibatch)
                losses = self.loss_module(steps)
                loss = sum(losses[key] for key in LOSS_KEYS if key in losses.keys())
                optimizer.zero_grad()
                self.manual_backward(loss * weight if weight != 1.0 else loss)
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm"
                )
                optimizer.step()
                updates += 1
                sums["loss"] += loss.detach()
                for key in LOSS_KEYS + DIAGNOSTIC_KEYS:
                    if key in losses.keys():
                        sums[key] += losses[key].detach().float().mean()
        return {f"train/{key}": value / updates for key, value in sums.items()}

    def update_input_norm(self, batch: TensorDictBase) -> None:
        """Merge the batch's tokens (every process's) into the encoder's input statistics."""
        gather = self.all_gather if self._world_size > 1 else None
        self.encoder.input_norm.update(batch["token"], gather)

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> None:
        metrics: dict[str, torch.Tensor] = {}
        if self.hparams.normalize_inputs and not self.encoder.input_norm.initialized:
            self.update_input_norm(batch)  # collected without statistics: it only initialises them
        else:
            metrics["train/lr"] = torch.tensor(self.set_learning_rate())
            metrics.update(self.ppo_update(batch))
            raise_if_not_finite(metrics, self, f"step {self.global_step} (frame {int(self.frames)})")
            self.ppo_updates += 1
            if self.hparams.normalize_inputs:
                self.update_input_norm(batch)
        metrics.update(trial_metrics(batch, self.hparams.episodes_per_trial, self.hparams.episode_length, "meta_train"))
        # Frames and fps count every process (their shares may differ by a slot), so curves from
        # runs on different numbers of devices share one x-axis.
        frames = batch.numel()
        if self._world_size > 1:
            frames = int(self.trainer.strategy.reduce(torch.tensor(frames, device=self.device), reduce_op="sum"))
        self.frames += frames
        metrics["train/frames"] = self.frames.float()
        self.log_dict(metrics, batch_size=1)
        progress = {"frames": self.frames.float(), "success": metrics["meta_train/success"]}
        self.log_dict(progress, prog_bar=True, logger=False, batch_size=1)

    def validation_step(self, batch: object, batch_idx: int) -> None:
        """Nothing per batch: ``MetaTestEvaluation`` runs whole trials at the end of the epoch."""

    def test_step(self, batch: object, batch_idx: int) -> None:
        """Nothing per batch: ``MetaTestEvaluation`` runs whole trials at the end of the epoch."""

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store library versions, the task distribution's facts and the resolved config."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            "versions": library_versions(),
            "benchmark": datamodule.benchmark.describe() if datamodule is not None else None,
            "config": self.resolved_config,
            "torch_rng_state": torch.get_rng_state(),
            "elapsed_s": training_minutes(self._trainer) * 60.0,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise ConfigError("ckpt_path: this checkpoint was not written by lightning_htrmrl (no 'htrmrl' entry)")
        # Checkpoints written before the clock was Lightning's Timer: its elapsed time from ours.
        elapsed_s = float(checkpoint[CHECKPOINT_KEY].get("elapsed_s", 0.0))
        checkpoint.setdefault("callbacks", {}).setdefault("Timer", {"time_elapsed": {"train": elapsed_s}})
        # Checkpoints written before inputs were normalised load with the identity normalisation.
        state = checkpoint.get("state_dict", {})
        for key, value in self.encoder.input_norm.state_dict(prefix="encoder.input_norm.").items():
            state.setdefault(key, value)
        # Checkpoints written before updates were counted: one update per batch after the first.
        batches = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = batches.get("total", {}).get("completed", 0)
        state.setdefault("ppo_updates", torch.tensor(max(done - int(self.hparams.normalize_inputs), 0)))
        rng_state = checkpoint[CHECKPOINT_KEY].get("torch_rng_state")
        if rng_state is not None:
            torch.set_rng_state(rng_state)  # action sampling continues where it stopped
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if resuming and self.lr_scheduler_factory is not None and not checkpoint.get("lr_schedulers"):
            rank_zero_info(
                "note: ckpt_path: the checkpoint has no learning-rate schedule state (it trained at a constant "
                "rate); model.lr_scheduler starts from its first step"
            )
