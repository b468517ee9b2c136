"""Meta-RL bookkeeping for multi-process (DDP) training.

Lightning's DDP strategy syncs gradients (``MetaPPO`` only uses ``manual_backward``). What DDP does
not know about is the meta-batch: this callback checks that the processes collect different tasks
and that their weights stay identical, and stops every process at the same point on SIGTERM. The
rest lives where it belongs: each process collects its
share of ``data.num_envs`` and seeds its envs from ``(data.seed, rank)``
(:meth:`MetaRLDataModule.process_seed`), ``MetaPPO`` counts frames over all processes and normalises
rewards with statistics gathered from all of them, and ``MetaTestEvaluation`` splits the held-out
trials across processes and reduces the means.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
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

    SIGTERM under several processes: Lightning's handler runs a broadcast inside the signal
    handler and each process then stops at its own next check, so a signal that lands in a
    collective (the held-out evaluation's metric sync) can leave a process waiting for the
    others. Here the handler only notes the signal (and passes it on to the processes this one
    launched); after every training batch and at every epoch start the processes agree on it with
    one all-reduce and all raise Lightning's ``SIGTERMException`` together: the run stops after
    the batch (or the epoch's evaluation and checkpoint) in progress, on every process.

    Args:
        scale_lr: multiply the learning rate by the number of processes (default off: the global
            batch does not change with the number of processes, so neither does the learning rate).
    """

    def __init__(self, scale_lr: bool = False) -> None:
        self.scale_lr = scale_lr
        self._sigterm_received = False
        self._launcher = None

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registers its handler just before the fit loop starts; replace it here.
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            self._sigterm_received, self._launcher = False, trainer.strategy.launcher
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self._sigterm_received and self._launcher is not None:
            self._launcher.kill(signum)  # the processes started by this one (Lightning does the same)
        self._sigterm_received = True

    def _stop_together_on_sigterm(self, trainer: Trainer) -> None:
        if trainer.world_size == 1:
            return
        received = torch.tensor(float(self._sigterm_received), device=trainer.strategy.root_device)
        if trainer.strategy.reduce(received, reduce_op="max") > 0:
            raise SIGTERMException

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_together_on_sigterm(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TensorDictBase, batch_idx: int
    ) -> None:
        self._stop_together_on_sigterm(trainer)
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
