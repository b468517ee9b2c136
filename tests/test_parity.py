"""MetaPPO: log-prob parity between collection and training, a real Lightning update, and GAE horizons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch
from lightning.pytorch import Callback, Trainer

from lightning_htrmrl.callbacks import MetaTestEvaluation
from lightning_htrmrl.data import MetaRLDataModule

# TrialBatches defines __len__ on purpose (it stops Lightning from prefetching a batch collected with stale weights)
pytestmark = pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")


@pytest.mark.parametrize("kind", ["hierarchical", "hierarchical_n3", "flat", "mlp"])
@pytest.mark.parametrize("trials_per_env", [1, 2])
def test_recomputed_log_prob_matches_collection(tiny, kind, trials_per_env) -> None:
    module = tiny.make_module(tiny.encoders[kind])
    env = tiny.point_robot().make_env("train", num_envs=tiny.M, seed=7)
    batch = tiny.collect(env, module.make_policy(seed=7), trials_per_env=trials_per_env)
    assert batch.shape == (tiny.M, trials_per_env * tiny.K * tiny.L)
    recomputed = module.recompute_log_prob(batch)
    assert recomputed.shape == (tiny.M * trials_per_env * tiny.K, tiny.L)
    diff = (recomputed.reshape(batch.shape) - batch["action_log_prob"]).abs().max()
    assert diff < 1e-5, f"log-prob parity broken: max abs diff {diff:.3g}"


def test_log_prob_parity_tanh_normal_saturated(tiny) -> None:
    module = tiny.make_module(tiny.encoders["hierarchical"], distribution="tanh_normal", init_std=3.0)
    env = tiny.point_robot().make_env("train", num_envs=tiny.M, seed=7)
    batch = tiny.collect(env, module.make_policy(seed=7))
    diff = (module.recompute_log_prob(batch).reshape(batch.shape) - batch["action_log_prob"]).abs().max()
    assert diff < 1e-5, f"log-prob parity broken: max abs diff {diff:.3g}"


class _ParityProbe(Callback):
    """Checks parity on every real training batch, right before its updates: each batch is collected
    with the current weights (on-policy), so recomputed log-probs and features equal the collected ones."""

    def __init__(self) -> None:
        self.diffs: list[float] = []
        self.shapes: list[torch.Size] = []
        self.encoder_grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.encoder_grads.append([p.grad.clone() for p in pl_module.encoder.parameters() if p.grad is not None])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(batch.shape)
        recomputed = pl_module.recompute_log_prob(batch).reshape(batch.shape)
        self.diffs.append(float((recomputed - batch["action_log_prob"]).abs().max()))
        records = pl_module.episode_records(batch)
        with torch.no_grad():
            features = pl_module.episode_features(records).reshape(*batch.shape, -1)
        self.diffs.append(float((features - batch["features"]).abs().max()))


@pytest.mark.parametrize("kind", ["hierarchical", "flat"])
def test_one_update_in_a_real_trainer(tiny, kind) -> None:
    module = tiny.make_module(tiny.encoders[kind], ppo_epochs=2, episodes_per_minibatch=6)
    datamodule = MetaRLDataModule(benchmark=tiny.point_robot(), num_envs=tiny.M, iterations_per_epoch=2, seed=0)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    probe = _ParityProbe()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(module, datamodule=datamodule)

    # the training batches are whole trials, each collected with the weights it is trained from
    assert probe.shapes == [torch.Size([tiny.M, tiny.K * tiny.L])] * 2
    assert max(probe.diffs) < 1e-5, f"parity broken on a training batch: {probe.diffs}"
    # weights changed: encoder, actor and critic
    changed = {name for name, p in module.named_parameters() if not torch.equal(p.detach(), before[name])}
    for prefix in ("encoder.", "actor.", "critic."):
        assert any(name.startswith(prefix) for name in changed), f"no {prefix[:-1]} parameter was updated"
    # the encoder received (finite, non-zero) gradients through the PPO loss
    assert probe.encoder_grads, "no optimizer step"
    grads = probe.encoder_grads[0]
    assert grads, "the encoder received no gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert int(module.frames) == 2 * tiny.M * tiny.K * tiny.L
    metrics = trainer.callback_metrics
    for key in (
        "train/loss_objective",
        "train/loss_critic",
        "train/clip_fraction",
        "train/kl_approx",
        "train/frames",
        "meta_train/success",
        "meta_train/success_ep1",
        f"meta_train/return_ep{tiny.K}",
    ):
        assert key in metrics, f"{key} not logged (got {sorted(metrics)})"
    assert datamodule.collector is None, "the collector must be shut down at teardown"


def test_ppo_epochs_cover_every_episode_once_per_epoch(tiny, monkeypatch) -> None:
    """Each PPO epoch visits every episode of the batch exactly once (also on later training steps).

    The first batch only initialises the input statistics; the second and third are trained on."""
    L, K, M = tiny.L, tiny.K, tiny.M
    module = tiny.make_module(tiny.encoders["hierarchical"], ppo_epochs=2, episodes_per_minibatch=8)
    datamodule = MetaRLDataModule(
        benchmark=tiny.point_robot(), num_envs=M, trials_per_env=2, iterations_per_epoch=3, seed=1
    )
    seen: list[torch.Tensor] = []
    original = module.loss_module.forward

    def spy(tensordict):
        seen.append(tensordict["token"].detach().flatten(1).clone())  # one row per episode
        return original(tensordict)

    monkeypatch.setattr(module.loss_module, "forward", spy)
    probe = _ParityProbe()
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    episodes = M * 2 * K
    # rows of the training batch are single whole trials
    assert probe.shapes == [torch.Size([M * 2, K * L])] * 3
    # every batch is on-policy: each was collected after the previous update and input statistics
    # (no prefetching ahead of training_step), so parity also holds on it
    assert max(probe.diffs) < 1e-5, probe.diffs
    assert [len(x) for x in seen] == [8] * (2 * 2 * episodes // 8)
    per_epoch = episodes // 8
    epochs = [torch.cat(seen[i : i + per_epoch]) for i in range(0, len(seen), per_epoch)]
    for epoch in epochs:
        assert len(torch.unique(epoch, dim=0)) == episodes, "an epoch repeated or skipped episodes"
    same = lambda a, b: torch.equal(torch.unique(a, dim=0), torch.unique(b, dim=0))  # noqa: E731
    assert same(epochs[0], epochs[1]), "both PPO epochs of a step must use the same batch"
    assert same(epochs[2], epochs[3])
    assert not same(epochs[0], epochs[2]), "the second training step must use the new batch"


def test_meta_test_callback_covers_every_test_task_and_logs_the_adaptation_curve(tiny) -> None:
    K = tiny.K
    module = tiny.make_module(tiny.encoders["hierarchical"])
    datamodule = MetaRLDataModule(benchmark=tiny.point_robot(), num_envs=tiny.M, iterations_per_epoch=1, seed=0)
    # 4 held-out tasks on 3 env slots: two rounds of trials, each task exactly once
    callback = MetaTestEvaluation(num_envs=3, deterministic=True, seed=3)
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    expected = {"meta_test/success", "meta_test/return"}
    expected |= {f"meta_test/{name}_ep{k}" for name in ("success", "return") for k in range(1, K + 1)}
    assert expected <= set(callback.last_results), sorted(callback.last_results)
    assert expected <= set(trainer.callback_metrics)

    again = callback.evaluate(trainer, module)
    num_tasks = len(tiny.point_robot().task_names("test"))
    trials = callback.latest_rollout
    assert trials.shape[0] == num_tasks
    assert sorted(trials["task_id"][:, 0].tolist()) == list(range(num_tasks))
    assert (trials["task_id"] == trials["task_id"][:, :1]).all()
    # the same tasks (and, with deterministic actions, the same results) at every evaluation
    assert {key: float(value) for key, value in again.items()} == {key: callback.last_results[key] for key in again}
    # the confidence interval is over trials: one success rate (mean over the K episodes) per trial
    trial_success = trials["next", "success"].reshape(num_tasks, K, -1).any(-1).float().mean(-1)
    t_975 = float(scipy.stats.t.ppf(0.975, num_tasks - 1))
    torch.testing.assert_close(again["meta_test/success_ci95"], t_975 * trial_success.std() / num_tasks**0.5)
    assert callback.last_results["time/eval_s"] > 0
    returns = torch.stack([again[f"meta_test/return_ep{k}"] for k in range(1, K + 1)])
    torch.testing.assert_close(returns.mean(), again["meta_test/return"])


def _reference_gae(reward, value, done, gamma, lmbda):
    """Textbook GAE along dim 1: done_t cuts the trace and the bootstrap after step t."""
    advantage = torch.zeros_like(reward)
    last = torch.zeros_like(reward[:, 0])
    next_value = torch.zeros_like(value[:, 0])
    for t in reversed(range(reward.shape[1])):
        not_done = 1.0 - done[:, t].float()
        delta = reward[:, t] + gamma * next_value * not_done - value[:, t]
        last = delta + gamma * lmbda * not_done * last
        advantage[:, t] = last
        next_value = value[:, t]
    return advantage


def _advantages(module, batch):
    module.estimate_advantage(batch)
    return batch["advantage"].squeeze(-1), batch["state_value"].squeeze(-1), batch["value_target"].squeeze(-1)


GAMMA, LAMBDA = 0.9, 0.8


def _gae_setup(tiny, horizon: str, normalize_rewards: bool, seed: int):
    """A module with the given GAE settings, a batch whose rows hold 2 whole trials, and the done
    mask ``[M, 2*K*L]`` the horizon implies (trial ends, or every episode end)."""
    module = tiny.make_module(
        tiny.encoders["hierarchical"],
        gamma=GAMMA,
        gae_lambda=LAMBDA,
        advantage_horizon=horizon,
        normalize_rewards=normalize_rewards,
    )
    env = tiny.point_robot().make_env("train", num_envs=tiny.M, seed=seed)
    batch = tiny.collect(env, module.make_policy(seed=seed), trials_per_env=2)
    t = torch.arange(2 * tiny.K * tiny.L)
    period = tiny.K * tiny.L if horizon == "trial" else tiny.L
    return module, batch, ((t + 1) % period == 0).expand(tiny.M, -1)


@pytest.mark.parametrize("horizon", ["trial", "episode"])
def test_gae_horizon(tiny, horizon) -> None:
    L, K, M = tiny.L, tiny.K, tiny.M
    # normalize_rewards=False: plain GAE on the raw rewards (normalization is tested separately)
    module, batch, done = _gae_setup(tiny, horizon, normalize_rewards=False, seed=8)
    S = 2 * K * L
    advantage, value, target = _advantages(module, batch.clone())
    assert advantage.shape == value.shape == (M, S)
    assert value.abs().sum() > 0
    torch.testing.assert_close(target, advantage + value)

    reward = batch["next", "reward"].squeeze(-1)
    torch.testing.assert_close(advantage, _reference_gae(reward, value, done, GAMMA, LAMBDA), rtol=1e-5, atol=1e-5)

    # Perturb one reward in episode 2 (index 1) of the first trial and see who is credited.
    perturbed = batch.clone()
    step = L + 3
    perturbed["next", "reward"][:, step] += 1.0
    new_advantage, new_value, _ = _advantages(module, perturbed)
    assert torch.equal(new_value, value)  # the reward is not in any token: values are unchanged
    affected = (new_advantage - advantage).abs() > 1e-7
    assert affected[:, L : step + 1].all()
    assert not affected[:, step + 1 :].any(), "a reward must not be credited to later steps"
    assert not affected[:, K * L :].any(), "credit must not cross the trial boundary"
    if horizon == "trial":
        assert affected[:, :L].all(), "'trial' must bootstrap across episode boundaries of a trial"
    else:
        assert not affected[:, :L].any(), "'episode' must cut the advantage at every episode end"


def _discounted_returns(reward, done, gamma):
    returns = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for t in reversed(range(reward.shape[1])):
        running = reward[:, t] + gamma * running * (1.0 - done[:, t].float())
        returns[:, t] = running
    return returns


@pytest.mark.parametrize("horizon", ["trial", "episode"])
def test_gae_with_reward_normalization(tiny, horizon) -> None:
    """normalize_rewards divides the GAE rewards by the running std of the discounted return."""
    module, batch, done = _gae_setup(tiny, horizon, normalize_rewards=True, seed=9)
    reward = batch["next", "reward"].squeeze(-1)
    advantage, value, target = _advantages(module, batch.clone())
    returns = _discounted_returns(reward.double(), done, GAMMA)
    std = (returns.var(unbiased=False) + 1e-8).sqrt().float()
    assert std > 0.5, "point-robot dense returns are far from unit scale: normalization must matter"
    expected = _reference_gae(reward / std, value, done, GAMMA, LAMBDA)
    torch.testing.assert_close(advantage, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target, advantage + value)
    # the raw reward is left alone in the batch (tokens and logged returns use it)
    assert torch.equal(batch["next", "reward"].squeeze(-1), reward)


def test_bad_module_options(tiny) -> None:
    from lightning_htrmrl.validation import ConfigError

    with pytest.raises(ConfigError, match="window"):
        tiny.make_module(tiny.hierarchical(window=tiny.L + 1))
    with pytest.raises(ConfigError, match="num_episodes"):
        tiny.make_module(tiny.hierarchical(num_episodes=tiny.K + 1))
    with pytest.raises(ConfigError, match="gamma"):
        tiny.make_module(tiny.encoders["mlp"], gamma=1.5)
    with pytest.raises(ConfigError, match="ppo_epochs"):
        tiny.make_module(tiny.encoders["mlp"], ppo_epochs=0)
    with pytest.raises(ConfigError, match="data.num_envs"):
        MetaRLDataModule(benchmark=tiny.point_robot(), num_envs=0)
    with pytest.raises(ConfigError, match="data.iterations_per_epoch"):
        MetaRLDataModule(benchmark=tiny.point_robot(), iterations_per_epoch=0)
    with pytest.raises(ConfigError, match="data.benchmark"):
        MetaRLDataModule(benchmark="point_robot")  # type: ignore[arg-type]
    datamodule = MetaRLDataModule(benchmark=tiny.point_robot(), num_envs=3, trials_per_env=2)
    assert datamodule.frames_per_batch == 3 * 2 * tiny.K * tiny.L
    assert (datamodule.obs_dim, datamodule.action_dim) == (2, 2)


MULTI_PROCESS_FIT = """
import sys
from functools import partial

import torch
from lightning.pytorch import Callback, Trainer

from lightning_htrmrl.data import MetaRLDataModule
from lightning_htrmrl.envs import PointRobot
from lightning_htrmrl.models import HierarchicalEncoder
from lightning_htrmrl.module import MetaPPO


class Parity(Callback):
    def __init__(self):
        self.diffs = []
        self.threads = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        recomputed = pl_module.recompute_log_prob(batch).reshape(batch.shape)
        self.diffs.append(float((recomputed - batch["action_log_prob"]).abs().max()))


if __name__ == "__main__":  # collector processes are spawned: they re-import this file
    accelerator = sys.argv[1]
    # the collector processes run the policy on the CPU: on a GPU, parity holds up to float rounding
    tolerance = 1e-5 if accelerator == "cpu" else 1e-4
    torch.set_num_threads(3)
    benchmark = PointRobot(episode_length=8, episodes_per_trial=3, num_goals=8)
    encoder = partial(HierarchicalEncoder, num_episodes=2, window=4, d_model=16, num_heads=2, ff_dim=32)
    module = MetaPPO(2, 2, 8, 3, encoder=encoder, ppo_epochs=1, episodes_per_minibatch=6)
    data = MetaRLDataModule(benchmark, num_envs=2, num_collectors=2, iterations_per_epoch=2)
    parity = Parity()
    trainer = Trainer(max_epochs=1, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[parity])
    trainer.fit(module, data)
    assert len(parity.diffs) == 2 and max(parity.diffs) < tolerance, parity.diffs
    assert parity.threads == [3, 3], f"training lost its torch threads to the collector: {parity.threads}"
    print("fit done", flush=True)
"""


COLLECTOR_LEFT_AT_EXIT = """
from lightning_htrmrl.data import MetaRLDataModule, shutdown_collector
from lightning_htrmrl.envs import PointRobot
from lightning_htrmrl.models import HierarchicalEncoder
from lightning_htrmrl.module import MetaPPO

if __name__ == "__main__":
    module = MetaPPO(2, 2, 12, 4, encoder=HierarchicalEncoder)
    benchmark = PointRobot(episode_length=12, episodes_per_trial=4, num_goals=8)
    data = MetaRLDataModule(benchmark, num_envs=2, num_collectors=2)
    collector = data.build_collector(module.make_policy())  # still referenced when the interpreter exits
    next(iter(collector))
    shutdown_collector(collector)
    print("collected", flush=True)
"""


def _run_script(path: Path, text: str, expected: str, *args: str) -> None:
    path.write_text(text)
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_multi_process_collection_is_on_policy(tmp_path, accelerator) -> None:
    """Two collector processes: every batch is collected with the current weights (also when the
    model trains on a GPU and the processes hold a CPU copy), and training keeps the process's torch
    threads (the workers wait while it trains)."""
    _run_script(tmp_path / "fit.py", MULTI_PROCESS_FIT, "fit done", accelerator)


def test_process_exits_after_a_multi_process_collector(tmp_path) -> None:
    """A process that used a 2-process collector exits by itself (TorchRL's weight-sync scheme would
    otherwise block interpreter exit starting a queue thread in its ``__del__``)."""
    _run_script(tmp_path / "collect.py", COLLECTOR_LEFT_AT_EXIT, "collected")
