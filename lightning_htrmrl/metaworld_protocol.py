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

Rounds are independent (each is a new trial on each sub-env's next task), so they run in
``num_workers`` processes, each with its own test envs and a CPU copy of the policy. Round ``r``
puts every sub-env where Meta-World's evaluator has it before round ``r`` (its task cycle advanced
``r`` times) and draws all its randomness (action sampling, window sampling, the envs' action
space) from ``(seed, r)``, so the results of every round are the same for any number of workers.
The agent acts for a few sub-envs at a time (one per held-out class by default), where one CPU
thread is fastest: more threads only contend with the simulator and the other workers.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential
from torchrl.envs.utils import ExplorationType, set_exploration_type

from lightning_htrmrl.envs.metaworld import MAX_PATH_LENGTH, MetaWorld
from lightning_htrmrl.models.policy import EpisodicContext
from lightning_htrmrl.statistics import confidence_half_width
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
        num_workers: processes that play rounds side by side, each with its own test envs of
            ``meta_batch_size`` sub-envs; ``None``: one per usable core, at most ``num_evals``;
            1: every round in this process. The results do not depend on it.
    """

    num_evals: int = 10
    adaptation_episodes: int = 10
    evaluation_episodes: int = 3
    max_episode_steps: int = MAX_PATH_LENGTH
    meta_batch_size: int | None = None
    num_workers: int | None = None

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
        for key in ("meta_batch_size", "num_workers"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_KEY}.{key} must be an integer >= 1 or null, got {value!r}")

    def sub_envs(self, num_test_classes: int) -> int:
        """The number of sub-envs, checked against Meta-World's even split of each class's goals."""
        size = self.meta_batch_size or num_test_classes
        per_class = size // num_test_classes
        if size % num_test_classes or per_class < 1 or 50 % per_class:
            allowed = [n * num_test_classes for n in (1, 2, 5, 10, 25, 50)]
            raise ConfigError(f"{_KEY}.meta_batch_size must be one of {allowed} here, got {size}")
        return size

    def workers(self) -> int:
        """The number of worker processes (``num_workers``, or one per usable core), at most ``num_evals``."""
        return min(self.num_workers or len(os.sched_getaffinity(0)), self.num_evals)


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


@dataclass
class TrainedPolicy:
    """What acting needs of a :class:`~lightning_htrmrl.module.MetaPPO`, on the CPU (picklable).

    Args:
        encoder: the context encoder (with its input-normalisation statistics).
        actor: the actor head.
        past_windows: how past-episode windows are chosen (``model.past_windows``).
    """

    encoder: torch.nn.Module
    actor: torch.nn.Module
    past_windows: str

    @classmethod
    def of(cls, module) -> TrainedPolicy:
        """The module's own encoder and actor if it is on the CPU, else CPU copies (it stays where it is)."""
        encoder, actor = module.encoder, module.actor
        if module.device.type != "cpu":
            encoder, actor = copy.deepcopy(encoder).cpu(), copy.deepcopy(actor).cpu()
        return cls(encoder, actor, module.hparams.past_windows)


class InContextAgent:
    """A trained policy as Meta-World's ``MetaLearningAgent``; acts inside :meth:`acting`.

    Args:
        policy: the trained encoder + actor, on the CPU.
        benchmark: the Meta-World task distribution it was trained on (observation entries it
            hides, reward scale).
        num_envs: sub-envs ``M`` of the eval envs.
        max_episode_steps: the longest episode the memory must hold.
        deterministic: act with the distribution's mean (default: sample, as in training).
        seed: seeds window sampling (uniform windows only); see :meth:`reseed`.
    """

    def __init__(
        self,
        policy: TrainedPolicy,
        benchmark: MetaWorld,
        num_envs: int,
        max_episode_steps: int,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        self.context = EpisodicContext(policy.encoder, max_episode_steps, seed, policy.past_windows)
        # make_policy's log-prob module is left out: the evaluator only needs the action.
        self.policy = TensorDictSequential(self.context, policy.actor)
        obs_dim, action_dim = self.obs_dim, self.action_dim = benchmark.obs_dim, benchmark.action_dim
        self.hidden = torch.tensor(benchmark.hidden_observation_dims, dtype=torch.long)
        self.reward_scale = benchmark.reward_scale
        self.exploration = ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM
        self.actions_taken = 0  # calls of the policy (each acts for all M sub-envs)
        # Step counters (numpy, shared with the tensors the policy reads) and the token
        # [s_t, a_{t-1}, r_{t-1}, done_{t-1}] [M, D], written in place at every step.
        self.episode_idx = np.zeros(num_envs, dtype=np.int64)
        self.step_idx = np.zeros(num_envs, dtype=np.int64)
        self._obs = torch.zeros(num_envs, obs_dim)
        self._token = torch.zeros(num_envs, obs_dim + action_dim + 2)
        self.last_action = self._token[:, obs_dim : obs_dim + action_dim]
        self.last_reward = self._token[:, obs_dim + action_dim]  # scaled as in training
        self._steps = TensorDict(
            {
                "observation": self._obs,
                "token": self._token,
                "episode_idx": torch.from_numpy(self.episode_idx),
                "step_in_episode": torch.from_numpy(self.step_idx),
            },
            batch_size=[num_envs],
        )

    @contextmanager
    def acting(self) -> Iterator[None]:
        """The context to act in (no gradients, the exploration type), entered once per round."""
        with torch.no_grad(), set_exploration_type(self.exploration):
            yield

    def reseed(self, seed: int) -> None:
        """Draw window starts from ``seed`` from now on (actions are drawn from torch's global RNG)."""
        self.context.seed = seed  # the memory is built at the first step, with this seed
        if self.context.memory is not None:
            self.context.memory.generator.manual_seed(seed)

    # ------------------------------------------------------------------ MetaLearningAgent
    def init(self) -> None:
        """A new round: a new trial (the memory is cleared at its first step)."""
        self.episode_idx[:] = 0
        self.step_idx[:] = 0
        self._token.zero_()

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict]:
        return self._act(observations), {}

    def step(self, timestep) -> None:
        """After an adaptation step: its reward, and a new episode where one ended."""
        self.last_reward.copy_(torch.from_numpy(np.asarray(timestep.reward))).mul_(self.reward_scale)
        self.step_idx += 1
        self._begin_episodes(np.logical_or(timestep.terminated, timestep.truncated))

    def adapt(self) -> None:
        """Nothing to do: the adaptation episodes are in memory, where the evaluation episodes see them."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        # Evaluation shows no rewards but through the observation: r_{t-1} (Meta-World's reward / 10).
        shown = torch.as_tensor(observations[:, self.obs_dim + self.action_dim], dtype=torch.float32)
        seen = torch.from_numpy(self.step_idx > 0)
        self.last_reward.copy_(torch.where(seen, shown * 10.0 * self.reward_scale, self.last_reward))
        action = self._act(observations)
        self.step_idx += 1
        return action

    def reset(self, env_mask: np.ndarray) -> None:
        """Meta-World calls this after every evaluation step: envs in ``env_mask`` begin an episode."""
        if env_mask.any():
            self._begin_episodes(env_mask)

    # ------------------------------------------------------------------ helpers
    def _begin_episodes(self, mask: np.ndarray) -> None:
        starting = np.asarray(mask, dtype=bool) & (self.step_idx > 0)  # not twice for one episode end
        self.episode_idx += starting
        self.step_idx[starting] = 0

    def _act(self, observations: np.ndarray) -> np.ndarray:
        """Act on ``observations [M, obs_dim + action_dim + 2]``; returns actions ``[M, action_dim]``."""
        obs = self._obs.copy_(torch.from_numpy(observations[:, : self.obs_dim]))
        if len(self.hidden):
            obs.index_fill_(1, self.hidden, 0.0)
        self._token[:, : self.obs_dim] = obs
        self._token[:, -1] = torch.from_numpy((self.step_idx == 0) & (self.episode_idx > 0))
        action = self.policy(self._steps)["action"].clamp(-1.0, 1.0)
        self.last_action.copy_(action)
        self.actions_taken += 1
        return action.numpy().astype(np.float64)


def make_test_envs(benchmark: MetaWorld, protocol: MetaWorldProtocol, seed: int, num_envs: int | None = None):
    """Meta-World's official held-out test envs of ``benchmark`` (same benchmark seed: same goals).

    ``num_envs``: the sub-envs (default ``protocol.sub_envs(...)``, which builds the benchmark's task lists).
    """
    import gymnasium as gym
    import metaworld  # noqa: F401 (registers the Meta-World envs)

    num_envs = num_envs or protocol.sub_envs(len(benchmark.classes("test")))
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


def round_seed(seed: int, round_index: int) -> int:
    """The seed of everything round ``round_index`` draws (independent of the other rounds)."""
    return int(np.random.SeedSequence([abs(seed), int(seed < 0), round_index]).generate_state(1)[0])


class RoundResult(NamedTuple):
    """One round of Meta-World's evaluator."""

    success: float  # mean over classes of the success rate of the evaluation episodes
    mean_return: float  # mean undiscounted return of the evaluation episodes
    per_class: dict[str, float]  # success rate per held-out class
    agent_steps: int  # steps of the test envs (the agent acts for all sub-envs at once)


class _Rounds:
    """The test envs and an agent in one process: plays any round, in any order, with the same result."""

    def __init__(
        self,
        policy: TrainedPolicy,
        benchmark: MetaWorld,
        protocol: MetaWorldProtocol,
        deterministic: bool,
        seed: int,
        num_envs: int,
    ) -> None:
        self.protocol, self.seed = protocol, seed
        self.envs = make_test_envs(benchmark, protocol, seed, num_envs)
        self.agent = InContextAgent(policy, benchmark, num_envs, protocol.max_episode_steps, deterministic, seed)
        self._first = self._checkpoint()  # every sub-env's task cycle before round 0
        self._at, self._round = self._first, 0

    def _checkpoint(self) -> list:
        return [env.get_checkpoint() for env in self.envs.envs]

    def _go_to(self, round_index: int) -> None:
        """Each sub-env's task cycle (its shuffled tasks, position and RNGs) advanced ``round_index``
        times (``sample_tasks``, no step), as Meta-World's evaluator has it before that round."""
        if round_index < self._round:
            self._at, self._round = self._first, 0
        for env, state in zip(self.envs.envs, self._at):
            env.load_checkpoint([state])
        for _ in range(round_index - self._round):
            self.envs.call("sample_tasks")
        self._at, self._round = self._checkpoint(), round_index

    def play(self, round_index: int) -> RoundResult:
        """Round ``round_index`` of Meta-World's evaluator."""
        from metaworld.evaluation import metalearning_evaluation

        self._go_to(round_index)
        seed = round_seed(self.seed, round_index)
        torch.manual_seed(seed)
        self.agent.reseed(seed)
        self.envs.action_space.seed(seed)
        actions_before = self.agent.actions_taken
        with self.agent.acting():
            success, mean_return, per_class = metalearning_evaluation(
                self.agent,
                self.envs,
                num_evals=1,
                adaptation_steps=1,
                adaptation_episodes=self.protocol.adaptation_episodes,
                evaluation_episodes=self.protocol.evaluation_episodes,
            )
        classes = {name: float(value) for name, value in per_class.items()}
        return RoundResult(float(success), float(mean_return), classes, self.agent.actions_taken - actions_before)

    def close(self) -> None:
        self.envs.close()


_WORKER: _Rounds | None = None  # a worker process's envs and agent


def _start_worker(payload: bytes) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = _Rounds(*pickle.loads(payload))


def _play_in_worker(round_index: int) -> RoundResult:
    return _WORKER.play(round_index)


def play_rounds(
    module, benchmark: MetaWorld, protocol: MetaWorldProtocol, deterministic: bool, seed: int
) -> list[RoundResult]:
    """Every round of Meta-World's evaluator, in round order, played by ``protocol.workers()`` processes.

    Rounds are shared out to the workers as each becomes free; round ``r``'s result is the same
    for any number of them. With one, rounds are played here, and torch's RNG state and thread
    count are left as they were.
    """
    policy = TrainedPolicy.of(module)
    num_envs = protocol.sub_envs(len(benchmark.classes("test")))
    args = (policy, benchmark, protocol, deterministic, seed, num_envs)
    workers = protocol.workers()
    if workers > 1:
        # spawn: a forked copy of a process that runs threads (torch, a trainer) may hang
        context = multiprocessing.get_context("spawn")
        payload = pickle.dumps(args)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(payload,)) as pool:
            return list(pool.map(_play_in_worker, range(protocol.num_evals)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rounds = None
    try:
        with torch.random.fork_rng(devices=[]):
            rounds = _Rounds(*args)
            return [rounds.play(r) for r in range(protocol.num_evals)]
    finally:
        torch.set_num_threads(threads)
        if rounds is not None:
            rounds.close()


def evaluate(module, benchmark: MetaWorld, protocol: MetaWorldProtocol, deterministic: bool, seed: int) -> dict:
    """Run ``metalearning_evaluation`` one round at a time; returns what ``meta_test.json`` holds.

    Rounds are run one by one (the same tasks as one call with ``num_evals``) so that the success
    of every round is known: ``success_ci95`` is the Student-t 95 % interval over rounds.
    """
    played = play_rounds(module, benchmark, protocol, deterministic, seed)
    success = [result.success for result in played]
    classes = sorted(played[0].per_class)
    return {
        "protocol": "metaworld",
        "success": float(np.mean(success)),
        "success_ci95": confidence_half_width(success) or 0.0,
        "return": float(np.mean([result.mean_return for result in played])),
        "success_per_round": success,
        "per_class": {name: float(np.mean([r.per_class[name] for r in played])) for name in classes},
        "settings": {
            **asdict(protocol),
            "meta_batch_size": protocol.sub_envs(len(benchmark.classes("test"))),
            "num_workers": protocol.workers(),
            "adaptation_steps": 1,
        },
        "deterministic": deterministic,
        "evaluator": "metaworld.evaluation.metalearning_evaluation",
    }
