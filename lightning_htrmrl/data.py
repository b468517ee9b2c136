"""LightningDataModule: a TorchRL Collector that yields batches of whole trials.

The collector is built in :meth:`MetaRLDataModule.train_dataloader`, i.e. after the model has been
moved to its device, with the model's collection policy (episodic memory + encoder + actor).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from tensordict import TensorDictBase
from torch.utils.data import DataLoader, IterableDataset
from torchrl.collectors import Collector

from lightning_htrmrl.envs.base import TaskDistribution
from lightning_htrmrl.envs.trial import TrialEnv
from lightning_htrmrl.validation import ConfigError, require_non_negative, require_positive


def _identity(batch: TensorDictBase) -> TensorDictBase:
    return batch


def make_train_env(
    benchmark: TaskDistribution, num_envs: int, seed: int, start_trial: int, torch_seed: int | None = None
) -> TrialEnv:
    """Train-split env whose slots continue their task sequences at trial ``start_trial``.

    ``torch_seed`` (given in a collector process) seeds that process's torch generator, which
    samples the actions: every process starts with torch's one fixed default seed, so without it
    all collector processes would draw the same exploration noise.
    """
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    env = benchmark.make_env("train", num_envs, seed=seed)
    env.start_at_trial(start_trial)
    return env


def shutdown_collector(collector: Collector) -> None:
    """Stop a collector's processes and its weight-sync schemes.

    TorchRL 0.14 leaves a multi-process collector's weight-sync scheme to its ``__del__``, which at
    interpreter exit blocks forever starting a queue thread; shutting it down here avoids the hang.
    """
    collector.shutdown()
    for scheme in (getattr(collector, "_weight_sync_schemes", None) or {}).values():
        scheme.shutdown()


class TrialBatches(IterableDataset):
    """``iterations`` batches of whole trials ``[rows, K*L]`` per epoch from a running collector."""

    def __init__(self, collector: Collector, iterations: int, trial_frames: int) -> None:
        self.collector = collector
        self.iterations = iterations
        self.trial_frames = trial_frames
        self._batches: Iterator[TensorDictBase] | None = None

    def __iter__(self) -> Iterator[TensorDictBase]:
        if self._batches is None:
            self._batches = iter(self.collector)
        for _ in range(self.iterations):
            self.collector.update_policy_weights_()
            batch = next(self._batches)
            # One row per trial; the features (computed with the current weights) feed the critic.
            yield batch.exclude("collector").reshape(-1, self.trial_frames)

    def __len__(self) -> int:
        return self.iterations


class MetaRLDataModule(LightningDataModule):
    """Collects whole trials of a task distribution's train split.

    Args:
        benchmark: the task distribution (class path and options).
        num_envs: ``M``, env slots of one collector process, counted over all DDP processes: each
            DDP process steps its share (``M // world_size``, one more on the first
            ``M % world_size`` processes) in each of its collectors, so a batch holds
            ``num_collectors * M * trials_per_env`` trials at any number of processes.
        trials_per_env: trials each slot runs per batch.
        num_collectors: collector processes of each DDP process (1: collect in the training process).
        iterations_per_epoch: training steps (collected batches) per Lightning epoch.
        seed: seeds task sampling and window sampling.
    """

    def __init__(
        self,
        benchmark: TaskDistribution,
        num_envs: int = 32,
        trials_per_env: int = 1,
        num_collectors: int = 1,
        iterations_per_epoch: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (
            ("num_envs", num_envs),
            ("trials_per_env", trials_per_env),
            ("num_collectors", num_collectors),
            ("iterations_per_epoch", iterations_per_epoch),
        ):
            require_positive(f"data.{key}", value)
        require_non_negative("data.seed", seed)
        if not isinstance(benchmark, TaskDistribution):
            raise ConfigError(f"data.benchmark must be a TaskDistribution, got {type(benchmark).__name__}")
        self.benchmark = benchmark
        self.num_envs = num_envs
        self.trials_per_env = trials_per_env
        self.num_collectors = num_collectors
        self.iterations_per_epoch = iterations_per_epoch
        self.seed = seed
        self.collector: Collector | None = None

    # Dimensions linked into the model by the CLI.
    @property
    def obs_dim(self) -> int:
        return self.benchmark.obs_dim

    @property
    def action_dim(self) -> int:
        return self.benchmark.action_dim

    @property
    def episode_length(self) -> int:
        return self.benchmark.episode_length

    @property
    def episodes_per_trial(self) -> int:
        return self.benchmark.episodes_per_trial

    @property
    def trial_frames(self) -> int:
        """Frames in one trial, ``K * L``."""
        return self.episode_length * self.episodes_per_trial

    @property
    def frames_per_batch(self) -> int:
        """Frames per training batch over all collector and DDP processes (always whole trials)."""
        return self.num_collectors * self.num_envs * self.trials_per_env * self.trial_frames

    @property
    def world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this DDP process (``(0, 1)`` without a trainer)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    @property
    def local_num_envs(self) -> int:
        """This DDP process's share of ``num_envs``: the slots each of its collectors steps."""
        rank, world_size = self.world
        return self.num_envs // world_size + (rank < self.num_envs % world_size)

    def setup(self, stage: str) -> None:
        _, world_size = self.world
        if stage == "fit" and self.num_envs < world_size:
            raise ConfigError(
                f"data.num_envs ({self.num_envs}) must be >= the number of processes ({world_size}): "
                "each collects a share of the slots"
            )
        if stage == "fit" and self.trainer is not None:
            # No validation loop in fit: the held-out trials run in MetaTestEvaluation at epoch ends.
            self.trainer.limit_val_batches = 0

    def process_seed(self, worker: int = 0) -> int:
        """Seed of one collector process's envs: distinct for every (seed, rank, worker)."""
        rank, _ = self.world
        return int(np.random.SeedSequence([self.seed, rank, worker]).generate_state(1)[0])

    def env_factory(self, worker: int = 0, in_own_process: bool = False) -> partial:
        """A picklable function that builds collector process ``worker``'s envs (own seed).

        Every batch holds exactly ``trials_per_env`` trials per slot, so after ``n`` batches each
        slot's task sequence continues at trial ``n * trials_per_env`` (restored on resume).
        """
        start = self.batches_collected * self.trials_per_env
        seed = self.process_seed(worker)
        # Action noise of a collector process: a fresh stream after a resume (seeded by the batch count).
        torch_seed = seed + self.batches_collected if in_own_process else None
        return partial(make_train_env, self.benchmark, self.local_num_envs, seed, start, torch_seed)

    @property
    def batches_collected(self) -> int:
        """Batches collected so far: the model's frame count (all processes, saved in checkpoints)
        over the frames of one batch."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            return 0
        return int(module.frames) // self.frames_per_batch

    def build_collector(self, policy, device: torch.device | str = "cpu") -> Collector:
        """A TorchRL Collector of whole-trial batches over the train split.

        With ``num_collectors > 1`` the envs run in that many processes (``sync=True``: on-policy
        batches), each with its own slots and seeds; the policy's weights are sent to them by
        ``update_policy_weights_()`` before every batch. This process keeps its torch threads
        (TorchRL would cut them to cores minus workers): the workers wait while it trains.

        Collector processes run the policy on the CPU and return CPU batches (Lightning moves them to
        the model's ``device``): TorchRL keeps a CPU copy of the weights in shared memory, which
        ``update_policy_weights_()`` refreshes from the model, so no process but this one touches a GPU.
        A policy stepping a few dozen envs gains nothing from a GPU, and each process would pay for its
        own CUDA context. With one collector the policy runs here, on ``device``.
        """
        common = dict(
            frames_per_batch=self.num_collectors * self.local_num_envs * self.trials_per_env * self.trial_frames,
            total_frames=-1,
            env_device="cpu",
            auto_register_policy_transforms=False,
        )
        if self.num_collectors == 1:
            return Collector(self.env_factory()(), policy, policy_device=device, storing_device=device, **common)
        # TorchRL starts its processes with the global start method; forked processes cannot use CUDA
        # (nor inherit a CUDA context safely), so they are spawned.
        if mp.get_start_method(allow_none=True) != "spawn":
            mp.set_start_method("spawn", force=True)
        env_fns = [self.env_factory(worker, in_own_process=True) for worker in range(self.num_collectors)]
        return Collector(
            env_fns,
            policy,
            num_collectors=self.num_collectors,
            sync=True,
            num_threads=torch.get_num_threads(),
            policy_device="cpu",
            storing_device="cpu",
            **common,
        )

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        # Window sampling continues on a fresh stream after a resume (seeded by the batch count).
        policy_seed = self.process_seed() + self.batches_collected
        self.collector = self.build_collector(module.make_policy(seed=policy_seed), module.device)
        dataset = TrialBatches(self.collector, self.iterations_per_epoch, self.trial_frames)
        return DataLoader(dataset, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader()

    def _evaluation_loader(self) -> DataLoader:
        """One placeholder batch for ``validate`` / ``test``.

        Meta-test trials are run by :class:`~lightning_htrmrl.callbacks.MetaTestEvaluation` (it
        needs the trial structure, not a data loader); during ``fit`` it runs every few epochs.
        """
        return DataLoader([0], batch_size=None)

    def teardown(self, stage: str) -> None:
        if self.collector is not None:
            shutdown_collector(self.collector)
            self.collector = None

    def on_exception(self, exception: BaseException) -> None:
        """Ctrl-C, SIGTERM or an error: stop the collector processes (Lightning skips ``teardown``)."""
        self.teardown("fit")
