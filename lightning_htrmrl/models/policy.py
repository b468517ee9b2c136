"""The collection-time policy: episodic memory + cached encoder + actor."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torchrl.modules import ProbabilisticActor, TanhNormal

from lightning_htrmrl.memory import EpisodicMemory, WindowSelection
from lightning_htrmrl.models.encoders import ContextEncoder


class EpisodicContext(TensorDictModuleBase):
    """Stateful TensorDict module that keeps each env's :class:`EpisodicMemory` and writes ``features``.

    At every step it stores the env's token; when an episode begins it samples the past windows
    and caches their encodings (``encoder.begin_episode``); when a trial begins it clears the env's
    memory. It writes ``features [M, F]`` for the actor and ``window_starts [M, N-1]``, the window
    starts sampled at the current episode's start, so training can rebuild the exact inputs.

    The encoder is shared (not copied); the memory is sized lazily from the first batch of envs.

    Args:
        encoder: the context encoder.
        episode_length: ``L``.
        seed: seeds window sampling.
        past_windows: how past-episode windows are chosen (see :class:`EpisodicMemory`).
    """

    in_keys = ["token", "observation", "episode_idx", "step_in_episode"]
    out_keys = ["features", "window_starts"]

    def __init__(
        self, encoder: ContextEncoder, episode_length: int, seed: int = 0, past_windows: WindowSelection = "uniform"
    ) -> None:
        super().__init__()
        self.past_windows = past_windows
        self.encoder = encoder
        self.episode_length = episode_length
        self.seed = seed
        self.memory: EpisodicMemory | None = None
        self._cache = None
        self._window_starts: torch.Tensor | None = None

    def _init_memory(self, num_envs: int, token: torch.Tensor) -> None:
        self.memory = EpisodicMemory(
            num_envs,
            self.encoder.num_episodes,
            self.episode_length,
            self.encoder.window,
            token.shape[-1],
            seed=self.seed,
            device=token.device,
            past_windows=self.past_windows,
        )
        num_past = self.encoder.num_episodes - 1
        empty = token.new_zeros(num_envs, num_past, self.encoder.window, token.shape[-1])
        self._cache = self.encoder.begin_episode(
            empty, torch.zeros(num_envs, num_past, dtype=torch.bool, device=token.device)
        )
        self._window_starts = torch.zeros(num_envs, num_past, dtype=torch.long, device=token.device)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        batch_shape = tensordict.batch_size
        td = tensordict.reshape(-1)
        token = td["token"]
        episode_idx, step = td["episode_idx"], td["step_in_episode"]
        if self.memory is None or self.memory.num_envs != len(td):
            self._init_memory(len(td), token)
        memory = self.memory
        episode_start = step == 0
        trial_start = episode_start & (episode_idx == 0)
        if trial_start.any():
            memory.clear(trial_start)
        memory.write(token, episode_idx, step)
        if episode_start.any():
            starts, valid, windows = memory.sample_past_windows(episode_idx)
            rows = episode_start.nonzero().squeeze(-1)
            self._cache[rows] = self.encoder.begin_episode(windows[rows], valid[rows])
            self._window_starts[rows] = starts[rows]
        current, num_valid = memory.current_window(episode_idx, step)
        features = self.encoder.step(self._cache, current, num_valid, td["observation"])
        tensordict.set("features", features.reshape(*batch_shape, -1))
        tensordict.set("window_starts", self._window_starts.clone().reshape(*batch_shape, -1))
        return tensordict


class ActionLogProb(TensorDictModuleBase):
    """Overwrites ``action_log_prob`` with the log-prob computed from the action itself.

    The actor's own log-prob of a ``TanhNormal`` sample uses the cached pre-squash value, while
    training can only invert ``tanh(action)`` (lossy near the bounds); storing the value computed
    the way training computes it keeps PPO's first ratios exactly 1.
    """

    in_keys = ["features", "action"]
    out_keys = ["action_log_prob"]

    def __init__(self, actor: ProbabilisticActor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set("action_log_prob", self.actor.get_dist(tensordict).log_prob(tensordict.get("action")))
        return tensordict


def make_policy(
    encoder: ContextEncoder,
    actor: ProbabilisticActor,
    episode_length: int,
    seed: int = 0,
    past_windows: WindowSelection = "uniform",
) -> TensorDictSequential:
    """Memory, encoder and actor as one TorchRL policy for collectors and rollouts."""
    modules = [EpisodicContext(encoder, episode_length, seed, past_windows), actor]
    if issubclass(actor[-1].distribution_class, TanhNormal):
        modules.append(ActionLogProb(actor))
    return TensorDictSequential(*modules)
