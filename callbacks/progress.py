"""The progress bar of a run: what a user reads while it trains."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the values ``MetaPPO`` and ``MetaTestEvaluation`` put in it
    (frames, frames per second, training success, held-out success), without the logger's version
    (``v_num``: the run folder is printed and saved already)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The held-out evaluation logs after this bar's epoch-end refresh: show its result too.
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        super().on_train_end(trainer, pl_module)
