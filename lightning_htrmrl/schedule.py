"""A learning-rate schedule that follows the run's budget, whatever sets it.

``LinearToBudget`` anneals linearly from ``start_factor`` to ``end_factor`` x the base rate over the
fit's budget: the PPO updates that ``trainer.max_epochs`` allows (the first collected batch only
initialises the input statistics and is not an update), or the wall-clock time of
``trainer.max_time`` (Lightning's ``Timer``, whose elapsed time is saved in checkpoints), whichever
ends the run first. ``MetaPPO`` sets the progress before every update, so the first update runs at
``start_factor``, the last one a ``max_epochs`` budget allows at ``end_factor``, and a resumed run
continues where it stopped (both clocks are restored from the checkpoint). Nothing is copied into
the YAML: changing ``max_epochs``, ``data.iterations_per_epoch`` or ``max_time`` moves the schedule.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_htrmrl.validation import ConfigError


class LinearToBudget(LRScheduler):
    """Linear from ``start_factor`` to ``end_factor`` over the fit's budget (see the module docstring).

    Args:
        optimizer: the optimizer whose rates it sets.
        start_factor: factor of the base rate at the first update.
        end_factor: factor at the end of the budget (0: CleanRL-style annealing to zero).
    """

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0, end_factor: float = 0.0) -> None:
        if not 0.0 < start_factor <= 1.0:
            raise ConfigError(f"model.lr_scheduler.init_args.start_factor must lie in (0, 1], got {start_factor}")
        if not 0.0 <= end_factor <= 1.0:
            raise ConfigError(f"model.lr_scheduler.init_args.end_factor must lie in [0, 1], got {end_factor}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.progress = 0.0
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = self.start_factor + (self.end_factor - self.start_factor) * min(max(self.progress, 0.0), 1.0)
        return [base * factor for base in self.base_lrs]

    def set_progress(self, progress: float) -> None:
        """Set the fraction of the budget spent before the coming update and apply its rate.

        The rate depends on the progress alone, not on a count of ``step()`` calls, so it is
        written into the optimizer directly.
        """
        self.progress = progress
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def budget_progress(trainer: Trainer, updates_done: int, first_batch_trains: bool) -> float:
    """Fraction of ``trainer``'s budget spent before the coming update.

    ``updates_done``: PPO updates made so far in the whole fit (resumes included);
    ``first_batch_trains``: False when the first batch only initialises statistics.
    """
    fractions = []
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        batches = trainer.max_epochs * trainer.num_training_batches
        updates = batches - (0 if first_batch_trains else 1)
        fractions.append(updates_done / max(updates - 1, 1))
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and timer._duration:
        fractions.append(timer.time_elapsed("train") / timer._duration)
    if not fractions:
        raise ConfigError(
            "model.lr_scheduler LinearToBudget needs a budget: set trainer.max_epochs (> 0) or trainer.max_time"
        )
    return max(fractions)
