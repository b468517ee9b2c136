"""Meta-World v3 task distribution and batched trial env (real MuJoCo envs, tiny sizes)."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch
from gymnasium.utils import seeding
from tensordict import TensorDictBase
from torchrl.envs.utils import check_env_specs

from lightning_htrmrl.envs import MetaWorld, MetaWorldEnv
from lightning_htrmrl.envs import metaworld as mw_module
from lightning_htrmrl.validation import ConfigError

L, K, M = 5, 3, 2


@pytest.fixture(scope="module")
def ml1() -> MetaWorld:
    return MetaWorld("ML1", "reach-v3", episode_length=L, episodes_per_trial=K, seed=0)


def _goals(tasks) -> np.ndarray:
    return np.stack([pickle.loads(t.data)["rand_vec"] for t in tasks])


def test_check_env_specs_ml1() -> None:
    env = MetaWorld("ML1", "reach-v3", episode_length=10, episodes_per_trial=2).make_env("train", num_envs=2)
    assert isinstance(env, MetaWorldEnv)
    check_env_specs(env)
    env.close()


def test_rollout_follows_trial_structure(ml1: MetaWorld) -> None:
    env = ml1.make_env("train", num_envs=M, seed=1, cycle_tasks=True)
    td = env.rollout(2 * K * L, break_when_any_done=False)  # two whole trials
    assert td.batch_size == (M, 2 * K * L)
    first, second = td[:, : K * L], td[:, K * L :]
    for trial in (first, second):
        done = trial["next", "done"].squeeze(-1)
        assert done[:, -1].all() and not done[:, :-1].any()
        assert not trial["next", "terminated"].any()
        t = torch.arange(K * L)
        assert (trial["episode_idx"] == t // L).all()
        assert (trial["step_in_episode"] == t % L).all()
        assert (trial["task_id"] == trial["task_id"][:, :1]).all()  # constant within a trial
    # cycle_tasks: slot i gets entry j * M + i of a fixed task permutation at its j-th trial, so
    # tasks change at the trial start and the first trials never repeat a task
    order = env._task_order.tolist()
    assert first["task_id"][:, 0].tolist() == order[0:2]
    assert second["task_id"][:, 0].tolist() == order[2:4]

    success = td["next", "success"]
    assert success.dtype == torch.bool and success.shape == (M, 2 * K * L)
    obs = td["observation"]
    assert obs.dtype == torch.float32 and obs.shape[-1] == 39 == ml1.obs_dim
    assert td["token"].shape[-1] == 45 == ml1.token_dim
    # token_{t+1} = [s_{t+1}, a_t, r_t, episode_over_t]; zeros for a, r, done at a trial start
    token, action, reward = td["token"], td["action"], td["next", "reward"].squeeze(-1)
    within = torch.ones(2 * K * L, dtype=torch.bool)
    within[K * L] = False  # the second trial's first token does not carry the first trial's last step
    within = within[1:]
    torch.testing.assert_close(token[:, 1:, 39:43][:, within], action[:, :-1][:, within])
    torch.testing.assert_close(token[:, 1:, 43][:, within], reward[:, :-1][:, within])
    episode_over = (td["step_in_episode"] == L - 1).float()
    torch.testing.assert_close(token[:, 1:, 44][:, within], episode_over[:, :-1][:, within])
    assert (token[:, [0, K * L], 39:] == 0).all()
    torch.testing.assert_close(token[..., :39], obs)
    # Meta-World rewards are 0..10 per step, scaled by 0.1
    assert (reward >= 0).all() and (reward <= 1.0).all()
    env.close()


def test_matches_raw_metaworld_env(ml1: MetaWorld) -> None:
    """Obs, scaled reward and success equal a raw env's; episodes restart from the env's reset."""
    env = ml1.make_env("train", num_envs=1, seed=0)
    torch.manual_seed(0)
    td = env.rollout(K * L, break_when_any_done=False)
    task_id = int(td["task_id"][0, 0])
    raw = ml1.classes("train")["reach-v3"]()
    raw.set_task(ml1.tasks("train")[task_id])
    for t in range(K * L):
        if t % L == 0:
            obs, _ = raw.reset()
            np.testing.assert_allclose(td["observation"][0, t].numpy(), obs, rtol=1e-6, atol=1e-6)
        obs, r, terminated, _, info = raw.step(td["action"][0, t].numpy())
        assert not terminated
        assert td["next", "reward"][0, t, 0].item() == pytest.approx(0.1 * r, rel=1e-5)
        assert td["next", "success"][0, t].item() == bool(info["success"])
        if (t + 1) % L:
            np.testing.assert_allclose(td["next", "observation"][0, t].numpy(), obs, rtol=1e-6, atol=1e-6)
    env.close()


def _reacher(env: MetaWorldEnv):
    """A scripted policy that moves the hand straight to slot 0's goal."""

    def reacher(td: TensorDictBase) -> TensorDictBase:
        goal = torch.as_tensor(env._slot_env[0]._target_pos, dtype=torch.float32)
        delta = (goal - td["observation"][0, :3]) * 100.0
        td.set("action", torch.cat([delta, torch.zeros(1)]).clamp(-1, 1).unsqueeze(0))
        return td

    return reacher


def test_train_env_never_terminates_on_success() -> None:
    """A scripted reacher succeeds early; the episode and trial still run to their full length."""
    length = 60
    env = MetaWorld("ML1", "reach-v3", episode_length=length, episodes_per_trial=1).make_env("train", num_envs=1)
    td = env.rollout(length, _reacher(env), break_when_any_done=False)
    success = td["next", "success"][0]
    assert success.any() and not success[0]  # reached the goal during the episode
    first = int(success.nonzero()[0])
    assert first < length - 1
    assert not td["next", "terminated"].any()
    done = td["next", "done"][0].squeeze(-1)
    assert done[-1] and not done[:-1].any()
    assert td.batch_size == (1, length)  # it kept stepping after the success
    env.close()


def test_success_only_reward_is_one_exactly_where_the_task_is_solved() -> None:
    benchmark = MetaWorld("ML1", "reach-v3", episode_length=60, episodes_per_trial=1, reward="success")
    assert benchmark.describe()["reward"] == "success"  # stored in checkpoints and meta_test.json
    env = benchmark.make_env("train", num_envs=1)
    td = env.rollout(60, _reacher(env), break_when_any_done=False)
    success, reward = td["next", "success"][0], td["next", "reward"][0, :, 0]
    assert success.any() and not success.all()
    assert torch.equal(reward, success.float())
    env.close()


def test_near_goal_reward_pays_the_shaped_reward_only_within_the_radius() -> None:
    """The same scripted reach under both rewards: ``near_goal`` is 0 while the hand is far from the
    goal (it starts 0.2 m or more away) and Meta-World's scaled reward once within the radius."""
    rewards = {}
    for reward in ("metaworld", "near_goal"):
        benchmark = MetaWorld(
            "ML1", "reach-v3", episode_length=60, episodes_per_trial=1, reward=reward, reward_radius=0.1
        )
        env = benchmark.make_env("train", num_envs=1)
        td = env.rollout(60, _reacher(env), break_when_any_done=False)
        rewards[reward] = td["next", "reward"][0, :, 0]
        env.close()
    assert benchmark.describe()["reward"] == "near_goal" and benchmark.describe()["reward_radius"] == 0.1
    shaped, near = rewards["metaworld"], rewards["near_goal"]
    paid = near > 0
    assert not paid[0] and paid[-1]  # far at the start, within 0.1 m at the end
    assert torch.equal(near[paid], shaped[paid]) and (near[~paid] == 0).all()
    assert paid.int().diff().ge(0).all()  # the reacher only comes closer: unpaid steps, then paid ones


def test_seeding_is_reproducible(ml1: MetaWorld) -> None:
    env = ml1.make_env("train", num_envs=M, seed=5)
    runs = []
    for _ in range(2):
        env.set_seed(11)
        torch.manual_seed(0)
        runs.append(env.rollout(K * L, break_when_any_done=False))
    assert (runs[0]["task_id"] == runs[1]["task_id"]).all()
    torch.testing.assert_close(runs[0]["next", "observation"], runs[1]["next", "observation"])
    torch.testing.assert_close(runs[0]["next", "reward"], runs[1]["next", "reward"])
    env.set_seed(11)  # slot i's simulator is seeded with seed + i
    for i, sim in enumerate(env._slot_env):
        assert sim.np_random.bit_generator.state == seeding.np_random(11 + i)[0].bit_generator.state
    env.close()


def test_ml1_splits_are_disjoint_goals(ml1: MetaWorld) -> None:
    train, test = ml1.tasks("train"), ml1.tasks("test")
    assert len(train) == len(test) == 50
    train_goals, test_goals = _goals(train), _goals(test)
    assert len({g.tobytes() for g in train_goals}) == 50
    assert not {g.tobytes() for g in train_goals} & {g.tobytes() for g in test_goals}
    assert not {t.data for t in train} & {t.data for t in test}
    names = ml1.task_names("train")
    assert names[7] == "reach-v3/goal_07" and len(set(names)) == 50
    assert ml1.task_classes("test") == ["reach-v3"] * 50
    info = ml1.describe()
    assert info["metaworld_version"] == "3.1.1" and info["reward_function_version"] == "v2"
    assert info["train_classes"] == info["test_classes"] == ["reach-v3"]
    assert info["num_train_tasks"] == info["num_test_tasks"] == 50


def test_ml10_splits_and_class_switching() -> None:
    ml10 = MetaWorld("ML10", None, episode_length=3, episodes_per_trial=1, seed=0)
    train, test = ml10.task_classes("train"), ml10.task_classes("test")
    assert len(train) == 500 and len(test) == 250
    assert len(set(train)) == 10 and len(set(test)) == 5
    assert not set(train) & set(test)
    assert set(test) == {"drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"}
    assert ml10.describe()["test_classes"] == list(dict.fromkeys(test))

    env = ml10.make_env("test", num_envs=2, seed=0)
    td = env.rollout(4 * 3, break_when_any_done=False)  # four one-episode trials per slot
    assert td["next", "success"].dtype == torch.bool
    task_ids = td["task_id"][:, ::3]
    classes = [[test[j] for j in row] for row in task_ids.tolist()]
    assert any(len(set(row)) > 1 for row in classes)  # a slot switched class between trials
    for slot, row in enumerate(classes):  # every slot steps an instance of its current task's class
        assert env._slot_class[slot] == row[-1]
        assert isinstance(env._slot_env[slot], ml10.classes("test")[row[-1]])
    # idle instances are pooled for reuse, at most max_pooled (= num_envs) of them
    assert len(env._free) <= env.max_pooled == 2
    assert len(env._owner) == 2 + len(env._free)
    env.close()


@pytest.mark.slow
def test_ml45_splits_are_disjoint_classes() -> None:
    ml45 = MetaWorld("ML45", None, episode_length=3, episodes_per_trial=1)
    train, test = ml45.task_classes("train"), ml45.task_classes("test")
    assert len(train) == 2250 and len(test) == 250
    assert len(set(train)) == 45 and len(set(test)) == 5
    assert not set(train) & set(test)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(task_name="reach-v2"), ["unknown Meta-World v3 task 'reach-v2'", "-v2 task to -v3", "assembly-v3"]),
        (dict(task_name="not-a-task"), ["unknown Meta-World v3 task", "valid: assembly-v3, basketball-v3"]),
        (dict(task_name=None), ["ML1 needs a Meta-World v3 task name"]),
        (dict(benchmark="ML5"), ["benchmark must be one of ['ML1', 'ML10', 'ML45']"]),
        (dict(benchmark="ML10", task_name="reach-v3"), ["task_name must be null for ML10"]),
        (dict(episode_length=501), ["episode_length must be <= 500"]),
        (dict(hidden_observation_dims=[4, 39]), ["hidden_observation_dims must be indices in [0, 38]"]),
        (dict(reward="sparse"), ["reward must be one of ['metaworld', 'success', 'near_goal'], got 'sparse'"]),
        (dict(reward_radius=0.0), ["reward_radius must be > 0"]),
    ],
)
def test_bad_config_fails_fast_without_benchmark(monkeypatch, kwargs: dict, needles: list[str]) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("validation must not build a Meta-World benchmark")

    monkeypatch.setattr(mw_module, "_build_benchmark", no_build)
    cached = dict(mw_module._BENCHMARK_CACHE)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        MetaWorld(**kwargs)
    assert time.perf_counter() - start < 5.0  # at most the `import metaworld` of a fresh process
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert mw_module._BENCHMARK_CACHE == cached


def test_benchmark_built_once_per_process(monkeypatch) -> None:
    monkeypatch.setattr(mw_module, "_BENCHMARK_CACHE", {})
    calls = []
    build = mw_module._build_benchmark

    def counting_build(*args):
        calls.append(args)
        return build(*args)

    monkeypatch.setattr(mw_module, "_build_benchmark", counting_build)
    a = MetaWorld("ML1", "reach-v3", episode_length=L, episodes_per_trial=K)
    b = MetaWorld("ML1", "reach-v3", episode_length=2 * L, episodes_per_trial=1)
    assert calls == []  # nothing built by the constructors
    a.task_names("train"), a.task_classes("test"), b.describe()
    env = b.make_env("test", num_envs=1)
    assert calls == [("ML1", "reach-v3", 0)]
    assert a.metaworld_benchmark() is b.metaworld_benchmark()
    env.close()


def test_hidden_observation_dims_are_zero_for_the_policy() -> None:
    """reach-v3's puck (obs 4:7 and its previous-frame copy 22:25) identifies each training goal."""
    puck = [4, 5, 6, 22, 23, 24]
    plain = MetaWorld("ML1", "reach-v3", episode_length=L, episodes_per_trial=K, seed=0)
    hidden = MetaWorld("ML1", "reach-v3", episode_length=L, episodes_per_trial=K, seed=0, hidden_observation_dims=puck)
    assert hidden.describe()["hidden_observation_dims"] == puck
    torch.manual_seed(0)
    rollouts = []
    for benchmark in (plain, hidden):
        env = benchmark.make_env("train", num_envs=M, seed=3)
        rollouts.append(env.rollout(K * L, break_when_any_done=False, auto_cast_to_device=True))
        env.close()
    with_puck, without = (r["observation"] for r in rollouts)
    assert with_puck[..., puck].abs().sum() > 0
    assert (without[..., puck] == 0).all() and (rollouts[1]["token"][..., puck] == 0).all()
    others = [d for d in range(39) if d not in puck]
    assert (without[:, 0, others] == with_puck[:, 0, others]).all(), "only the hidden entries change"
