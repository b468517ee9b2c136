"""Meta-RL bookkeeping for multi-process (DDP) training.

Lightning's DDP strategy syncs gradients (``MetaPPO`` only uses ``manual_backward``). What DDP does
not know about is the meta-batch: this callback checks that the processes collect different tasks
and that their weights stay identical. The rest lives where it belongs: each process collects its
share of ``data.num_envs`` and seeds its envs from ``(data.seed, rank)``
(:meth:`MetaRLDataModule.process_seed`), ``MetaPPO`` counts frames over all processes and normalises
rewards with statistics gathered from all of them, and ``MetaTestEvaluation`` splits the held-out
trials across processes and reduces the means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tensordict import TensorDictBase


class DDPScaling(Callback):
    """Monitor that the processes collect different tasks and stay in sync.

    Each process collects its share of the meta-batch (``data.num_envs`` counts slots over all
    processes, see :class:`~lightning_htrmrl.data.MetaRLDataModule`), so the global batch, the
    PPO minibatches and the frame count are those of one process at any process count.

    Logs ``ddp/weight_spread`` (largest difference of any parameter or buffer, e.g. the input
    normalisation statistics, between processes after an epoch: 0 when in sync) and
    ``ddp/identical_task_fraction`` (fraction of trial slots of the first batch that got the same
    task on every process: about ``1 / num_tasks`` with distinct seeds).

    Args:
        scale_lr: multiply the learning rate by the number of processes (default off: the global
            batch does not change with the number of processes, so neither does the learning rate).
    """

    def __init__(self, scale_lr: bool = False) -> None:
        self.scale_lr = scale_lr

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and stage == "fit":
            datamodule = trainer.datamodule
            rank_zero_info(
                f"DDP: {trainer.world_size} processes share data.num_envs {datamodule.num_envs} "
                f"({datamodule.num_envs // trainer.world_size}-{-(-datamodule.num_envs // trainer.world_size)} "
                "slots per collector each)"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.scale_lr and trainer.world_size > 1:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= trainer.world_size

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TensorDictBase, batch_idx: int
    ) -> None:
        if trainer.world_size == 1 or pl_module.frames != trainer.datamodule.frames_per_batch:
            return
        # First batch of the run: compare each trial slot's task across processes (shares may
        # differ by a slot: pad, compare the slots every process has).
        data = trainer.datamodule
        longest = data.num_collectors * -(-data.num_envs // trainer.world_size) * data.trials_per_env
        tasks = batch["task_id"][:, 0].contiguous()
        gathered = pl_module.all_gather(F.pad(tasks, (0, longest - len(tasks)), value=-1))
        gathered = gathered[:, : int((gathered >= 0).sum(dim=1).min())]
        identical = (gathered == gathered[0]).all(dim=0).float().mean()
        pl_module.log("ddp/identical_task_fraction", identical, batch_size=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1:
            return
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        flat = torch.cat([t.detach().double().flatten() for t in tensors])
        gathered = pl_module.all_gather(flat)
        spread = (gathered.max(dim=0).values - gathered.min(dim=0).values).max()
        pl_module.log("ddp/weight_spread", spread, batch_size=1)
