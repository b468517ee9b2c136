"""Shared tiny fixtures: a small point-robot task distribution, tiny encoder factories, a collector helper.

Sizes are deliberately tiny (L=8, K=3, M=4, d_model=16, 2 heads): the suite runs on a shared 2-core CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDictBase

from lightning_htrmrl.envs import PointRobot
from lightning_htrmrl.models import FlatTransformerEncoder, HierarchicalEncoder, MLPEncoder
from lightning_htrmrl.module import MetaPPO

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Trial structure shared by most tests: K episodes of L steps, M env slots, windows of T tokens.
L, K, M = 8, 3, 4
T = 4
NUM_GOALS = 8  # 4 train + 4 test goals

torch.set_num_threads(1)  # the machine's 2 cores are shared; tiny tensors gain nothing from threads


def tiny_hierarchical(num_episodes: int = 2, window: int = T, **overrides) -> functools.partial:
    kwargs = dict(
        num_episodes=num_episodes,
        window=window,
        d_model=16,
        num_heads=2,
        intra_layers=1,
        inter_layers=1,
        ff_dim=32,
        state_embedding_dim=8,
        inter_positional=False,
    )
    kwargs.update(overrides)
    return functools.partial(HierarchicalEncoder, **kwargs)


def tiny_flat(num_episodes: int = 2, window: int = T, **overrides) -> functools.partial:
    kwargs = dict(
        num_episodes=num_episodes,
        window=window,
        d_model=16,
        num_heads=2,
        num_layers=1,
        ff_dim=32,
        state_embedding_dim=8,
        causal=True,
    )
    kwargs.update(overrides)
    return functools.partial(FlatTransformerEncoder, **kwargs)


ENCODER_FACTORIES: dict[str, Callable] = {
    "hierarchical": tiny_hierarchical(),
    "hierarchical_n3": tiny_hierarchical(num_episodes=3),  # N = K: no ring-buffer reuse
    "flat": tiny_flat(),
    "mlp": MLPEncoder,
}


def make_point_robot(**overrides) -> PointRobot:
    """The tiny point robot (K=3 episodes of L=8 steps, 4 train / 4 test goals), options overridable."""
    kwargs = dict(episode_length=L, episodes_per_trial=K, num_goals=NUM_GOALS)
    kwargs.update(overrides)
    return PointRobot(**kwargs)


@pytest.fixture
def point_robot() -> PointRobot:
    """Tiny point robot: K=3 episodes of L=8 steps, 4 train / 4 test goals."""
    return make_point_robot()


def make_module(encoder_factory: Callable, seed: int = 0, **kwargs) -> MetaPPO:
    """A tiny MetaPPO on the tiny point robot (seeded weights)."""
    torch.manual_seed(seed)
    defaults = dict(
        obs_dim=PointRobot.obs_dim,
        action_dim=PointRobot.action_dim,
        episode_length=L,
        episodes_per_trial=K,
        encoder=encoder_factory,
        actor_hidden=[16],
        critic_hidden=[16],
        ppo_epochs=1,
        episodes_per_minibatch=6,
    )
    defaults.update(kwargs)
    return MetaPPO(**defaults)


def collect_batch(env, policy, trials_per_env: int = 1) -> TensorDictBase:
    """Collect one batch ``[M, trials_per_env * K * L]`` with a real TorchRL Collector, then shut it down."""
    from torchrl.collectors import Collector

    frames = env.batch_size.numel() * trials_per_env * env.episodes_per_trial * env.episode_length
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames,
        total_frames=-1,
        auto_register_policy_transforms=False,
    )
    try:
        batch = next(iter(collector))
    finally:
        collector.shutdown()
    return batch.clone()


@pytest.fixture
def collect() -> Callable[..., TensorDictBase]:
    return collect_batch


@pytest.fixture
def tiny() -> SimpleNamespace:
    """Everything the tests share, in one place: sizes and factories."""
    return SimpleNamespace(
        L=L,
        K=K,
        M=M,
        T=T,
        num_goals=NUM_GOALS,
        repo=REPO,
        conf=CONF,
        point_robot=make_point_robot,
        hierarchical=tiny_hierarchical,
        flat=tiny_flat,
        mlp=MLPEncoder,
        encoders=ENCODER_FACTORIES,
        make_module=make_module,
        collect=collect_batch,
    )


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty folder, so files a run writes (run folders, meta_test.json,
    lightning_logs) never land in the checkout."""
    monkeypatch.chdir(tmp_path)
