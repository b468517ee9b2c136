"""t-SNE of the task contexts ``z`` the encoder infers, and how well they separate tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE
from sklearn.neighbors import KNeighborsClassifier
from tensordict import TensorDict, TensorDictBase

from lightning_htrmrl.envs.base import SPLITS, Split
from lightning_htrmrl.runs import run_directory
from lightning_htrmrl.validation import ConfigError, require_non_negative

_KEY = "trainer.callbacks: TaskEmbeddingTSNE init_args"  # where its options live (error messages)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
FIGURE_TAG = "meta_test/task_embeddings"
MAX_LEGEND_TASKS = 12


def split_prefix(split: str) -> str:
    """Metric prefix of a split, as in :class:`~lightning_htrmrl.callbacks.MetaTestEvaluation`."""
    return "meta_test" if split == "test" else "meta_train_eval"


@torch.no_grad()
def episode_contexts(pl_module: LightningModule, trials: TensorDictBase) -> TensorDict:
    """Task context ``z`` at the last step of every episode, recomputed from a rollout.

    Rebuilds exactly the inputs the policy saw at step ``L - 1`` of each episode (the past windows
    sampled at collection and the current episode's last ``T`` tokens), so ``z`` equals the first
    ``context_dim`` entries of the collected ``features`` at that step. For encoders without a
    memory (``MLPEncoder``) ``z`` is whatever their ``context`` returns (the current state).

    Args:
        pl_module: a :class:`~lightning_htrmrl.module.MetaPPO` (``encoder``, ``episode_records``).
        trials: ``[B, K*L]`` whole trials (one trial per row, as ``env.rollout`` returns them).

    Returns:
        TensorDict ``[B*K]`` on the CPU: ``z [B*K, context_dim]`` (float32), ``task_id [B*K]``,
        ``episode [B*K]`` (index within the trial, 0-based) and ``trial [B*K]`` (row of ``trials``).
    """
    records = pl_module.episode_records(trials)
    steps = records["steps"]
    episodes, length = steps.shape
    last = torch.full((episodes,), length - 1, dtype=torch.long, device=steps.device)
    z = pl_module.encoder.context_at(steps["token"], records["past_windows"], records["past_valid"], last)
    per_row = trials.shape[1] // length
    trial = torch.arange(trials.shape[0]).repeat_interleave(per_row)
    return TensorDict(
        {
            "z": z.detach().float().cpu(),
            "task_id": steps["task_id"][:, 0].cpu(),
            "episode": steps["episode_idx"][:, 0].cpu(),
            "trial": trial,
        },
        batch_size=[episodes],
    )


def knn_separability(z: np.ndarray, labels: np.ndarray, fit: np.ndarray, n_neighbors: int = 3) -> float:
    """Accuracy of a distance-weighted k-NN task classifier fit on ``fit`` rows, scored on the others.

    Args:
        z: ``[S, C]`` contexts (the original space, not a projection).
        labels: ``[S]`` task ids.
        fit: ``[S]`` bool, True for the rows the classifier is fit on (the rest are scored).
        n_neighbors: ``k``, capped at the number of fitted rows.

    Distance weighting makes the result well defined for tiny samples: with one fitted sample per
    task (the usual case here) 3-NN reduces to 1-NN instead of breaking ties by label order.
    """
    if fit.all() or not fit.any():
        raise ValueError("knn_separability needs rows to fit on and rows to score")
    classifier = KNeighborsClassifier(n_neighbors=min(n_neighbors, int(fit.sum())), weights="distance")
    classifier.fit(z[fit], labels[fit])
    return float(classifier.score(z[~fit], labels[~fit]))


class TaskEmbeddingTSNE(Callback):
    """Every ``every_n_epochs`` epochs, plot a t-SNE of the task contexts ``z`` and score how well they separate tasks.

    It runs no trials of its own: the ``test`` split's trials are those of the epoch's held-out
    evaluation (:class:`~lightning_htrmrl.callbacks.MetaTestEvaluation` hands them over when it
    has run them; memory kept across the episodes of a trial, cleared between trials), the
    ``train`` split's those of the epoch's last training batch (whole trials on training tasks,
    collected with the weights of that batch's update). At most ``num_trials`` trials of each split
    are used. The context ``z`` (``[context_dim]``, for HTrMRL the masked mean of the
    inter-episode transformer) at the last step of every episode is recomputed offline from the
    trials with the current weights (see :func:`episode_contexts`). It runs in epochs that have a
    held-out evaluation (every epoch by default: ``meta_test.every_n_epochs``).

    **Plot** (``{run_dir}/tsne/epoch_{epoch:04d}.png``, also ``meta_test/task_embeddings`` in
    TensorBoard at ``global_step = frames``): one point per episode, all splits embedded together
    by :class:`sklearn.manifold.TSNE` (2-D, ``perplexity = min(perplexity, n_points - 1)``, PCA
    init, seeded). Colour = task (for multi-class Meta-World benchmarks such as ML10/ML45: the env
    class, e.g. ``reach-v3``; otherwise the task of that split), marker = episode index within the
    trial, filled = train task, hollow = held-out test task. Well-adapted memory shows same-colour
    clusters that tighten with the episode index. ``run_dir`` is the first logger's ``log_dir``
    (TensorBoard/CSV) or ``save_dir``, else ``trainer.default_root_dir``; an existing file is never
    overwritten (``_1``, ``_2``, ... suffix).

    **Number** ``meta_test/embedding_separability`` (``meta_train_eval/embedding_separability`` for
    the train split): task-classification accuracy in ``[0, 1]`` of a k-NN classifier (k = 3,
    distance-weighted, Euclidean, in the ORIGINAL ``z`` space, not the t-SNE plane) fit on the
    contexts of every trial's second-to-last episode and scored on those of its last episode (the
    most adapted context): whether the context the memory settles on names the task. Chance level
    is about one over the number of distinct tasks (``nan`` for trials of one episode).

    Runs on global rank 0 only (no collective is called; under DDP on rank 0's share of the
    held-out trials); values are logged with ``rank_zero_only=True``, so they cannot be monitored by
    other callbacks under DDP.

    Args:
        every_n_epochs: period in training epochs.
        num_trials: trials per split at most (the first of the evaluation's, of the batch's).
        splits: splits to plot, from ``train`` and ``test``.
        perplexity: t-SNE perplexity (capped at ``n_points - 1``).
        seed: seeds t-SNE.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_trials: int = 16,
        splits: list[str] = ["train", "test"],  # noqa: B006 (read-only; jsonargparse needs a literal)
        perplexity: float = 10.0,
        seed: int = 54321,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"{_KEY}.every_n_epochs must be >= 1, got {every_n_epochs!r}")
        if not isinstance(num_trials, int) or num_trials < 2:
            raise ConfigError(f"{_KEY}.num_trials must be >= 2, got {num_trials!r}")
        splits = [splits] if isinstance(splits, str) else list(splits)
        if not splits or any(split not in SPLITS for split in splits) or len(set(splits)) != len(splits):
            raise ConfigError(
                f"{_KEY}.splits must be a non-empty list of distinct values from {list(SPLITS)}, got {splits!r}"
            )
        if not perplexity > 0:
            raise ConfigError(f"{_KEY}.perplexity must be > 0, got {perplexity!r}")
        require_non_negative(f"{_KEY}.seed", seed)
        self.every_n_epochs = every_n_epochs
        self.num_trials = num_trials
        self.splits: list[Split] = splits  # type: ignore[assignment]
        self.perplexity = float(perplexity)
        self.seed = seed
        self._train_trials: TensorDictBase | None = None
        self.last_results: dict[str, float] = {}
        self.last_image: Path | None = None

    # ------------------------------------------------------------------ trials
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._train_trials = batch  # [B, K*L] whole trials (one per row); only the latest is kept

    @torch.no_grad()
    def contexts(self, pl_module: LightningModule, trials: dict[str, TensorDictBase]) -> dict[str, TensorDict]:
        """Split -> last-step contexts of every episode (:func:`episode_contexts`) of its first
        ``num_trials`` trials."""
        return {split: episode_contexts(pl_module, rows[: self.num_trials]) for split, rows in trials.items()}

    # ------------------------------------------------------------------ hook
    def on_evaluation(self, trainer: Trainer, pl_module: LightningModule, split: str, trials: TensorDictBase) -> None:
        """Called by :class:`~lightning_htrmrl.callbacks.MetaTestEvaluation` with its trials ``[n, K*L]``."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or (trainer.current_epoch + 1) % self.every_n_epochs or not trainer.is_global_zero:
            return
        available = {split: trials, "train": self._train_trials} if split == "test" else {"train": self._train_trials}
        chosen = {s: available[s] for s in self.splits if available.get(s) is not None}
        if not chosen:
            return
        contexts = self.contexts(pl_module, chosen)
        results = {_metric(split): self.separability(ctx) for split, ctx in contexts.items()}
        self.last_results = results
        for key, value in results.items():
            pl_module.log(key, value, rank_zero_only=True, batch_size=1)
        fig = self.figure(trainer, pl_module, contexts)
        self.last_image = self._save(fig, trainer, trainer.current_epoch)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(FIGURE_TAG, fig, global_step=int(pl_module.frames), close=False)

    # ------------------------------------------------------------------ analysis
    def separability(self, contexts: TensorDictBase) -> float:
        """k-NN task accuracy of the last-episode contexts, fit on the second-to-last episode's."""
        last = int(contexts["episode"].max())
        if last == 0:
            return float("nan")
        rows = contexts["episode"] >= last - 1
        fit = contexts["episode"][rows] == last - 1
        return knn_separability(contexts["z"][rows].numpy(), contexts["task_id"][rows].numpy(), fit.numpy())

    def embed(self, z: np.ndarray) -> np.ndarray:
        """t-SNE of ``z [S, C]`` -> ``[S, 2]``."""
        samples = len(z)
        init = "pca" if min(samples, z.shape[1]) >= 2 else "random"
        tsne = TSNE(
            n_components=2,
            perplexity=min(self.perplexity, samples - 1),
            init=init,
            learning_rate="auto",
            random_state=self.seed,
        )
        return tsne.fit_transform(z)

    @staticmethod
    def _colour_keys(trainer: Trainer, split: Split, task_ids: np.ndarray) -> list[str]:
        """Legend label per point: the env class on multi-class benchmarks, otherwise the task."""
        benchmark = trainer.datamodule.benchmark
        if hasattr(benchmark, "task_classes"):
            classes = {name for s in SPLITS for name in benchmark.task_classes(s)}
            if len(classes) > 1:
                names = benchmark.task_classes(split)
                return [names[i] for i in task_ids]
        names = benchmark.task_names(split)
        return [f"{split}: {names[i]}" for i in task_ids]

    def figure(self, trainer: Trainer, pl_module: LightningModule, contexts: dict[str, TensorDictBase]) -> Figure:
        """The t-SNE scatter of every split's contexts (see the class docstring)."""
        splits = list(contexts)
        z = np.concatenate([contexts[s]["z"].numpy() for s in splits])
        xy = self.embed(z)
        episode = np.concatenate([contexts[s]["episode"].numpy() for s in splits])
        split_of = np.concatenate([np.full(len(contexts[s]), s) for s in splits])
        keys = [k for s in splits for k in self._colour_keys(trainer, s, contexts[s]["task_id"].numpy())]
        groups = list(dict.fromkeys(keys))
        cmap = _colormap(len(groups))
        colour_of = {group: cmap(i) for i, group in enumerate(groups)}
        colours = np.array([colour_of[k] for k in keys])

        fig = Figure(figsize=(8.0, 6.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for split in splits:
            for ep in np.unique(episode):
                rows = (split_of == split) & (episode == ep)
                if not rows.any():
                    continue
                marker = MARKERS[int(ep) % len(MARKERS)]
                if split == "train":
                    ax.scatter(xy[rows, 0], xy[rows, 1], c=colours[rows], marker=marker, s=40, linewidths=0.5,
                               edgecolors="black")  # fmt: skip
                else:
                    ax.scatter(xy[rows, 0], xy[rows, 1], facecolors="none", edgecolors=colours[rows], marker=marker,
                               s=40, linewidths=1.3)  # fmt: skip
        handles = [
            Line2D(
                [],
                [],
                linestyle="none",
                marker=MARKERS[int(ep) % len(MARKERS)],
                color="gray",
                label=f"episode {int(ep) + 1}",
            )
            for ep in np.unique(episode)
        ]
        handles += [
            Line2D([], [], linestyle="none", marker="o", markerfacecolor="gray" if s == "train" else "none",
                   markeredgecolor="gray", label=f"{s} tasks ({'filled' if s == 'train' else 'hollow'})")
            for s in splits
        ]  # fmt: skip
        if len(groups) <= MAX_LEGEND_TASKS:
            handles += [Line2D([], [], linestyle="none", marker="o", color=colour_of[g], label=g) for g in groups]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
        scores = ", ".join(f"{s}: {self.last_results.get(_metric(s), float('nan')):.2f}" for s in splits)
        ax.set_title(
            f"Task contexts z (t-SNE), epoch {trainer.current_epoch}, {int(pl_module.frames):,} frames\n"
            f"colour = task, marker = episode, last-episode k-NN accuracy {scores}",
            fontsize="medium",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return fig

    def _save(self, fig: Figure, trainer: Trainer, epoch: int) -> Path:
        """Write ``fig`` to ``{run_dir}/tsne/epoch_{epoch:04d}.png`` (or ``..._{n}.png`` if that exists)."""
        folder = run_directory(trainer) / "tsne"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"epoch_{epoch:04d}"
        path = folder / f"{stem}.png"
        suffix = 0
        while path.exists():
            suffix += 1
            path = folder / f"{stem}_{suffix}.png"
        fig.savefig(path, dpi=100)
        return path


def _metric(split: str) -> str:
    return f"{split_prefix(split)}/embedding_separability"


def _colormap(groups: int) -> Callable[[int], tuple[float, float, float, float]]:
    """Colour ``i`` of ``groups`` categorical colours (tab10/tab20, else evenly spaced turbo)."""
    if groups <= 10:
        return colormaps["tab10"]
    if groups <= 20:
        return colormaps["tab20"]
    turbo = colormaps["turbo"]
    return lambda i: turbo(i / max(groups - 1, 1))
