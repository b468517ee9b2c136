"""Where a run's wall time goes: the training clock and the frame rate of every batch.

The clock is Lightning's :class:`~lightning.pytorch.callbacks.Timer` (the one ``trainer.max_time``
installs, or one without a limit): it saves its elapsed time in checkpoints, so a resumed run's
minutes continue. Lightning's ``ThroughputMonitor`` is not used for the frame rate: it reports
samples per second over a window of steps, without the split between waiting for the collector and
the PPO update that tells where a run's time goes.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from tensordict import TensorDictBase


def fit_timer(trainer: Trainer) -> Timer | None:
    """The trainer's Timer (``max_time``'s, or :class:`FrameRate`'s), None without one."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, Timer)), None)


def training_minutes(trainer: Trainer | None) -> float:
    """Wall-clock minutes of training (evaluations included), continued across resumes."""
    timer = fit_timer(trainer) if trainer is not None else None
    return timer.time_elapsed("train") / 60.0 if timer is not None else 0.0


class FrameRate(Callback):
    """Logs, after every training batch: ``time/collect_s`` (waiting for the collector's batch),
    ``time/update_s`` (the training step: GAE, PPO epochs, statistics), ``time/fps`` (frames of all
    processes over both) and ``time/elapsed_min`` (:func:`training_minutes`); ``fps`` also in the
    progress bar. The first batch of an epoch has no ``collect_s`` / ``fps``: evaluations and
    collector start-up between epochs are not collection.

    ``MetaPPO.configure_callbacks`` installs it, with a Timer when the trainer has none.
    """

    def __init__(self) -> None:
        self._last_batch_end: float | None = None
        self._batch_start = 0.0
        self._frames_before = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_batch_end = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: TensorDictBase, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()
        self._frames_before = int(pl_module.frames)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: TensorDictBase, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        metrics = {"time/update_s": torch.tensor(now - self._batch_start)}
        if self._last_batch_end is not None:
            frames = int(pl_module.frames) - self._frames_before
            metrics["time/collect_s"] = torch.tensor(self._batch_start - self._last_batch_end)
            metrics["time/fps"] = torch.tensor(frames / (now - self._last_batch_end))
            pl_module.log("fps", metrics["time/fps"], prog_bar=True, logger=False, batch_size=1)
        self._last_batch_end = now
        metrics["time/elapsed_min"] = torch.tensor(training_minutes(trainer))
        pl_module.log_dict(metrics, batch_size=1)
