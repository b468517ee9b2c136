"""Meta-RL bookkeeping for multi-process (DDP) training.

Lightning's DDP strategy syncs gradients (``MetaPPO`` only uses ``manual_backward``). What DDP does
not know about is the meta-batch: this callback gives every process its share of the trials, checks
that the processes collect different tasks and that their weights stay identical. The rest lives
where it belongs: each process seeds its envs from ``(data.seed, rank)``
(:meth:`MetaRLDataModule.process_seed`), ``MetaPPO`` counts frames over all processes and normalises
rewards with statistics gathered from all of them, and ``MetaTestEvaluation`` splits the held-out
trials across processes and reduces the means.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tensordict import TensorDictBase

from lightning_htrmrl.validation import ConfigError


class DDPScaling(Callback):
    """Share the meta-batch across processes and monitor that they stay in sync.

    Logs ``ddp/weight_spread`` (largest difference of any parameter or buffer, e.g. the input
    normalisation statistics, between processes after an epoch: 0 when in sync) and
    ``ddp/identical_task_fraction`` (fraction of trial slots of the first batch that got the same
    task on every process: about ``1 / num_tasks`` with distinct seeds).

    Args:
        split_meta_batch: divide ``data.num_envs`` (the trials of one batch) by the number of
            processes, so the global meta-batch and PPO batch stay as configured; otherwise every
            process collects ``data.num_envs`` trials and the global batch grows with the world size.
        scale_lr: multiply the learning rate by the number of processes (default off: with
            ``split_meta_batch`` the global batch is unchanged, so is the learning rate).
    """

    def __init__(self, split_meta_batch: bool = True, scale_lr: bool = False) -> None:
        self.split_meta_batch = split_meta_batch
        self.scale_lr = scale_lr

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        world = trainer.world_size
        if world == 1 or not self.split_meta_batch or stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule.num_envs % world:
            raise ConfigError(
                f"data.num_envs ({datamodule.num_envs}) must be divisible by the number of processes ({world}) "
                "when ddp.split_meta_batch is true"
            )
        datamodule.num_envs //= world
        rank_zero_info(f"DDP: {world} processes x {datamodule.num_envs} env slots each")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.scale_lr and trainer.world_size > 1:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= trainer.world_size

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TensorDictBase, batch_idx: int
    ) -> None:
        if trainer.world_size == 1 or pl_module.frames != batch.numel() * trainer.world_size:
            return
        # First batch of the run: compare each trial slot's task across processes.
        tasks = pl_module.all_gather(batch["task_id"][:, 0].contiguous())
        identical = (tasks == tasks[0]).all(dim=0).float().mean()
        pl_module.log("ddp/identical_task_fraction", identical, batch_size=1)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1:
            return
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        flat = torch.cat([t.detach().double().flatten() for t in tensors])
        gathered = pl_module.all_gather(flat)
        spread = (gathered.max(dim=0).values - gathered.min(dim=0).values).max()
        pl_module.log("ddp/weight_spread", spread, batch_size=1)
