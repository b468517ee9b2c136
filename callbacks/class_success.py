"""Training success per task class (Meta-World ML10 / ML45): which classes the agent is learning."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tensordict import TensorDictBase

from lightning_htrmrl.trials import episode_outcomes


class ClassSuccess(Callback):
    """Logs ``meta_train/success_class/<class>`` after every training batch when the training tasks
    span several classes (ML10, ML45; nothing for ML1 or the point robot).

    The value is the mean success over the episodes of the batch's trials of that class, counted
    over every process (one all-reduce of per-class sums); a class with no trial in the batch is
    not logged for it. The held-out counterpart, ``meta_test/success_class/<class>``, is logged by
    ``MetaTestEvaluation``.
    """

    def __init__(self) -> None:
        self.class_names: list[str] = []
        self._class_of_task = torch.zeros(0, dtype=torch.long)  # [num train tasks] -> class index

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        benchmark = getattr(trainer.datamodule, "benchmark", None)
        classes = benchmark.task_classes("train") if hasattr(benchmark, "task_classes") else []
        names = sorted(set(classes))
        self.class_names = names if len(names) > 1 else []
        self._class_of_task = torch.tensor([names.index(name) for name in classes], dtype=torch.long)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TensorDictBase, batch_idx: int
    ) -> None:
        if not self.class_names:
            return
        data = trainer.datamodule
        success, _ = episode_outcomes(batch, data.episodes_per_trial, data.episode_length)  # [B, K]
        classes = self._class_of_task[batch["task_id"][:, 0].cpu()]  # [B]
        sums = torch.zeros(2, len(self.class_names), dtype=torch.float64, device=pl_module.device)
        sums[0].index_add_(0, classes.to(sums.device), success.mean(-1).to(sums))  # success summed per class
        sums[1].index_add_(0, classes.to(sums.device), torch.ones_like(classes, dtype=sums.dtype, device=sums.device))
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        for name, total, count in zip(self.class_names, *sums.tolist()):
            if count:
                pl_module.log(f"meta_train/success_class/{name}", total / count, batch_size=1)
