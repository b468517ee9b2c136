"""TaskEmbeddingTSNE: a real (tiny) fit writes the t-SNE PNG, logs the separability and a TensorBoard image."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib.image
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_htrmrl.callbacks import MetaTestEvaluation, TaskEmbeddingTSNE
from lightning_htrmrl.callbacks.tsne import FIGURE_TAG, episode_contexts
from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.envs import PointRobot
from lightning_htrmrl.models import HierarchicalEncoder, MLPEncoder
from lightning_htrmrl.module import MetaPPO
from lightning_htrmrl.validation import ConfigError

L, K, NUM_TRIALS = 10, 2, 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC = "meta_test/embedding_separability"


def fit(tmp_path: Path, encoder) -> tuple[Trainer, MetaPPO, TaskEmbeddingTSNE]:
    torch.manual_seed(0)
    module = MetaPPO(2, 2, episode_length=L, episodes_per_trial=K, encoder=encoder)
    benchmark = PointRobot(episode_length=L, episodes_per_trial=K)
    datamodule = MetaRLDataModule(benchmark=benchmark, num_envs=4, iterations_per_epoch=1)
    callback = TaskEmbeddingTSNE(every_n_epochs=1, num_trials=NUM_TRIALS, perplexity=3)
    # the held-out trials the plot uses are the evaluation's (every test task once)
    evaluation = MetaTestEvaluation(num_trials=NUM_TRIALS, num_envs=3, seed=1)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, evaluation],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, callback


def check_outputs(trainer: Trainer, callback: TaskEmbeddingTSNE) -> Path:
    run_dir = Path(trainer.logger.log_dir)
    png = run_dir / "tsne" / "epoch_0000.png"
    assert callback.last_image == png and png.is_file()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    for key in (METRIC, "meta_train_eval/embedding_separability"):
        assert key in trainer.callback_metrics, sorted(trainer.callback_metrics)
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0
        assert float(trainer.callback_metrics[key]) == pytest.approx(callback.last_results[key])
    trainer.logger.experiment.flush()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert FIGURE_TAG in events.Tags()["images"], events.Tags()
    assert events.Images(FIGURE_TAG)[-1].step == int(trainer.lightning_module.frames) > 0
    return png


def test_tsne_hierarchical_plots_logs_and_recomputes_the_collected_context(tmp_path: Path) -> None:
    encoder = functools.partial(HierarchicalEncoder, num_episodes=2, window=4, d_model=16, num_heads=2)
    trainer, module, callback = fit(tmp_path, encoder)
    png = check_outputs(trainer, callback)

    # an existing image is never overwritten
    assert callback._save(Figure(), trainer, epoch=0) == png.with_name("epoch_0000_1.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    # it runs no trials: the held-out ones are the evaluation's, the training ones the last batch's;
    # z is the context the policy saw at the last step of every episode
    evaluation = next(c for c in trainer.callbacks if isinstance(c, MetaTestEvaluation))
    rollout = evaluation.latest_rollout
    assert rollout.shape == (NUM_TRIALS, K * L)
    assert callback._train_trials.shape == (4, K * L)
    contexts = episode_contexts(module, rollout)
    assert contexts.shape == (NUM_TRIALS * K,) and contexts["z"].shape == (NUM_TRIALS * K, 16)
    assert torch.equal(contexts["episode"], torch.arange(K).repeat(NUM_TRIALS))
    collected = rollout["features"].reshape(NUM_TRIALS * K, L, -1)[:, -1, : module.encoder.context_dim]
    torch.testing.assert_close(contexts["z"], collected, atol=1e-5, rtol=0)

    # deterministic, without touching the training RNG stream
    state = torch.get_rng_state()
    trials = {"train": callback._train_trials, "test": rollout}
    first, second = callback.contexts(module, trials), callback.contexts(module, trials)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[s]["z"], second[s]["z"]) for s in ("train", "test"))
    assert callback.separability(first["test"]) == pytest.approx(callback.last_results[METRIC])


def test_tsne_works_with_the_memoryless_mlp_encoder(tmp_path: Path) -> None:
    trainer, module, callback = fit(tmp_path, MLPEncoder)
    check_outputs(trainer, callback)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"every_n_epochs": 0}, "TaskEmbeddingTSNE init_args.every_n_epochs"),
        ({"num_trials": 1}, "TaskEmbeddingTSNE init_args.num_trials"),
        ({"splits": []}, "TaskEmbeddingTSNE init_args.splits"),
        ({"splits": ["val"]}, "TaskEmbeddingTSNE init_args.splits"),
        ({"splits": ["test", "test"]}, "TaskEmbeddingTSNE init_args.splits"),
        ({"perplexity": 0.0}, "TaskEmbeddingTSNE init_args.perplexity"),
    ],
)
def test_bad_arguments_fail_early_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TaskEmbeddingTSNE(**kwargs)
