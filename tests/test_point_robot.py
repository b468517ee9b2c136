"""PointRobot task distribution and its batched trial env (TrialEnv bookkeeping)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import check_env_specs

from lightning_htrmrl.envs import PointRobot, PointRobotEnv
from lightning_htrmrl.validation import ConfigError


def _scaled_random_policy(scale: float, seed: int = 0):
    """A policy that emits actions far outside [-1, 1] (the env must clip them)."""
    generator = torch.Generator().manual_seed(seed)

    def policy(td: TensorDictBase) -> TensorDictBase:
        td.set("action", scale * torch.randn(*td.batch_size, 2, generator=generator))
        return td

    return policy


def test_check_env_specs(point_robot: PointRobot) -> None:
    env = point_robot.make_env("train", num_envs=3, seed=0)
    assert isinstance(env, PointRobotEnv)
    assert env.batch_size == (3,)
    check_env_specs(env)
    assert point_robot.token_dim == env.token_dim == 2 + 2 + 2


def test_trial_structure(tiny, point_robot: PointRobot) -> None:
    L, K, M = tiny.L, tiny.K, 8
    env = point_robot.make_env("train", num_envs=M, seed=3)
    td = env.rollout(3 * K * L, break_when_any_done=False)  # three whole trials
    assert td.batch_size == (M, 3 * K * L)
    trials = [td[:, i * K * L : (i + 1) * K * L] for i in range(3)]
    t = torch.arange(K * L)
    for trial in trials:
        done = trial["next", "done"].squeeze(-1)
        assert done[:, -1].all(), "done must be set at the trial's last step"
        assert not done[:, :-1].any(), "done must be set only at the trial's last step (not at episode ends)"
        assert not trial["next", "terminated"].any()
        assert torch.equal(trial["next", "truncated"], trial["next", "done"])
        assert (trial["episode_idx"] == t // L).all()
        assert (trial["step_in_episode"] == t % L).all()
        # the task is fixed within a trial
        assert (trial["task_id"] == trial["task_id"][:, :1]).all()
        assert (trial["next", "task_id"] == trial["task_id"][:, :1]).all()
        # the simulator restarts at the origin at every episode start
        starts = trial["observation"][:, t % L == 0]
        assert torch.equal(starts, torch.zeros_like(starts))
    # tasks are resampled at trial starts (8 slots, 4 tasks: some slot changes task)
    first_tasks = torch.stack([trial["task_id"][:, 0] for trial in trials])
    assert (first_tasks[1:] != first_tasks[:-1]).any()
    assert ((first_tasks >= 0) & (first_tasks < tiny.num_goals // 2)).all()


def test_train_and_test_goals_disjoint_and_interleaved(point_robot: PointRobot) -> None:
    train, test = point_robot.goal_angles("train"), point_robot.goal_angles("test")
    assert len(train) == len(test) == point_robot.num_goals // 2
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert ((train > 0) & (train < math.pi)).all() and ((test > 0) & (test < math.pi)).all()
    merged = torch.stack([train, test], dim=1).flatten()  # train_0, test_0, train_1, test_1, ...
    assert (merged.diff() > 0).all(), "train and test angles must alternate"
    for split in ("train", "test"):
        goals = point_robot.goals(split)
        assert torch.allclose(goals.norm(dim=-1), torch.ones(len(goals)))
        assert (goals[:, 1] > 0).all()  # upper half-circle
        assert len(point_robot.task_names(split)) == len(goals)
    env_train = point_robot.make_env("train", num_envs=2)
    env_test = point_robot.make_env("test", num_envs=2)
    assert torch.equal(env_train.goals, point_robot.goals("train"))
    assert torch.equal(env_test.goals, point_robot.goals("test"))
    with pytest.raises(ConfigError, match="split"):
        point_robot.make_env("validation", num_envs=2)


def test_dense_reward_success_and_max_step(tiny) -> None:
    robot = tiny.point_robot(max_step=0.1, success_radius=0.1)
    env = robot.make_env("train", num_envs=3, seed=0, cycle_tasks=True)
    td = env.reset()
    goals = env.goals[td["task_id"]]
    # Saturated actions are clipped to [-1, 1]: one step moves at most max_step per coordinate.
    action = torch.tensor([[5.0, -5.0], [0.5, 0.25], [-1.0, 1.0]])
    out = env.step(td.set("action", action))["next"]
    expected = 0.1 * action.clamp(-1, 1)
    assert torch.allclose(out["observation"], expected)
    distance = (expected - goals).norm(dim=-1)
    assert torch.allclose(out["reward"].squeeze(-1), -distance)
    assert not out["success"].any()

    # Place the points near the goal: success iff within success_radius (0.1).
    env._position = goals - torch.tensor([[0.0, 0.05], [0.0, 0.2], [0.0, 0.095]])
    out = _one_step_no_reset(env, torch.zeros(3, 2))
    assert out["success"].tolist() == [True, False, True]
    assert torch.allclose(out["reward"].squeeze(-1), -torch.tensor([0.05, 0.2, 0.095]), atol=1e-6)


def _one_step_no_reset(env: PointRobotEnv, action: torch.Tensor) -> TensorDictBase:
    td = env._emit(success=torch.zeros(env.num_envs, dtype=torch.bool))
    td.set("action", action)
    return env.step(td)["next"]


def test_sparse_reward(tiny) -> None:
    robot = tiny.point_robot(sparse=True, reward_radius=0.2, success_radius=0.1)
    env = robot.make_env("train", num_envs=3, seed=0, cycle_tasks=True)
    td = env.reset()
    goals = env.goals[td["task_id"]]
    env._position = goals - torch.tensor([[0.0, 0.05], [0.0, 0.15], [0.0, 0.5]])
    out = _one_step_no_reset(env, torch.zeros(3, 2))
    assert out["reward"].squeeze(-1).tolist() == [1.0, 1.0, 0.0]
    assert out["success"].tolist() == [True, False, False]
    # from the origin (distance 1 to every goal) the sparse reward is 0
    out = env.step(env.reset().set("action", torch.zeros(3, 2)))["next"]
    assert (out["reward"] == 0).all()


def test_steps_4096_envs_at_once(tiny) -> None:
    robot = tiny.point_robot()
    env = robot.make_env("train", num_envs=4096, seed=0)
    start = time.perf_counter()
    td = env.rollout(tiny.K * tiny.L, break_when_any_done=False)
    elapsed = time.perf_counter() - start
    assert td.batch_size == (4096, tiny.K * tiny.L)
    assert td["next", "done"][:, -1].all()
    assert elapsed < 20.0, f"stepping 4096 envs for one trial took {elapsed:.1f}s"


def test_token_semantics(tiny, point_robot: PointRobot) -> None:
    L, K, M = tiny.L, tiny.K, 5
    env = point_robot.make_env("train", num_envs=M, seed=1)
    td = env.rollout(2 * K * L, _scaled_random_policy(3.0), break_when_any_done=False)
    token, obs = td["token"], td["observation"]
    action, reward = td["action"], td["next", "reward"].squeeze(-1)
    step, episode = td["step_in_episode"], td["episode_idx"]
    assert (action.abs() > 1).any(), "the test policy must emit out-of-range actions"
    # token = [s_t, a_{t-1} (clipped), r_{t-1}, done_{t-1}]
    assert torch.equal(token[..., :2], obs)
    trial_start = (step == 0) & (episode == 0)
    assert trial_start[:, 0].all() and trial_start[:, K * L].all()
    assert torch.equal(token[trial_start][:, 2:], torch.zeros(int(trial_start.sum()), 4))
    later = ~trial_start[:, 1:]
    prev_action = action[:, :-1].clamp(-1, 1)
    assert torch.allclose(token[:, 1:, 2:4][later], prev_action[later])
    assert torch.allclose(token[:, 1:, 4][later], reward[:, :-1][later])
    expected_done = ((step == 0) & (episode > 0)).float()
    assert torch.equal(token[..., 5], expected_done), "done_prev is 1 exactly at the first step of episodes 2..K"
    # the "next" token is the token of the following step (within a trial)
    same_trial = ~td["next", "done"].squeeze(-1)[:, :-1]
    assert torch.equal(td["next", "token"][:, :-1][same_trial], token[:, 1:][same_trial])


def test_cycle_tasks_covers_all_tasks(tiny) -> None:
    robot = tiny.point_robot()
    num_tasks = len(robot.task_names("test"))
    # as many slots as tasks: one trial covers every task exactly once
    env = robot.make_env("test", num_envs=num_tasks, seed=5, cycle_tasks=True)
    td = env.rollout(tiny.K * tiny.L, break_when_any_done=False)
    assert sorted(td["task_id"][:, 0].tolist()) == list(range(num_tasks))
    # fewer slots than tasks: consecutive trials cover every task before repeating one
    env = robot.make_env("test", num_envs=3, seed=5, cycle_tasks=True)
    td = env.rollout(2 * tiny.K * tiny.L, break_when_any_done=False)
    firsts = td["task_id"][:, :: tiny.K * tiny.L]  # [slot, trial]
    draws = firsts.T.flatten().tolist()  # in the order (trial j, slot i)
    assert sorted(draws[:num_tasks]) == list(range(num_tasks))
    # re-seeding restarts the schedule: the same tasks are evaluated every time
    env.set_seed(5)
    again = env.rollout(2 * tiny.K * tiny.L, break_when_any_done=False)
    assert torch.equal(again["task_id"], td["task_id"])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(episode_length=0), "episode_length"),
        (dict(episodes_per_trial=0), "episodes_per_trial"),
        (dict(num_goals=1), "num_goals"),
        (dict(max_step=0.0), "max_step"),
    ],
)
def test_bad_options_raise_config_error(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key):
        PointRobot(**kwargs)


def test_task_sequence_continues_after_start_at_trial() -> None:
    """A resumed run (which restores the trial count) draws the tasks an uninterrupted run would."""
    benchmark = PointRobot(episode_length=2, episodes_per_trial=1, num_goals=40)
    straight = benchmark.make_env("train", 3, seed=11)
    tasks = [straight.reset()["task_id"].tolist() for _ in range(5)]
    resumed = benchmark.make_env("train", 3, seed=11)
    resumed.start_at_trial(3)
    assert [resumed.reset()["task_id"].tolist() for _ in range(2)] == tasks[3:]
    assert len({tuple(t) for t in tasks}) > 1, "tasks must change between trials"
