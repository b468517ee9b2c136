"""Where a run's files go."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_directory(trainer: Trainer) -> Path:
    """The run directory (the first logger's ``version_N`` folder, else ``default_root_dir``).

    Unlike ``trainer.log_dir`` this is not a collective, so rank-0-only code may call it.
    """
    if trainer.loggers:
        first = trainer.loggers[0]
        path = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
        if path:
            return Path(path)
    return Path(trainer.default_root_dir)
