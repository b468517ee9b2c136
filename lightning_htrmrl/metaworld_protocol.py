"""Meta-World's own meta-learning evaluation of a trained policy (numbers that compare with papers).

``metaworld.evaluation.metalearning_evaluation`` is the protocol of Meta-World+ (Meta-World v3),
with which its RL^2 and MAML baselines are reported. On the benchmark's official held-out test
envs (``gym.make_vec("Meta-World/ML1-test" | "ML10-test" | "ML45-test")``), each of ``num_evals``
rounds gives every sub-env its next task, lets the agent adapt for ``adaptation_episodes``
full-length episodes, then counts success over ``evaluation_episodes`` episodes that end on
success (each at most ``max_episode_steps`` steps).

:class:`InContextAgent` is a trained policy as a ``metaworld.evaluation.MetaLearningAgent``. For
an in-context learner adaptation *is* the episodic memory: ``init`` starts a new trial (the memory
is cleared), the adaptation and evaluation episodes follow each other in memory as the episodes of
one trial, and ``adapt`` changes nothing. The eval envs carry the previous action, reward and done
in the observation (Meta-World's ``recurrent_info_in_obs``, its setting for RL^2), as the
evaluation phase shows the agent nothing else; the agent builds its tokens
``[s_t, a_{t-1}, r_{t-1}, done_{t-1}]`` exactly as in training, except for the first token of an
evaluation episode that follows another evaluation episode: the protocol never shows the final
reward of an episode, so that token holds the last reward the agent saw.

Episodes longer than training's ``L`` (Meta-World's 500 steps) and shorter ones (ended on
success): the agent's memory holds ``max_episode_steps`` steps per episode and the steps each
episode really has; past-episode windows are chosen within them (see
:class:`~lightning_htrmrl.memory.EpisodicMemory`). Windows are ``T`` steps wherever they lie in an
episode, and positions are within windows, so nothing depends on ``L``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from lightning_htrmrl.envs.metaworld import MAX_PATH_LENGTH, MetaWorld
from lightning_htrmrl.models import make_policy
from lightning_htrmrl.validation import ConfigError

_KEY = "meta_test.metaworld"


@dataclass
class MetaWorldProtocol:
    """Settings of Meta-World's ``metalearning_evaluation`` (its defaults, except ``meta_batch_size``).

    Args:
        num_evals: rounds; each gives every sub-env its next task (cycling through its tasks).
        adaptation_episodes: episodes per round before evaluation (full length, no early end).
        evaluation_episodes: episodes per round whose success counts (they end on success).
        max_episode_steps: steps per episode at most (Meta-World's ``max_path_length``: 500).
        meta_batch_size: sub-envs of the test envs; ``None``: one per held-out class (ML1: 1,
            ML10 / ML45: 5), each cycling through its class's 50 goals, one per round. Meta-World's
            evaluator counts, per class, the first ``evaluation_episodes`` episodes to *end*: with
            several sub-envs of a class, episodes that end early (successes) crowd out the others
            and inflate success; with one, the counted episodes are that sub-env's consecutive
            episodes. Meta-World needs a multiple of the number of held-out classes that splits
            each class's 50 goals evenly.
    """

    num_evals: int = 10
    adaptation_episodes: int = 10
    evaluation_episodes: int = 3
    max_episode_steps: int = MAX_PATH_LENGTH
    meta_batch_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("num_evals", "adaptation_episodes", "evaluation_episodes", "max_episode_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_KEY}.{key} must be an integer >= 1, got {value!r}")
        if self.max_episode_steps > MAX_PATH_LENGTH:
            raise ConfigError(
                f"{_KEY}.max_episode_steps must be <= {MAX_PATH_LENGTH} (Meta-World's max_path_length), "
                f"got {self.max_episode_steps}"
            )

    def sub_envs(self, num_test_classes: int) -> int:
        """The number of sub-envs, checked against Meta-World's even split of each class's goals."""
        size = self.meta_batch_size or num_test_classes
        per_class = size // num_test_classes
        if size % num_test_classes or per_class < 1 or 50 % per_class:
            allowed = [n * num_test_classes for n in (1, 2, 5, 10, 25, 50)]
            raise ConfigError(f"{_KEY}.meta_batch_size must be one of {allowed} here, got {size}")
        return size


def _describe(benchmark: dict) -> str:
    """``Meta-World ML1 reach-v3`` or the class name, from a benchmark's ``describe()`` facts."""
    if benchmark.get("class") != "MetaWorld":
        return str(benchmark.get("class"))
    parts = ("Meta-World", benchmark.get("benchmark"), benchmark.get("task_name"))
    return " ".join(str(part) for part in parts if part)


def check_metaworld_benchmark(
    configured: str, trained: dict | None = None, configured_facts: dict | None = None
) -> None:
    """One ``error:`` line unless the configured benchmark is Meta-World and the checkpoint was trained on it.

    Args:
        configured: class name of ``data.benchmark``.
        trained: the checkpoint's benchmark facts (``describe()``), if a checkpoint is evaluated.
        configured_facts: ``benchmark`` and ``task_name`` of ``data.benchmark``.
    """
    named = _describe({"class": configured, **(configured_facts or {})})
    if configured != "MetaWorld":
        raise ConfigError(f"meta_test.protocol metaworld needs a Meta-World benchmark; data.benchmark is {named}")
    if trained is None:
        return
    same = trained.get("class") == "MetaWorld" and all(
        trained.get(key) == (configured_facts or {}).get(key) for key in ("benchmark", "task_name")
    )
    if not same:
        raise ConfigError(
            f"ckpt_path: the checkpoint was trained on {_describe(trained)}, but data.benchmark is {named}: "
            "meta_test.protocol metaworld evaluates a policy on the benchmark it was trained on"
        )


class InContextAgent:
    """A trained :class:`~lightning_htrmrl.module.MetaPPO` policy as Meta-World's ``MetaLearningAgent``.

    Args:
        module: the trained module (encoder + actor).
        benchmark: the Meta-World task distribution it was trained on (observation entries it
            hides, reward scale).
        num_envs: sub-envs ``M`` of the eval envs.
        max_episode_steps: the longest episode the memory must hold.
        deterministic: act with the distribution's mean (default: sample, as in training).
        seed: seeds window sampling (uniform windows only).
    """

    def __init__(
        self,
        module,
        benchmark: MetaWorld,
        num_envs: int,
        max_episode_steps: int,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        self.module = module
        self.policy = make_policy(module.encoder, module.actor, max_episode_steps, seed, module.hparams.past_windows)
        self.obs_dim, self.action_dim = benchmark.obs_dim, benchmark.action_dim
        self.hidden = benchmark.hidden_observation_dims
        self.reward_scale = benchmark.reward_scale
        self.exploration = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
        device = module.device
        self.episode_idx = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.step_idx = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.last_action = torch.zeros(num_envs, self.action_dim, device=device)
        self.last_reward = torch.zeros(num_envs, device=device)  # scaled as in training

    # ------------------------------------------------------------------ MetaLearningAgent
    def init(self) -> None:
        """A new round: a new trial (the memory is cleared at its first step)."""
        self.episode_idx.zero_()
        self.step_idx.zero_()
        self.last_action.zero_()
        self.last_reward.zero_()

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict]:
        return self._act(observations), {}

    def step(self, timestep) -> None:
        """After an adaptation step: its reward, and a new episode where one ended."""
        reward = torch.as_tensor(np.asarray(timestep.reward), dtype=torch.float32, device=self.last_reward.device)
        self.last_reward = reward * self.reward_scale
        ended = np.logical_or(timestep.terminated, timestep.truncated)
        self.step_idx += 1
        self._begin_episodes(torch.as_tensor(ended, device=self.step_idx.device))

    def adapt(self) -> None:
        """Nothing to do: the adaptation episodes are in memory, where the evaluation episodes see them."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        # Evaluation shows no rewards but through the observation: r_{t-1} (Meta-World's reward / 10).
        shown = torch.as_tensor(
            observations[:, self.obs_dim + self.action_dim], dtype=torch.float32, device=self.last_reward.device
        )
        self.last_reward = torch.where(self.step_idx > 0, shown * 10.0 * self.reward_scale, self.last_reward)
        action = self._act(observations)
        self.step_idx += 1
        return action

    def reset(self, env_mask: np.ndarray) -> None:
        """Meta-World calls this after every evaluation step: envs in ``env_mask`` begin an episode."""
        self._begin_episodes(torch.as_tensor(env_mask, device=self.step_idx.device))

    # ------------------------------------------------------------------ helpers
    def _begin_episodes(self, mask: torch.Tensor) -> None:
        starting = mask.to(torch.bool) & (self.step_idx > 0)  # not twice for one episode end
        self.episode_idx += starting.long()
        self.step_idx[starting] = 0

    @torch.no_grad()
    def _act(self, observations: np.ndarray) -> np.ndarray:
        """Act on ``observations [M, obs_dim + action_dim + 2]``; returns actions ``[M, action_dim]``."""
        device = self.step_idx.device
        obs = torch.as_tensor(observations[:, : self.obs_dim], dtype=torch.float32, device=device).clone()
        obs[:, self.hidden] = 0.0
        new_episode = ((self.step_idx == 0) & (self.episode_idx > 0)).float().unsqueeze(-1)
        token = torch.cat([obs, self.last_action, self.last_reward.unsqueeze(-1), new_episode], dim=-1)
        steps = TensorDict(
            {"observation": obs, "token": token, "episode_idx": self.episode_idx, "step_in_episode": self.step_idx},
            batch_size=[len(obs)],
            device=device,
        )
        with set_exploration_type(self.exploration):
            action = self.policy(steps)["action"].clamp(-1.0, 1.0)
        self.last_action = action
        return action.cpu().numpy().astype(np.float64)


def make_test_envs(benchmark: MetaWorld, protocol: MetaWorldProtocol, seed: int):
    """Meta-World's official held-out test envs of ``benchmark`` (same benchmark seed: same goals)."""
    import gymnasium as gym
    import metaworld  # noqa: F401 (registers the Meta-World envs)

    num_envs = protocol.sub_envs(len(benchmark.classes("test")))
    name = f"Meta-World/{benchmark.benchmark}-test"
    kwargs = dict(env_name=benchmark.task_name) if benchmark.benchmark == "ML1" else {}
    envs = gym.make_vec(
        name,
        seed=benchmark.seed,
        meta_batch_size=num_envs,
        vector_strategy="sync",
        max_episode_steps=protocol.max_episode_steps,
        recurrent_info_in_obs=True,
        reward_function_version="v2",
        **kwargs,
    )
    envs.action_space.seed(seed)
    return envs


def evaluate(module, benchmark: MetaWorld, protocol: MetaWorldProtocol, deterministic: bool, seed: int) -> dict:
    """Run ``metalearning_evaluation`` one round at a time; returns what ``meta_test.json`` holds.

    Rounds are run one by one (the same task sequence as one call with ``num_evals``) so that the
    success of every round is known: ``success_ci95`` is the Student-t 95 % interval over rounds.
    """
    from metaworld.evaluation import metalearning_evaluation

    envs = make_test_envs(benchmark, protocol, seed)
    try:
        agent = InContextAgent(module, benchmark, envs.num_envs, protocol.max_episode_steps, deterministic, seed)
        rounds, returns, per_class = [], [], []
        for _ in range(protocol.num_evals):
            success, mean_return, class_success = metalearning_evaluation(
                agent,
                envs,
                num_evals=1,
                adaptation_steps=1,
                adaptation_episodes=protocol.adaptation_episodes,
                evaluation_episodes=protocol.evaluation_episodes,
            )
            rounds.append(float(success))
            returns.append(float(mean_return))
            per_class.append({name: float(value) for name, value in class_success.items()})
    finally:
        envs.close()
    classes = sorted(per_class[0])
    return {
        "protocol": "metaworld",
        "success": float(np.mean(rounds)),
        "success_ci95": student_t_half_width(rounds),
        "return": float(np.mean(returns)),
        "success_per_round": rounds,
        "per_class": {name: float(np.mean([r[name] for r in per_class])) for name in classes},
        "settings": {**asdict(protocol), "meta_batch_size": envs.num_envs, "adaptation_steps": 1},
        "deterministic": deterministic,
        "evaluator": "metaworld.evaluation.metalearning_evaluation",
    }


def student_t_half_width(values: list[float]) -> float:
    """Half-width of the Student-t 95 % interval of the mean of ``values`` (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
