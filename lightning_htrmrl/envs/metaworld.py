"""Meta-World v3 (ML1 / ML10 / ML45) as a batched trial env.

The task distribution comes from a Meta-World benchmark object (``metaworld.ML1(name, seed=)``,
``metaworld.ML10(seed=)``, ``metaworld.ML45(seed=)``): its ``train_tasks`` / ``test_tasks`` lists
are the two splits, and a task id indexes that fixed, seed-determined list. ML1 holds out goals
of one task class; ML10 and ML45 hold out whole classes. The benchmark object is slow to build
(about 1 s for ML1, 7 s for ML10, 26 s for ML45), so it is built lazily, at most once per process
for each ``(benchmark, task_name, seed)``, and never by :class:`MetaWorld`'s constructor, which only
validates its options.

``gym.make_vec("Meta-World/ML1-train")`` is deliberately not used: in Meta-World 3.1.1 it returns
the *test* split. The raw (unwrapped) env classes are used instead, so nothing terminates on
success and no time limit other than the env's own ``max_path_length`` (500) applies.

``metaworld`` (which imports MuJoCo) is imported only inside the functions that need it.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from lightning_htrmrl.envs.base import Split, TaskDistribution, check_split
from lightning_htrmrl.envs.trial import TrialEnv
from lightning_htrmrl.validation import ConfigError, require_non_negative, require_positive

if TYPE_CHECKING:
    from metaworld import Benchmark
    from metaworld.types import Task

BENCHMARKS: tuple[str, ...] = ("ML1", "ML10", "ML45")
MAX_PATH_LENGTH = 500  # Meta-World's max_path_length: a raw env raises if stepped past it
REWARD_FUNCTION_VERSION = "v2"  # passed to every env class (also Meta-World's default)
Reward = Literal["metaworld", "success", "near_goal"]
REWARDS = ("metaworld", "success", "near_goal")
OBS_DIM = 39
ACTION_DIM = 4
_KEY = "data.benchmark.init_args"  # where the options live in the config (error messages)

# (benchmark, task_name, seed) -> metaworld benchmark object, built once per process
_BENCHMARK_CACHE: dict[tuple[str, str | None, int], Benchmark] = {}


def v3_task_names() -> list[str]:
    """The 50 Meta-World v3 task (env class) names, e.g. ``reach-v3``."""
    import metaworld

    return list(metaworld.ML1.ENV_NAMES)


def get_benchmark(benchmark: str, task_name: str | None, seed: int) -> Benchmark:
    """The metaworld benchmark object for ``(benchmark, task_name, seed)``, cached per process."""
    key = (benchmark, task_name, seed)
    if key not in _BENCHMARK_CACHE:
        _BENCHMARK_CACHE[key] = _build_benchmark(benchmark, task_name, seed)
    return _BENCHMARK_CACHE[key]


def _build_benchmark(benchmark: str, task_name: str | None, seed: int) -> Benchmark:
    import metaworld

    if benchmark == "ML1":
        return metaworld.ML1(task_name, seed=seed)
    if benchmark == "ML10":
        return metaworld.ML10(seed=seed)
    if benchmark == "ML45":
        return metaworld.ML45(seed=seed)
    raise ConfigError(f"{_KEY}.benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")


class MetaWorldEnv(TrialEnv):
    """``num_envs`` raw Meta-World envs stepped one after another in this process, as one batch.

    Each slot holds a raw env instance of its current task's class and keeps it while its new task
    at a trial start has the same class (always, for ML1: one instance per slot, built up front).
    An instance given back when a slot switches class goes to a pool and is reused by the next
    slot that needs that class, so MuJoCo models are rarely rebuilt. One instance costs about
    0.2 s to build and 40 MB, so the pool holds at most ``max_pooled`` idle instances (oldest
    dropped first): at most ``num_envs + max_pooled`` instances exist at once.

    Args:
        tasks: the split's Meta-World ``Task`` tuples; task id ``j`` is ``tasks[j]``.
        classes: env class name -> env class, covering every ``task.env_name`` in ``tasks``.
        reward_scale: factor applied to Meta-World's reward (0..10 per step) before it is emitted
            (and before it enters the token).
        reward: ``metaworld`` (its shaped reward, times ``reward_scale``), ``success`` (1 at
            every step where the task is solved, else 0; ``reward_scale`` is not applied) or
            ``near_goal`` (the shaped reward times ``reward_scale`` where Meta-World's
            ``obj_to_target`` distance is at most ``reward_radius``, else 0).
        reward_radius: metres from the target within which ``near_goal`` pays.
        reward_function_version: Meta-World reward version passed to the env classes.
        max_pooled: most idle instances kept for reuse (default ``num_envs``).
        hidden_observation_dims: observation entries replaced by 0 before the policy sees them.
        **trial_kwargs: forwarded to :class:`TrialEnv` (``num_envs``, ``episode_length`` (<= 500),
            ``episodes_per_trial``, ``seed``, ``cycle_tasks``, ``device``).

    Slot ``i``'s simulator is seeded with ``seed + i`` (``env.seed``; Meta-World ignores
    ``reset(seed=)``). The simulator runs on the CPU; outputs are moved to ``device``.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        classes: Mapping[str, type],
        *,
        reward_scale: float = 1.0,
        reward: Reward = "metaworld",
        reward_radius: float = 0.15,
        reward_function_version: str = REWARD_FUNCTION_VERSION,
        max_pooled: int | None = None,
        hidden_observation_dims: Sequence[int] = (),
        **trial_kwargs: Any,
    ) -> None:
        super().__init__(num_tasks=len(tasks), obs_dim=OBS_DIM, action_dim=ACTION_DIM, **trial_kwargs)
        missing = sorted({t.env_name for t in tasks} - set(classes))
        if missing:
            raise ValueError(f"no env class given for task classes {missing}")
        self.tasks = list(tasks)
        self.classes = dict(classes)
        self.reward_scale = float(reward_scale)
        self.reward = reward
        self.reward_radius = float(reward_radius)
        self.reward_function_version = reward_function_version
        self.hidden_observation_dims = list(hidden_observation_dims)
        self.task_class_names = [t.env_name for t in self.tasks]
        self._sim_seed = int(trial_kwargs.get("seed", 0))
        self.max_pooled = self.num_envs if max_pooled is None else max_pooled
        self._free: list[tuple[str, Any]] = []  # idle (class name, instance), oldest first
        self._owner: dict[int, int] = {}  # id(instance) -> slot whose seed it carries (-1: none)
        self._slot_env: list[Any | None] = [None] * self.num_envs
        self._slot_class: list[str | None] = [None] * self.num_envs
        # preallocated per-step buffers
        self._obs_buf = np.zeros((self.num_envs, OBS_DIM), dtype=np.float32)
        self._reward_buf = np.zeros(self.num_envs, dtype=np.float64)
        self._success_buf = np.zeros(self.num_envs, dtype=bool)
        self._to_target_buf = np.zeros(self.num_envs, dtype=np.float64)
        self._reset_buf = np.zeros((self.num_envs, OBS_DIM), dtype=np.float32)
        used = sorted(set(self.task_class_names))
        if len(used) == 1:
            for i in range(self.num_envs):
                self._slot_env[i] = self._acquire(used[0], i)
                self._slot_class[i] = used[0]

    # ------------------------------------------------------------------ instance pool
    def _acquire(self, class_name: str, slot: int) -> Any:
        """An env instance of ``class_name`` for ``slot``, from the pool or newly built."""
        for k in range(len(self._free) - 1, -1, -1):
            if self._free[k][0] == class_name:
                env = self._free.pop(k)[1]
                break
        else:
            env = self.classes[class_name](render_mode=None, reward_function_version=self.reward_function_version)
            self._owner[id(env)] = -1
        if self._owner[id(env)] != slot:
            env.seed(self._sim_seed + slot)
            self._owner[id(env)] = slot
        return env

    # ------------------------------------------------------------------ TrialEnv hooks
    def _assign_tasks(self, env_ids: torch.Tensor, task_ids: torch.Tensor) -> None:
        slots = env_ids.tolist()
        new_classes = [self.task_class_names[t] for t in task_ids.tolist()]
        # give back every instance whose slot changes class first, so the others can reuse it
        for slot, name in zip(slots, new_classes):
            current = self._slot_env[slot]
            if current is not None and self._slot_class[slot] != name:
                self._free.append((self._slot_class[slot], current))
                self._slot_env[slot] = None
        for slot, name, task_id in zip(slots, new_classes, task_ids.tolist()):
            env = self._slot_env[slot]
            if env is None:
                env = self._slot_env[slot] = self._acquire(name, slot)
                self._slot_class[slot] = name
            env.set_task(self.tasks[task_id])  # must precede reset()
        while len(self._free) > self.max_pooled:
            env = self._free.pop(0)[1]
            del self._owner[id(env)]
            env.close()

    def _reset_sim(self, env_ids: torch.Tensor) -> torch.Tensor:
        buf = self._reset_buf
        slots = env_ids.tolist()
        for k, slot in enumerate(slots):
            buf[k] = self._slot_env[slot].reset()[0]
        buf[:, self.hidden_observation_dims] = 0.0
        return torch.from_numpy(buf[: len(slots)].copy())

    def _step_sim(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        actions = action.detach().to("cpu", torch.float32).numpy()
        obs_buf, reward_buf, success_buf = self._obs_buf, self._reward_buf, self._success_buf
        for i, env in enumerate(self._slot_env):
            # truncated (True at step 500) is ignored: TrialEnv resets every episode_length <= 500 steps
            obs, reward, _, _, info = env.step(actions[i])
            obs_buf[i] = obs
            reward_buf[i] = reward
            success_buf[i] = info["success"]  # python float 0.0/1.0 (False after a sim exception)
            self._to_target_buf[i] = info["obj_to_target"]  # every v3 task reports it
        obs_buf[:, self.hidden_observation_dims] = 0.0
        if self.reward == "success":
            reward = success_buf
        elif self.reward == "near_goal":
            reward = reward_buf * self.reward_scale * (self._to_target_buf <= self.reward_radius)
        else:
            reward = reward_buf * self.reward_scale
        return (
            torch.from_numpy(obs_buf.copy()),
            torch.from_numpy(reward.astype(np.float32)),
            torch.from_numpy(success_buf.copy()),
        )

    def _seed_sim(self, seed: int) -> None:
        self._sim_seed = int(seed)
        for env_id in self._owner:
            self._owner[env_id] = -1  # pooled instances are reseeded when next acquired
        for slot, env in enumerate(self._slot_env):
            if env is not None:
                env.seed(self._sim_seed + slot)
                self._owner[id(env)] = slot

    def close(self, *, raise_if_closed: bool = True) -> None:
        envs = [e for e in getattr(self, "_slot_env", []) if e is not None]
        for env in envs + [e for _, e in getattr(self, "_free", [])]:
            env.close()
        self._slot_env, self._free, self._owner = [None] * self.num_envs, [], {}
        super().close(raise_if_closed=raise_if_closed)


class MetaWorld(TaskDistribution):
    """Meta-World v3 meta-RL benchmark: ML1 (one task class, held-out goals), ML10 or ML45.

    Args:
        benchmark: ``"ML1"``, ``"ML10"`` or ``"ML45"``.
        task_name: the ML1 task class, e.g. ``"reach-v3"``; must be None for ML10 / ML45.
        episode_length: ``L``, steps per episode, 1..500 (Meta-World's ``max_path_length``).
        episodes_per_trial: ``K``, episodes per trial.
        seed: seed of the benchmark's goal sampling (fixes the task lists of both splits).
        reward_scale: factor on Meta-World's 0..10 per-step reward; the emitted reward and the
            token's reward are both scaled.
        hidden_observation_dims: observation entries (0..38) replaced by 0 in every split, e.g.
            ``[4, 5, 6, 22, 23, 24]`` hides reach-v3's puck, whose position is drawn with the goal
            and so identifies each training goal (a shortcut to memorising them; hidden in
            ``conf/benchmark/ml1_reach.yaml``).
        reward: ``metaworld`` (default: Meta-World's shaped reward, times ``reward_scale``),
            ``success`` (1 at every step where the task is solved, else 0) or ``near_goal`` (the
            shaped reward, times ``reward_scale``, only where Meta-World's ``obj_to_target``
            distance is within ``reward_radius``, else 0: the sparse point robot's reward on
            Meta-World). With either of the last two nothing tells an agent where the goal lies
            until it comes near, so a goal found in one episode must be remembered in the next
            (the case cross-episode memory is for). On reach-v3 an untrained policy never earns
            the success-only reward (benchmarks/README.md). Stored in checkpoints and
            ``meta_test.json`` (``describe``).
        reward_radius: metres (hand or object to target) within which ``near_goal`` pays.

    The constructor only validates; the metaworld benchmark object is built on first use
    (:meth:`task_names`, :meth:`make_env`, ...) and cached per process.
    """

    obs_dim = OBS_DIM
    action_dim = ACTION_DIM

    def __init__(
        self,
        benchmark: str = "ML1",
        task_name: str | None = "reach-v3",
        episode_length: int = 500,
        episodes_per_trial: int = 10,
        seed: int = 0,
        reward_scale: float = 0.1,
        hidden_observation_dims: list[int] | None = None,
        reward: Reward = "metaworld",
        reward_radius: float = 0.15,
    ) -> None:
        super().__init__(episode_length, episodes_per_trial)
        if reward not in REWARDS:
            raise ConfigError(f"{_KEY}.reward must be one of {list(REWARDS)}, got {reward!r}")
        hidden = list(hidden_observation_dims or [])
        if any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < OBS_DIM for d in hidden):
            raise ConfigError(
                f"{_KEY}.hidden_observation_dims must be indices in [0, {OBS_DIM - 1}], got {hidden_observation_dims!r}"
            )
        if benchmark not in BENCHMARKS:
            raise ConfigError(f"{_KEY}.benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")
        if episode_length > MAX_PATH_LENGTH:
            raise ConfigError(
                f"{_KEY}.episode_length must be <= {MAX_PATH_LENGTH} (Meta-World's max_path_length), "
                f"got {episode_length!r}"
            )
        if benchmark == "ML1":
            _check_task_name(task_name)
        elif task_name is not None:
            raise ConfigError(
                f"{_KEY}.task_name must be null for {benchmark} (its task classes are fixed), got {task_name!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{_KEY}.seed must be an integer, got {seed!r}")
        require_non_negative(f"{_KEY}.seed", seed)
        require_positive(f"{_KEY}.reward_scale", reward_scale)
        require_positive(f"{_KEY}.reward_radius", reward_radius)
        self.benchmark = benchmark
        self.task_name = task_name
        self.seed = seed
        self.reward_scale = float(reward_scale)
        self.hidden_observation_dims = hidden
        self.reward = reward
        self.reward_radius = float(reward_radius)

    # ------------------------------------------------------------------ splits
    def metaworld_benchmark(self) -> Benchmark:
        """The (cached) metaworld benchmark object; built on first call."""
        return get_benchmark(self.benchmark, self.task_name, self.seed)

    def tasks(self, split: Split) -> list[Task]:
        """The Meta-World ``Task`` tuples of ``split``; index = task id."""
        check_split(split)
        b = self.metaworld_benchmark()
        return list(b.train_tasks if split == "train" else b.test_tasks)

    def classes(self, split: Split) -> dict[str, type]:
        """Env class name -> env class of ``split``."""
        check_split(split)
        b = self.metaworld_benchmark()
        return dict(b.train_classes if split == "train" else b.test_classes)

    def task_classes(self, split: Split) -> list[str]:
        """Env class name (e.g. ``reach-v3``) of every task id of ``split``."""
        return [t.env_name for t in self.tasks(split)]

    def task_names(self, split: Split) -> list[str]:
        """``<class>/goal_<index within class>`` for every task id of ``split``, e.g. ``reach-v3/goal_07``."""
        seen: dict[str, int] = {}
        names = []
        for name in self.task_classes(split):
            index = seen.get(name, 0)
            seen[name] = index + 1
            names.append(f"{name}/goal_{index:02d}")
        return names

    # ------------------------------------------------------------------ envs
    def make_env(
        self,
        split: Split,
        num_envs: int,
        seed: int = 0,
        cycle_tasks: bool = False,
        device: torch.device | str = "cpu",
    ) -> MetaWorldEnv:
        check_split(split)
        require_positive("num_envs", num_envs)
        return MetaWorldEnv(
            self.tasks(split),
            self.classes(split),
            reward_scale=self.reward_scale,
            reward=self.reward,
            reward_radius=self.reward_radius,
            hidden_observation_dims=self.hidden_observation_dims,
            num_envs=num_envs,
            episode_length=self.episode_length,
            episodes_per_trial=self.episodes_per_trial,
            seed=seed,
            cycle_tasks=cycle_tasks,
            device=device,
        )

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            benchmark=self.benchmark,
            task_name=self.task_name,
            benchmark_seed=self.seed,
            reward_scale=self.reward_scale,
            reward=self.reward,
            reward_radius=self.reward_radius,
            hidden_observation_dims=self.hidden_observation_dims,
            reward_function_version=REWARD_FUNCTION_VERSION,
            metaworld_version=importlib.metadata.version("metaworld"),
            mujoco_version=importlib.metadata.version("mujoco"),
            train_classes=list(self.classes("train")),
            test_classes=list(self.classes("test")),
        )
        return info


def _check_task_name(task_name: str | None) -> None:
    """Raise a one-line :class:`ConfigError` unless ``task_name`` is a Meta-World v3 task name."""
    valid = v3_task_names()
    if task_name in valid:
        return
    if task_name is None:
        raise ConfigError(f"{_KEY}.task_name: ML1 needs a Meta-World v3 task name; valid: {', '.join(valid)}")
    hint = ""
    if isinstance(task_name, str) and task_name.endswith("-v2"):
        renamed = task_name[: -len("-v2")] + "-v3"
        hint = " (Meta-World 3 renamed every -v2 task to -v3"
        hint += f": use {renamed!r})" if renamed in valid else ")"
    elif isinstance(task_name, str):
        close = difflib.get_close_matches(task_name, valid, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    raise ConfigError(f"{_KEY}.task_name: unknown Meta-World v3 task {task_name!r}{hint}; valid: {', '.join(valid)}")
