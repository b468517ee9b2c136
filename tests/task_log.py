"""A callback for DDP tests: every process appends the task of each trial slot of every batch to
``tasks_rank<R>.jsonl`` in the working directory (given to ``htrmrl fit`` with ``--trainer.callbacks+=``)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class TaskLog(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        line = {"frames": int(pl_module.frames), "tasks": batch["task_id"][:, 0].tolist()}
        with Path(f"tasks_rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps(line) + "\n")
