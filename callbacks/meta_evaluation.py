"""Meta-test evaluation: trials on held-out tasks, logged as the adaptation curve."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from tensordict import TensorDictBase
from torchmetrics.aggregation import MeanMetric
from torchrl.envs.utils import ExplorationType

from lightning_htrmrl.callbacks.clock import training_minutes  # noqa: E402
from lightning_htrmrl.envs.base import Split, check_split  # noqa: E402
from lightning_htrmrl.envs.evaluation import EvaluationTrials  # noqa: E402
from lightning_htrmrl.metaworld_protocol import MetaWorldProtocol, check_metaworld_benchmark  # noqa: E402
from lightning_htrmrl.metaworld_protocol import evaluate as metaworld_evaluate  # noqa: E402
from lightning_htrmrl.runs import run_directory  # noqa: E402
from lightning_htrmrl.statistics import confidence_half_width  # noqa: E402
from lightning_htrmrl.trials import episode_outcomes  # noqa: E402
from lightning_htrmrl.validation import ConfigError, require_non_negative  # noqa: E402

Protocol = Literal["trials", "metaworld"]


def fit_ends_this_epoch(trainer: Trainer) -> bool:
    """Whether the epoch now ending is the fit's last: ``max_epochs`` reached, or a stop signalled
    during it (``max_time`` is checked after every batch; early stopping). Both are the same on
    every DDP process, so all of them evaluate or none does."""
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 == trainer.max_epochs
    return bool(trainer.should_stop or last_epoch)


class MetaTestEvaluation(Callback):
    """Every ``every_n_epochs`` epochs and after the fit's last epoch, run ``num_trials`` trials of
    ``K`` episodes on ``split`` tasks.

    Memory is kept across the episodes of a trial and cleared between trials, exactly as in
    training. It also runs on ``htrmrl validate`` / ``htrmrl test`` (no training). After every
    evaluation, rank 0 writes ``meta_test.json`` (overall, per-episode-index and per-task results
    with the trials each task got, the frame count and the checkpoint evaluated) and
    ``adaptation_curve.png`` (success and return per episode index, held-out tasks vs the latest
    training batch) into the run directory.

    Logs ``{prefix}/success``, ``{prefix}/return`` and, for ``k = 1..K``,
    ``{prefix}/success_ep{k}`` and ``{prefix}/return_ep{k}`` (an episode is a success if the task is
    solved at any of its steps); ``{prefix}/success_ci95``, the half-width of the Student-t
    95 % confidence interval of ``{prefix}/success`` over trials (trials are the independent units:
    the episodes of a trial share a task; 0 for one trial); ``time/eval_s``, the evaluation's wall time, and
    ``time/elapsed_min``, the training wall time when it ended. Under DDP each process runs its
    parts of the trials and the means are reduced with torchmetrics; the trials and their results
    do not depend on the number of processes.

    Args:
        every_n_epochs: evaluation period in training epochs; the last epoch (``max_epochs`` or a
            stop such as ``max_time``) is always evaluated, so the final weights have a result.
        num_trials: trials per evaluation; ``None``: one per task of ``split``. Tasks are assigned
            in a fixed order, so the same tasks are evaluated every time and ``num_trials`` equal to
            the number of tasks covers each exactly once.
        num_envs: slots of one part of the evaluation; ``None``: ``data.num_envs``. The trials are
            cut into ``ceil(num_trials / num_envs)`` parts with their own seeds, which the DDP
            processes and their workers share out, so every trial's result is the same at any
            number of processes (see :mod:`lightning_htrmrl.envs.evaluation`); fewer slots, more
            parts to spread.
        num_workers: worker processes that run the trials (started at the first evaluation and
            kept), each with its own envs and a CPU copy of the policy, as training's collector
            processes: evaluation uses every core. 1: the trials run in the trainer process.
        split: ``test`` (held-out tasks) or ``train``.
        deterministic: act with the distribution's mean instead of sampling (default: sample, as
            exploration in early episodes is part of in-context adaptation).
        seed: seeds the evaluation envs and memory; the same tasks are used at every evaluation.
        protocol: ``trials`` (ours: the trials above, success per episode index of the trial) or
            ``metaworld`` (Meta-World's own ``metalearning_evaluation`` on its official test envs,
            settings in ``metaworld``; see :mod:`lightning_htrmrl.metaworld_protocol`): the
            number to put next to published Meta-World results. Logs ``success``, ``return`` and
            ``success_ci95`` (over rounds) under the same prefix; ``split`` must be ``test``.
        metaworld: settings of the ``metaworld`` protocol (default: Meta-World's own, 50 sub-envs).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_trials: int | None = None,
        num_envs: int | None = None,
        num_workers: int = 1,
        split: Split = "test",
        deterministic: bool = False,
        seed: int = 12345,
        protocol: Protocol = "trials",
        metaworld: MetaWorldProtocol | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ConfigError(f"meta_test.every_n_epochs must be >= 1, got {every_n_epochs}")
        for key, value in (("num_trials", num_trials), ("num_envs", num_envs)):
            if value is not None and value < 1:
                raise ConfigError(f"meta_test.{key} must be >= 1 or null, got {value}")
        if num_workers < 1:
            raise ConfigError(f"meta_test.num_workers must be >= 1, got {num_workers}")
        require_non_negative("meta_test.seed", seed)
        check_split(split, "meta_test.split")
        if protocol not in ("trials", "metaworld"):
            raise ConfigError(f"meta_test.protocol must be 'trials' or 'metaworld', got {protocol!r}")
        if protocol == "metaworld" and split != "test":
            raise ConfigError(f"meta_test.protocol metaworld needs meta_test.split test, got {split!r}")
        self.protocol = protocol
        self.metaworld = metaworld or MetaWorldProtocol()
        self.every_n_epochs = every_n_epochs
        self.num_trials = num_trials
        self.num_envs = num_envs
        self.num_workers = num_workers
        self.split = split
        self.deterministic = deterministic
        self.seed = seed
        self.prefix = "meta_test" if split == "test" else "meta_train_eval"
        self._trials: EvaluationTrials | None = None
        self._means: dict[str, MeanMetric] | None = None  # one torchmetrics mean per logged value
        self.latest_rollout: TensorDictBase | None = None  # this process's trials of the latest evaluation
        self.last_results: dict[str, float] = {}
        self._per_task: dict[str, dict] = {}
        self._official: dict = {}  # the latest Meta-World protocol results

    def _num_trials(self, trainer: Trainer) -> int:
        return self.num_trials or len(trainer.datamodule.benchmark.task_names(self.split))

    def _get_trials(self, trainer: Trainer, pl_module: LightningModule) -> EvaluationTrials:
        if self._trials is None:
            datamodule = trainer.datamodule
            self._trials = EvaluationTrials(
                datamodule.benchmark,
                self.split,
                self._num_trials(trainer),
                self.num_envs or datamodule.num_envs,
                self.seed,
                trainer.global_rank,
                trainer.world_size,
                self.num_workers,
                pl_module.device,
            )
        return self._trials

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Run the trials and return the synced metrics."""
        trials = self._get_trials(trainer, pl_module)
        exploration = ExplorationType.DETERMINISTIC if self.deterministic else ExplorationType.RANDOM
        k, length = trainer.datamodule.episodes_per_trial, trainer.datamodule.episode_length
        # Under DDP every process runs its parts of the trials; the means are synced below.
        rollout, _ = trials.run(pl_module, exploration)
        self.latest_rollout = rollout
        if rollout is None:  # more processes than parts: this one has no trial
            success = returns = torch.zeros(0, k, device=pl_module.device)
            task_ids = torch.zeros(0, dtype=torch.long, device=pl_module.device)
        else:
            success, returns = episode_outcomes(rollout, k, length)
            task_ids = rollout["task_id"][:, 0].to(pl_module.device)
        metrics = self._episode_means({"success": success, "return": returns}, pl_module.device)
        # Per-task results need every process's trials: gather (a collective, on all ranks). Shares
        # differ by up to a part: pad to the largest (task -1) and drop the padding.
        trial_success = success.mean(-1).to(pl_module.device)
        if trainer.world_size > 1:
            pad = trials.largest_share - len(task_ids)
            task_ids = pl_module.all_gather(F.pad(task_ids, (0, pad), value=-1)).flatten()
            trial_success = pl_module.all_gather(F.pad(trial_success, (0, pad))).flatten()
            trial_success, task_ids = trial_success[task_ids >= 0], task_ids[task_ids >= 0]
        self._per_task = self._task_table(trainer, task_ids.cpu(), trial_success.cpu())
        if len(self._per_task["per_class"]) > 1:  # ML10 / ML45: held-out success of each class
            for name, value in self._per_task["per_class"].items():
                metrics[f"{self.prefix}/success_class/{name}"] = torch.tensor(value)
        half_width = confidence_half_width(trial_success.tolist())
        metrics[f"{self.prefix}/success_ci95"] = torch.tensor(half_width or 0.0)
        return metrics

    def evaluate_metaworld(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """Meta-World's ``metalearning_evaluation`` (every process runs all of it: it is not split)."""
        benchmark = trainer.datamodule.benchmark
        check_metaworld_benchmark(type(benchmark).__name__)
        self._official = metaworld_evaluate(pl_module, benchmark, self.metaworld, self.deterministic, self.seed)
        return {
            f"{self.prefix}/{key}": torch.tensor(self._official[key]) for key in ("success", "success_ci95", "return")
        }

    def _task_table(self, trainer: Trainer, task_ids: torch.Tensor, success: torch.Tensor) -> dict[str, dict]:
        """Mean success over the episodes of each task's trials, by task and (Meta-World) by class,
        and how many trials each task and class got."""
        benchmark = trainer.datamodule.benchmark
        names = benchmark.task_names(self.split)
        classes = benchmark.task_classes(self.split) if hasattr(benchmark, "task_classes") else None
        table: dict[str, dict] = {"per_task": {}, "per_class": {}, "trials_per_task": {}, "trials_per_class": {}}
        for key, labels in (("task", names), ("class", classes)):
            if labels is None:
                continue
            groups: dict[str, list[float]] = {}
            for task, value in zip(task_ids.tolist(), success.tolist()):
                groups.setdefault(labels[task], []).append(value)
            table[f"per_{key}"] = {label: sum(v) / len(v) for label, v in sorted(groups.items())}
            table[f"trials_per_{key}"] = {label: len(v) for label, v in sorted(groups.items())}
        return table

    def _episode_means(self, per_episode: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """``{prefix}/{name}`` and ``{prefix}/{name}_ep{k}``: means over every process's trials of
        each ``values [trials, K]`` (torchmetrics, built once and reset after every evaluation)."""
        columns = {}
        for name, values in per_episode.items():
            columns[f"{self.prefix}/{name}"] = values
            columns.update({f"{self.prefix}/{name}_ep{k + 1}": values[:, k] for k in range(values.shape[1])})
        if self._means is None or set(self._means) != set(columns):
            self._means = {key: MeanMetric() for key in columns}
        metrics = {}
        for key, values in columns.items():
            mean = self._means[key].to(device)
            mean.update(values.to(device))
            metrics[key] = mean.compute()
            mean.reset()
        return metrics

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._trials is not None:  # stops the worker processes
            self._trials.close()
            self._trials = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs and not fit_ends_this_epoch(trainer):
            return
        self._run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._run(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module)

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        evaluate = self.evaluate_metaworld if self.protocol == "metaworld" else self.evaluate
        metrics = evaluate(trainer, pl_module)
        metrics["time/eval_s"] = torch.tensor(time.perf_counter() - start)
        metrics["time/elapsed_min"] = torch.tensor(training_minutes(trainer))
        self.last_results = {key: float(value) for key, value in metrics.items()}
        pl_module.log_dict(metrics, batch_size=1)
        if trainer.state.fn == TrainerFn.FITTING:
            pl_module.log(
                f"{self.prefix}_success", metrics[f"{self.prefix}/success"], prog_bar=True, logger=False, batch_size=1
            )
        if trainer.is_global_zero:
            self._write_outputs(trainer, pl_module)
        if self.latest_rollout is not None:  # analyses of the same trials (TaskEmbeddingTSNE)
            for callback in trainer.callbacks:
                if callback is not self and hasattr(callback, "on_evaluation"):
                    callback.on_evaluation(trainer, pl_module, self.split, self.latest_rollout)

    def results(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """The content of ``meta_test.json`` for the latest evaluation."""
        run = {
            "frames": int(pl_module.frames),
            "elapsed_min": self.last_results["time/elapsed_min"],
            "epoch": trainer.current_epoch,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "benchmark": trainer.datamodule.benchmark.describe(),
        }
        if self.protocol == "metaworld":
            return {"split": self.split, **self._official, **run}
        k = trainer.datamodule.episodes_per_trial
        prefix = self.prefix
        return {
            "protocol": "trials",
            "split": self.split,
            "success": self.last_results[f"{prefix}/success"],
            "return": self.last_results[f"{prefix}/return"],
            "success_ci95": self.last_results[f"{prefix}/success_ci95"],
            "success_per_episode": [self.last_results[f"{prefix}/success_ep{e + 1}"] for e in range(k)],
            "return_per_episode": [self.last_results[f"{prefix}/return_ep{e + 1}"] for e in range(k)],
            **self._per_task,
            "num_trials": self._num_trials(trainer),
            "deterministic": self.deterministic,
            **run,
        }

    def _write_outputs(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = run_directory(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        results = self.results(trainer, pl_module)
        (directory / f"{self.prefix}.json").write_text(json.dumps(results, indent=2))
        if self.protocol == "metaworld":
            return  # no per-episode curve: Meta-World's evaluator reports success over its evaluation episodes
        episodes = range(1, len(results["success_per_episode"]) + 1)
        train_curves = {
            metric: [trainer.callback_metrics.get(f"meta_train/{metric}_ep{e}") for e in episodes]
            for metric in ("success", "return")
        }
        self._plot(directory / "adaptation_curve.png", results, train_curves)

    def _plot(self, path: Path, results: dict, train_curves: dict[str, list]) -> None:
        """Success and return per episode index: held-out evaluation vs the latest training batch."""
        episodes = range(1, len(results["success_per_episode"]) + 1)
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for axis, metric in zip(axes, ("success", "return"), strict=True):
            axis.plot(episodes, results[f"{metric}_per_episode"], "o-", label=f"{self.split} tasks (evaluation)")
            train_curve = train_curves[metric]
            if all(value is not None for value in train_curve):
                axis.plot(episodes, [float(v) for v in train_curve], "s--", label="train tasks (latest batch)")
            axis.set_xlabel("episode within the trial")
            axis.set_xticks(list(episodes))
        axes[0].set_ylabel("success rate")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].legend(loc="lower right")
        axes[1].set_ylabel("return per episode")
        figure.suptitle(f"adaptation after {results['frames']:,} frames")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
